// normlab's fused group norm kernels (layer norm over C x * with a per-channel affine is
// group norm with one group), forward and backward. Plain C++ with a C ABI, compiled
// with csrc/norm_kernels.cpp into one library by normlab.kernels._build.
//
// Layouts: "NCL" is a contiguous (N, C, L) tensor: the Cg = C/G channels of group g of
// sample n are one contiguous block of Cg*L values. "NLC" is channels_last: sample n is
// L contiguous rows of C channels (and (N, C) input is NLC with L = 1). dtype 0 is
// float32, 1 is bfloat16 (read into float, rounded to nearest even on store).
//
// Numerics (as normlab.stats, or better): every sum is of x - k with k a float shift
// near the mean, in float partial sums over bounded chunks accumulated in double, and
// the shift is corrected by a second pass whenever it was far off ((mean - k)^2 > var,
// where the shifted sums would cancel). x - k is exact when x is near k (Sterbenz), so
// 1e4 + N(0, 1) normalizes to float32 rounding. NLC takes per-channel sums about a
// per-channel shift (the mean of the sample's first rows) and merges the channels into
// groups in double (Chan's formula). Outputs are (x - k) * a_c + b'_c, with k = the
// group mean rounded to float, never x * a + b with a large cancelling b.
//
// Backward per (n, g), with x_hat = (x - mean) * invstd and dy = dL/dy:
//   dx = invstd * (w_c dy - A/cnt - x_hat B/cnt),  A = sum w_c dy,  B = sum w_c dy x_hat,
// from the per-(n, c) sums sum(dy) and sum(dy (x - k)), which also give dweight and dbias
// (summed over n in a fixed order, so 1 and 2 threads give identical results).
//
// Work is split over (sample, group) blocks (NCL) or samples (NLC); every block is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace normlab_kernels;


constexpr int64_t kRows = 64;     // rows per float partial sum (NLC)
constexpr int64_t kHeadRows = 16;  // rows whose mean is the NLC shift estimate
// ------------------------------------------------------------------ NCL

template <typename T>
void gn_fwd_ncl(const T* x, T* y, int64_t N, int64_t C, int64_t L, int64_t G, const float* w,
                const float* b, double eps, double* mean_out, double* invstd_out, int nt) {
  const int64_t Cg = C / G, len = Cg * L;
  const double cnt = static_cast<double>(len);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t g = ng % G;
    const T* xb = x + ng * len;  // (n*C + g*Cg)*L = (n*G + g)*Cg*L
    T* yb = y + ng * len;
    // Shift: the mean of the block's first values (a close, cheap estimate); if it was
    // far off, a second pass about the first pass's mean.
    const int64_t head = std::min<int64_t>(len, 256);
    const float x0 = ld(xb, 0);
    double h1 = 0.0, h2 = 0.0;
    shifted_sums(xb, head, x0, h1, h2);
    float shift = static_cast<float>(x0 + h1 / head);
    double t1 = 0.0, t2 = 0.0;
    shifted_sums(xb, len, shift, t1, t2);
    double d = t1 / cnt;
    if (!(d * d <= t2 / cnt - d * d)) {  // also taken for NaN, which then stays NaN
      shift = static_cast<float>(shift + d);
      t1 = 0.0;
      t2 = 0.0;
      shifted_sums(xb, len, shift, t1, t2);
      d = t1 / cnt;
    }
    // std::max(NaN, 0.0) is NaN: a NaN group stays NaN.
    const double var = std::max(t2 / cnt - d * d, 0.0);
    const double is = 1.0 / std::sqrt(var + eps);
    mean_out[ng] = shift + d;
    invstd_out[ng] = is;
    for (int64_t c = 0; c < Cg; ++c) {
      const int64_t cc = g * Cg + c;
      const double a = (w ? w[cc] : 1.0) * is;
      const float af = static_cast<float>(a);
      const float bf = static_cast<float>((b ? b[cc] : 0.0) - d * a);
      const T* xr = xb + c * L;
      T* yr = yb + c * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) st(yr, l, (ld(xr, l) - shift) * af + bf);
    }
  }
}

// dwn, dbn: (N, C) per-sample sums of dy * x_hat and dy.
template <typename T>
void gn_bwd_ncl(const T* gy, const T* x, T* dx, int64_t N, int64_t C, int64_t L, int64_t G,
                const float* w, const double* mean, const double* invstd, double* dwn,
                double* dbn, int nt) {
  const int64_t Cg = C / G, len = Cg * L;
  const double cnt = static_cast<double>(len);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, g = ng % G;
    const T* gb = gy + ng * len;
    const T* xb = x + ng * len;
    const float shift = static_cast<float>(mean[ng]);
    const double delta = mean[ng] - shift;
    const double is = invstd[ng];
    double A = 0.0, B = 0.0;  // sum(w dy), sum(w dy x_hat)
    for (int64_t c = 0; c < Cg; ++c) {
      const int64_t cc = g * Cg + c;
      double sg = 0.0, sgx = 0.0;
      grad_sums(gb + c * L, xb + c * L, L, shift, sg, sgx);
      const double sgxh = is * (sgx - delta * sg);
      dwn[n * C + cc] = sgxh;
      dbn[n * C + cc] = sg;
      const double wc = w ? w[cc] : 1.0;
      A += wc * sg;
      B += wc * sgxh;
    }
    if (!dx) continue;
    // dx = (w is) dy + k2 (x - shift) + k1
    const double k2d = -is * is * B / cnt;
    const float k2 = static_cast<float>(k2d);
    const float k1 = static_cast<float>(-is * A / cnt - k2d * delta);
    T* db = dx + ng * len;
    for (int64_t c = 0; c < Cg; ++c) {
      const int64_t cc = g * Cg + c;
      const float af = static_cast<float>((w ? w[cc] : 1.0) * is);
      const T* gr = gb + c * L;
      const T* xr = xb + c * L;
      T* dr = db + c * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) st(dr, l, af * ld(gr, l) + k2 * (ld(xr, l) - shift) + k1);
    }
  }
}

// ------------------------------------------------------------------ NLC

// Per-channel sums over the rows [0, L) of one sample (row stride C): s1[c] = sum_r u,
// s2[c] = sum_r v, with term(r, c, u, v) adding one row's terms to u and v. Blocks of
// kW channels keep their float partial sums in registers while walking the rows (kRows
// at a time, then added in double); the last C % kW channels go row by row.
constexpr int kW = 64;

template <typename F>
inline void row_sums(int64_t L, int64_t C, F term, float* f1, float* f2, double* s1,
                     double* s2) {
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  int64_t c0 = 0;
  for (; c0 + kW <= C; c0 += kW) {
    for (int64_t r0 = 0; r0 < L; r0 += kRows) {
      const int64_t r1 = std::min(L, r0 + kRows);
      float a1[kW] = {}, a2[kW] = {};
      for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
        for (int j = 0; j < kW; ++j) term(r, c0 + j, a1[j], a2[j]);
      }
      for (int j = 0; j < kW; ++j) {
        s1[c0 + j] += a1[j];
        s2[c0 + j] += a2[j];
      }
    }
  }
  if (c0 == C) return;
  for (int64_t r0 = 0; r0 < L; r0 += kRows) {
    const int64_t r1 = std::min(L, r0 + kRows);
    std::fill(f1 + c0, f1 + C, 0.f);
    std::fill(f2 + c0, f2 + C, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
#pragma omp simd
      for (int64_t c = c0; c < C; ++c) term(r, c, f1[c], f2[c]);
    }
    for (int64_t c = c0; c < C; ++c) {
      s1[c] += f1[c];
      s2[c] += f2[c];
    }
  }
}

// Per-channel s1 += sum(x - k), s2 += sum((x - k)^2) over rows [0, L) of one sample.
template <typename T>
void channel_sums(const T* xs, int64_t L, int64_t C, const float* k, float* f1, float* f2,
                  double* s1, double* s2) {
  row_sums(L, C, [&](int64_t r, int64_t c, float& u, float& v) {
    const float d = ld(xs, r * C + c) - k[c];
    u += d;
    v += d * d;
  }, f1, f2, s1, s2);
}

template <typename T>
void gn_fwd_nlc(const T* x, T* y, int64_t N, int64_t C, int64_t L, int64_t G, const float* w,
                const float* b, double eps, double* mean_out, double* invstd_out, int nt) {
  const int64_t Cg = C / G;
  const double cnt = static_cast<double>(Cg) * L;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> k(C), f1(C), f2(C), shift(C), af(C), bf(C);
    std::vector<double> s1(C), s2(C), m(C);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* xs = x + n * L * C;
      T* ys = y + n * L * C;
      // Per-channel shift: the mean of the first rows.
      const int64_t head = std::min(L, kHeadRows);
      std::fill(f1.begin(), f1.end(), 0.f);
      for (int64_t r = 0; r < head; ++r)
        for (int64_t c = 0; c < C; ++c) f1[c] += ld(xs + r * C, c) - ld(xs, c);
      for (int64_t c = 0; c < C; ++c) k[c] = ld(xs, c) + f1[c] / static_cast<float>(head);
      // Channel means m_c and sums of squares about them, merged into groups (Chan's
      // formula). The sums about k_c lose accuracy when (m_c - k_c)^2 L, summed over the
      // group, exceeds its sum of squares: then a second pass about the channel means.
      auto group_m2 = [&](int64_t gi, double& gm) {
        gm = 0.0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          m[c] = k[c] + s1[c] / L;
          gm += m[c];
        }
        gm /= Cg;
        double m2 = 0.0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          const double d = m[c] - gm;
          m2 += std::max(s2[c] - s1[c] * s1[c] / L, 0.0) + L * d * d;
        }
        return m2;
      };
      channel_sums(xs, L, C, k.data(), f1.data(), f2.data(), s1.data(), s2.data());
      bool redo = false;
      for (int64_t gi = 0; gi < G && !redo; ++gi) {
        double gm, off = 0.0;
        const double m2 = group_m2(gi, gm);
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) off += s1[c] * s1[c] / L;
        if (!(off <= m2)) redo = true;  // also for NaN
      }
      if (redo) {
        for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(k[c] + s1[c] / L);
        channel_sums(xs, L, C, k.data(), f1.data(), f2.data(), s1.data(), s2.data());
      }
      for (int64_t gi = 0; gi < G; ++gi) {
        double gm;
        const double m2 = group_m2(gi, gm);
        const double var = std::max(m2 / cnt, 0.0);
        const double is = 1.0 / std::sqrt(var + eps);
        mean_out[n * G + gi] = gm;
        invstd_out[n * G + gi] = is;
        const float sh = static_cast<float>(gm);
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          const double a = (w ? w[c] : 1.0) * is;
          shift[c] = sh;
          af[c] = static_cast<float>(a);
          bf[c] = static_cast<float>((b ? b[c] : 0.0) - (gm - sh) * a);
        }
      }
      const float* sp = shift.data();
      const float* ap = af.data();
      const float* bp = bf.data();
      for (int64_t r = 0; r < L; ++r) {
        const T* xr = xs + r * C;
        T* yr = ys + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) st(yr, c, (ld(xr, c) - sp[c]) * ap[c] + bp[c]);
      }
    }
  }
}

template <typename T>
void gn_bwd_nlc(const T* gy, const T* x, T* dx, int64_t N, int64_t C, int64_t L, int64_t G,
                const float* w, const double* mean, const double* invstd, double* dwn,
                double* dbn, int nt) {
  const int64_t Cg = C / G;
  const double cnt = static_cast<double>(Cg) * L;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> shift(C), af(C), k1(C), k2(C), f1(C), f2(C);
    std::vector<double> sg(C), sgx(C);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const T* gs = gy + n * L * C;
      const T* xs = x + n * L * C;
      for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(mean[n * G + c / Cg]);
      const float* sp = shift.data();
      row_sums(L, C, [&](int64_t r, int64_t c, float& u, float& v) {
        const float gv = ld(gs, r * C + c);
        u += gv;
        v += gv * (ld(xs, r * C + c) - sp[c]);
      }, f1.data(), f2.data(), sg.data(), sgx.data());
      for (int64_t gi = 0; gi < G; ++gi) {
        const double mg = mean[n * G + gi];
        const double delta = mg - static_cast<float>(mg);
        const double is = invstd[n * G + gi];
        double A = 0.0, B = 0.0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          const double sgxh = is * (sgx[c] - delta * sg[c]);
          dwn[n * C + c] = sgxh;
          dbn[n * C + c] = sg[c];
          const double wc = w ? w[c] : 1.0;
          A += wc * sg[c];
          B += wc * sgxh;
        }
        const double k2d = -is * is * B / cnt;
        const float k1g = static_cast<float>(-is * A / cnt - k2d * delta);
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          af[c] = static_cast<float>((w ? w[c] : 1.0) * is);
          k2[c] = static_cast<float>(k2d);
          k1[c] = k1g;
        }
      }
      if (!dx) continue;
      T* ds = dx + n * L * C;
      const float* ap = af.data();
      const float* k1p = k1.data();
      const float* k2p = k2.data();
      for (int64_t r = 0; r < L; ++r) {
        const T* gr = gs + r * C;
        const T* xr = xs + r * C;
        T* dr = ds + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          st(dr, c, ap[c] * ld(gr, c) + k2p[c] * (ld(xr, c) - sp[c]) + k1p[c]);
      }
    }
  }
}

template <typename T>
void gn_fwd(const void* x, void* y, int layout, int64_t N, int64_t C, int64_t L, int64_t G,
            const float* w, const float* b, double eps, double* mean, double* invstd, int nt) {
  if (layout == 0)
    gn_fwd_ncl<T>(static_cast<const T*>(x), static_cast<T*>(y), N, C, L, G, w, b, eps, mean,
                  invstd, nt);
  else
    gn_fwd_nlc<T>(static_cast<const T*>(x), static_cast<T*>(y), N, C, L, G, w, b, eps, mean,
                  invstd, nt);
}

template <typename T>
void gn_bwd(const void* g, const void* x, void* dx, int layout, int64_t N, int64_t C,
            int64_t L, int64_t G, const float* w, const double* mean, const double* invstd,
            float* dw, float* db, int nt) {
  std::vector<double> dwn(N * C), dbn(N * C);
  const T* gp = static_cast<const T*>(g);
  const T* xp = static_cast<const T*>(x);
  T* dp = static_cast<T*>(dx);
  if (layout == 0)
    gn_bwd_ncl<T>(gp, xp, dp, N, C, L, G, w, mean, invstd, dwn.data(), dbn.data(), nt);
  else
    gn_bwd_nlc<T>(gp, xp, dp, N, C, L, G, w, mean, invstd, dwn.data(), dbn.data(), nt);
  // dweight, dbias: per-sample sums added over n in order (thread-count independent).
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      sw += dwn[n * C + c];
      sb += dbn[n * C + c];
    }
    dw[c] = static_cast<float>(sw);
    db[c] = static_cast<float>(sb);
  }
}

bool bad_shape(int layout, int64_t N, int64_t C, int64_t L, int64_t G) {
  return (layout != 0 && layout != 1) || N < 1 || C < 1 || L < 1 || G < 1 || C % G != 0;
}

}  // namespace

extern "C" {

// Group norm forward: y = (x - mean_{n,g}) / sqrt(var_{n,g} + eps) * w_c + b_c (w, b may
// be null); writes the group means and 1/sqrt(var + eps) (double, N*G each, n major).
int normlab_gn_fwd(const void* x, void* y, int dtype, int layout, int64_t N, int64_t C,
                   int64_t L, int64_t G, const float* w, const float* b, double eps,
                   double* mean, double* invstd, int nt) {
  if (bad_shape(layout, N, C, L, G)) return 2;
  if (dtype == 0) {
    gn_fwd<float>(x, y, layout, N, C, L, G, w, b, eps, mean, invstd, nt);
    return 0;
  }
  if (dtype == 1) {
    gn_fwd<uint16_t>(x, y, layout, N, C, L, G, w, b, eps, mean, invstd, nt);
    return 0;
  }
  return 1;
}

// Group norm backward from g = dL/dy and the saved input x and statistics: writes dx (if
// not null), dw = sum(g * x_hat) and db = sum(g) (float32, C each, summed in double).
int normlab_gn_bwd(const void* g, const void* x, void* dx, int dtype, int layout, int64_t N,
                   int64_t C, int64_t L, int64_t G, const float* w, const double* mean,
                   const double* invstd, float* dw, float* db, int nt) {
  if (bad_shape(layout, N, C, L, G)) return 2;
  if (dtype == 0) {
    gn_bwd<float>(g, x, dx, layout, N, C, L, G, w, mean, invstd, dw, db, nt);
    return 0;
  }
  if (dtype == 1) {
    gn_bwd<uint16_t>(g, x, dx, layout, N, C, L, G, w, mean, invstd, dw, db, nt);
    return 0;
  }
  return 1;
}

}  // extern "C"
