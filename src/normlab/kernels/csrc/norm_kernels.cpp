// normlab's fused normalization kernels: plain C++ with a C ABI, compiled at first use
// by normlab.kernels._build and called through ctypes (no torch headers, so the build
// takes about a second instead of minutes).
//
// Layouts: "NCL" is a contiguous (N, C, L) tensor (NCHW with L = H*W); "NLC" is a
// contiguous (M, C) matrix of rows (channels_last: M = N*H*W). dtype 0 is float32,
// 1 is bfloat16 (read into float, rounded to nearest even on store).
//
// Numerics (the same as normlab.stats, or better): the mean is found in two passes,
// the second correcting the first (Bjorck's corrected two-pass algorithm): shift =
// mean estimate, then mean = shift + sum(x - shift)/n, var = sum((x - shift)^2)/n -
// (mean - shift)^2. Partial sums are float over at most 4096 elements (or one tile of
// rows), accumulated in double; tiles of channels_last rows are merged with Chan's
// formula. x - shift is exact when x is near the shift (Sterbenz), so 1e4 + N(0, 1)
// normalizes to float32 rounding. Outputs are computed as (x - shift) * a + b', never
// as x * a + b with a large cancelling b.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace normlab_kernels;


// Activations: 0 identity, 1 relu, 2 leaky relu (slope).
template <int ACT>
inline float act(float y, float slope) {
  if (ACT == 0) return y;
  if (ACT == 1) return y > 0.f ? y : 0.f;
  return y > 0.f ? y : y * slope;
}
// d act / d y, from the activation's output z (valid for slope > 0 and for relu).
template <int ACT>
inline float dact(float z, float slope) {
  if (ACT == 0) return 1.f;
  if (ACT == 1) return z > 0.f ? 1.f : 0.f;
  return z >= 0.f ? 1.f : slope;
}
// y from z = act(y) (identity and leaky relu only).
template <int ACT>
inline float inv_act(float z, float slope) {
  if (ACT == 0) return z;
  return z >= 0.f ? z : z / slope;
}

template <typename T>
inline double shifted_sum(const T* p, int64_t len, float k) {
  double s = 0.0;
  for (int64_t b = 0; b < len; b += kChunk) {
    const int64_t e = std::min(len, b + kChunk);
    float a[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes)
      for (int j = 0; j < kLanes; ++j) a[j] += ld(p, i + j) - k;
    float t = 0.f;
    for (; i < e; ++i) t += ld(p, i) - k;
    for (int j = 0; j < kLanes; ++j) t += a[j];
    s += t;
  }
  return s;
}

// ------------------------------------------------------------------ batch norm, NCL

template <typename T, int ACT>
void bn_fwd_ncl(const T* x, T* y, int64_t N, int64_t C, int64_t L, const float* w,
                const float* b, double eps, float slope, double* mean_out, double* invstd_out,
                float* stats_out, int nt) {
  const double cnt = static_cast<double>(N) * L;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < C; ++c) {
    // Shift by the mean of the channel's first row (a cheap, close estimate), then one
    // pass of shifted sums. If the estimate was far off ((mean - shift)^2 > var: the
    // shifted sums would cancel), a second pass about the first pass's mean corrects it.
    const int64_t head = std::min<int64_t>(L, kChunk);
    float shift = static_cast<float>(ld(x, c * L) + shifted_sum(x + c * L, head, ld(x, c * L)) / head);
    double t1 = 0.0, t2 = 0.0;
    for (int64_t n = 0; n < N; ++n) shifted_sums(x + (n * C + c) * L, L, shift, t1, t2);
    {
      const double d = t1 / cnt;
      if (!(d * d <= t2 / cnt - d * d)) {  // also taken for NaN, which then stays NaN
        shift = static_cast<float>(shift + d);
        t1 = 0.0;
        t2 = 0.0;
        for (int64_t n = 0; n < N; ++n) shifted_sums(x + (n * C + c) * L, L, shift, t1, t2);
      }
    }
    const double delta = t1 / cnt;
    // std::max(NaN, 0.0) is NaN: a NaN channel stays NaN.
    const double var = std::max(t2 / cnt - delta * delta, 0.0);
    mean_out[c] = shift + delta;
    const double invstd = 1.0 / std::sqrt(var + eps);
    invstd_out[c] = invstd;
    if (stats_out) {
      stats_out[c] = static_cast<float>(shift + delta);
      stats_out[C + c] = static_cast<float>(var * cnt / (cnt - 1.0));
    }
    const double a = (w ? w[c] : 1.0) * invstd;
    const float af = static_cast<float>(a);
    const float bf = static_cast<float>((b ? b[c] : 0.0) - delta * a);
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = x + (n * C + c) * L;
      T* yr = y + (n * C + c) * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) st(yr, l, act<ACT>((ld(xr, l) - shift) * af + bf, slope));
    }
  }
}

// Backward from the saved input (FROM_OUT = 0) or from the saved output z (FROM_OUT = 1,
// the memory-saving mode: x_hat = (inv_act(z) - b) / w).
template <typename T, int ACT, int FROM_OUT>
void bn_bwd_ncl(const T* g, const T* s, T* dx, int64_t N, int64_t C, int64_t L,
                const float* w, const float* b, const double* mean, const double* invstd,
                float slope, double* dw, double* db, int nt) {
  const double cnt = static_cast<double>(N) * L;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < C; ++c) {
    const double wc = w ? w[c] : 1.0;
    const float shift = static_cast<float>(mean[c]);
    const double delta = mean[c] - shift;
    const double is = invstd[c];
    // FROM_OUT: x_hat = (inv_act(z) - b) * rw
    const float bz = static_cast<float>(b ? b[c] : 0.0);
    const float rw = static_cast<float>(1.0 / wc);
    double sg = 0.0, sgx = 0.0;  // sum(dy), sum(dy * (x - shift)) or sum(dy * x_hat)
    for (int64_t n = 0; n < N; ++n) {
      const T* gr = g + (n * C + c) * L;
      const T* sr = s + (n * C + c) * L;
      for (int64_t b0 = 0; b0 < L; b0 += kChunk) {
        const int64_t e = std::min(L, b0 + kChunk);
        float a1[kLanes] = {}, a2[kLanes] = {};
        float t1 = 0.f, t2 = 0.f;
        const float af = static_cast<float>(wc * is);
        const float bf = static_cast<float>((b ? b[c] : 0.0) - delta * wc * is);
        auto term = [&](int64_t l, float& u1, float& u2) {
          if (FROM_OUT) {
            const float z = ld(sr, l);
            const float dy = ld(gr, l) * dact<ACT>(z, slope);
            u1 += dy;
            u2 += dy * ((inv_act<ACT>(z, slope) - bz) * rw);
          } else {
            const float xc = ld(sr, l) - shift;
            float dy = ld(gr, l);
            if (ACT != 0) dy *= dact<ACT>(act<ACT>(xc * af + bf, slope), slope);
            u1 += dy;
            u2 += dy * xc;
          }
        };
        int64_t l = b0;
        for (; l + kLanes <= e; l += kLanes)
          for (int j = 0; j < kLanes; ++j) term(l + j, a1[j], a2[j]);
        for (; l < e; ++l) term(l, t1, t2);
        for (int j = 0; j < kLanes; ++j) {
          t1 += a1[j];
          t2 += a2[j];
        }
        sg += t1;
        sgx += t2;
      }
    }
    // sum(dy * x_hat)
    const double sgxh = FROM_OUT ? sgx : is * (sgx - delta * sg);
    dw[c] = sgxh;
    db[c] = sg;
    if (!dx) continue;
    const double a = wc * is;
    const float af = static_cast<float>(a);
    const float bf = static_cast<float>((b ? b[c] : 0.0) - delta * a);
    if (FROM_OUT) {
      // dx = a * (dy - sg/n - x_hat * sgxh/n)
      const float k1 = static_cast<float>(-a * sg / cnt);
      const float k2 = static_cast<float>(-a * sgxh / cnt);
      for (int64_t n = 0; n < N; ++n) {
        const T* gr = g + (n * C + c) * L;
        const T* sr = s + (n * C + c) * L;
        T* dr = dx + (n * C + c) * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const float z = ld(sr, l);
          const float dy = ld(gr, l) * dact<ACT>(z, slope);
          const float xh = (inv_act<ACT>(z, slope) - bz) * rw;
          st(dr, l, af * dy + k2 * xh + k1);
        }
      }
    } else {
      // x_hat = (xc - delta) * is;  dx = a*dy + k2*xc + k1
      const double k2d = -a * is * sgxh / cnt;
      const float k2 = static_cast<float>(k2d);
      const float k1 = static_cast<float>(-a * sg / cnt - k2d * delta);
      for (int64_t n = 0; n < N; ++n) {
        const T* gr = g + (n * C + c) * L;
        const T* sr = s + (n * C + c) * L;
        T* dr = dx + (n * C + c) * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) {
          const float xc = ld(sr, l) - shift;
          float dy = ld(gr, l);
          if (ACT != 0) dy *= dact<ACT>(act<ACT>(xc * af + bf, slope), slope);
          st(dr, l, af * dy + k2 * xc + k1);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ batch norm, NLC

inline int64_t tile_rows(int64_t C) { return std::max<int64_t>(4, 16384 / std::max<int64_t>(C, 1)); }

struct Chan {
  double n = 0.0;
  std::vector<double> mean, m2;
  explicit Chan(int64_t C) : mean(C, 0.0), m2(C, 0.0) {}
  void merge(double nb, const double* mb, const double* m2b, int64_t C) {
    if (nb == 0.0) return;
    const double tot = n + nb;
    for (int64_t c = 0; c < C; ++c) {
      const double d = mb[c] - mean[c];
      mean[c] += d * nb / tot;
      m2[c] += m2b[c] + d * d * n * nb / tot;
    }
    n = tot;
  }
};

template <typename T, int ACT>
void bn_fwd_nlc(const T* x, T* y, int64_t M, int64_t C, const float* w, const float* b,
                double eps, float slope, double* mean_out, double* invstd_out, float* stats_out,
                int nt) {
  const int64_t R = tile_rows(C);
  const int64_t tiles = (M + R - 1) / R;
  std::vector<float> k(C);
  for (int64_t c = 0; c < C; ++c) k[c] = ld(x, c);
  Chan total(C);
#pragma omp parallel num_threads(nt)
  {
    Chan mine(C);
    std::vector<float> s1(C), s2(C), tm(C);
    std::vector<double> tmean(C), tm2(C);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * R, r1 = std::min(M, r0 + R);
      const float rows = static_cast<float>(r1 - r0);
      // pass a: the tile's mean, about the global shift k
      std::fill(s1.begin(), s1.end(), 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * C;
        float* s1p = s1.data();
        const float* kp = k.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) s1p[c] += ld(xr, c) - kp[c];
      }
      for (int64_t c = 0; c < C; ++c) tm[c] = k[c] + s1[c] / rows;
      // pass b (in cache): sums of (x - tile mean) and its square
      std::fill(s1.begin(), s1.end(), 0.f);
      std::fill(s2.begin(), s2.end(), 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * C;
        float* s1p = s1.data();
        float* s2p = s2.data();
        const float* tp = tm.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = ld(xr, c) - tp[c];
          s1p[c] += d;
          s2p[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        const double d1 = static_cast<double>(s1[c]) / rows;
        tmean[c] = tm[c] + d1;
        tm2[c] = std::max(static_cast<double>(s2[c]) - s1[c] * d1, 0.0);
      }
      mine.merge(rows, tmean.data(), tm2.data(), C);
    }
#pragma omp critical
    total.merge(mine.n, mine.mean.data(), mine.m2.data(), C);
  }
  std::vector<float> shift(C), af(C), bf(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = total.mean[c];
    const double var = total.m2[c] / static_cast<double>(M);
    mean_out[c] = mean;
    invstd_out[c] = 1.0 / std::sqrt(var + eps);
    if (stats_out) {
      stats_out[c] = static_cast<float>(mean);
      stats_out[C + c] = static_cast<float>(var * M / (M - 1.0));
    }
    shift[c] = static_cast<float>(mean);
    const double a = (w ? w[c] : 1.0) * invstd_out[c];
    af[c] = static_cast<float>(a);
    bf[c] = static_cast<float>((b ? b[c] : 0.0) - (mean - shift[c]) * a);
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    const float* sp = shift.data();
    const float* ap = af.data();
    const float* bp = bf.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) st(yr, c, act<ACT>((ld(xr, c) - sp[c]) * ap[c] + bp[c], slope));
  }
}

template <typename T, int ACT, int FROM_OUT>
void bn_bwd_nlc(const T* g, const T* s, T* dx, int64_t M, int64_t C, const float* w,
                const float* b, const double* mean, const double* invstd, float slope,
                double* dw, double* db, int nt) {
  const int64_t R = tile_rows(C);
  const int64_t tiles = (M + R - 1) / R;
  std::vector<float> shift(C), af(C), bf(C), bz(C), rw(C);
  for (int64_t c = 0; c < C; ++c) {
    const double wc = w ? w[c] : 1.0;
    shift[c] = static_cast<float>(mean[c]);
    const double a = wc * invstd[c];
    af[c] = static_cast<float>(a);
    bf[c] = static_cast<float>((b ? b[c] : 0.0) - (mean[c] - shift[c]) * a);
    bz[c] = static_cast<float>(b ? b[c] : 0.0);
    rw[c] = static_cast<float>(1.0 / wc);
  }
  std::vector<double> sg(C, 0.0), sgx(C, 0.0);
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> my_g(C, 0.0), my_gx(C, 0.0);
    std::vector<float> a1(C), a2(C);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * R, r1 = std::min(M, r0 + R);
      std::fill(a1.begin(), a1.end(), 0.f);
      std::fill(a2.begin(), a2.end(), 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        const T* gr = g + r * C;
        const T* sr = s + r * C;
        float* p1 = a1.data();
        float* p2 = a2.data();
        const float* sp = shift.data();
        const float* ap = af.data();
        const float* bp = bf.data();
        const float* bzp = bz.data();
        const float* rwp = rw.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          if (FROM_OUT) {
            const float z = ld(sr, c);
            const float dy = ld(gr, c) * dact<ACT>(z, slope);
            p1[c] += dy;
            p2[c] += dy * ((inv_act<ACT>(z, slope) - bzp[c]) * rwp[c]);
          } else {
            const float xc = ld(sr, c) - sp[c];
            float dy = ld(gr, c);
            if (ACT != 0) dy *= dact<ACT>(act<ACT>(xc * ap[c] + bp[c], slope), slope);
            p1[c] += dy;
            p2[c] += dy * xc;
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        my_g[c] += a1[c];
        my_gx[c] += a2[c];
      }
    }
#pragma omp critical
    for (int64_t c = 0; c < C; ++c) {
      sg[c] += my_g[c];
      sgx[c] += my_gx[c];
    }
  }
  const double cnt = static_cast<double>(M);
  std::vector<float> k1(C), k2(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd[c];
    const double delta = mean[c] - shift[c];
    const double sgxh = FROM_OUT ? sgx[c] : is * (sgx[c] - delta * sg[c]);
    dw[c] = sgxh;
    db[c] = sg[c];
    const double a = (w ? w[c] : 1.0) * is;
    if (FROM_OUT) {
      k1[c] = static_cast<float>(-a * sg[c] / cnt);
      k2[c] = static_cast<float>(-a * sgxh / cnt);
    } else {
      const double k2d = -a * is * sgxh / cnt;
      k2[c] = static_cast<float>(k2d);
      k1[c] = static_cast<float>(-a * sg[c] / cnt - k2d * delta);
    }
  }
  if (!dx) return;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    const T* gr = g + r * C;
    const T* sr = s + r * C;
    T* dr = dx + r * C;
    const float* sp = shift.data();
    const float* ap = af.data();
    const float* bp = bf.data();
    const float* bzp = bz.data();
    const float* rwp = rw.data();
    const float* k1p = k1.data();
    const float* k2p = k2.data();
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      if (FROM_OUT) {
        const float z = ld(sr, c);
        const float dy = ld(gr, c) * dact<ACT>(z, slope);
        const float xh = (inv_act<ACT>(z, slope) - bzp[c]) * rwp[c];
        st(dr, c, ap[c] * dy + k2p[c] * xh + k1p[c]);
      } else {
        const float xc = ld(sr, c) - sp[c];
        float dy = ld(gr, c);
        if (ACT != 0) dy *= dact<ACT>(act<ACT>(xc * ap[c] + bp[c], slope), slope);
        st(dr, c, ap[c] * dy + k2p[c] * xc + k1p[c]);
      }
    }
  }
}

// ------------------------------------------------------------------ dispatch helpers

template <typename T>
int fwd_dispatch(const void* x, void* y, int layout, int64_t N, int64_t C, int64_t L,
                 const float* w, const float* b, double eps, int actk, float slope,
                 double* mean, double* invstd, float* stats, int nt) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
#define NL_FWD(A)                                                                     \
  if (layout == 0)                                                                    \
    bn_fwd_ncl<T, A>(xp, yp, N, C, L, w, b, eps, slope, mean, invstd, stats, nt);     \
  else                                                                                \
    bn_fwd_nlc<T, A>(xp, yp, N * L, C, w, b, eps, slope, mean, invstd, stats, nt);
  switch (actk) {
    case 0: NL_FWD(0) return 0;
    case 1: NL_FWD(1) return 0;
    case 2: NL_FWD(2) return 0;
  }
#undef NL_FWD
  return 1;
}

template <typename T, int FROM_OUT>
int bwd_dispatch2(const void* g, const void* s, void* dx, int layout, int64_t N, int64_t C,
                  int64_t L, const float* w, const float* b, const double* mean,
                  const double* invstd, int actk, float slope, double* dw, double* db,
                  int nt) {
  const T* gp = static_cast<const T*>(g);
  const T* sp = static_cast<const T*>(s);
  T* dp = static_cast<T*>(dx);
#define NL_BWD(A)                                                                       \
  if (layout == 0)                                                                      \
    bn_bwd_ncl<T, A, FROM_OUT>(gp, sp, dp, N, C, L, w, b, mean, invstd, slope, dw, db, nt); \
  else                                                                                  \
    bn_bwd_nlc<T, A, FROM_OUT>(gp, sp, dp, N * L, C, w, b, mean, invstd, slope, dw, db, nt);
  switch (actk) {
    case 0: NL_BWD(0) return 0;
    case 1:
      if (FROM_OUT) return 2;  // relu is not invertible
      NL_BWD(1) return 0;
    case 2: NL_BWD(2) return 0;
  }
#undef NL_BWD
  return 1;
}

}  // namespace

extern "C" {

int normlab_abi_version() { return 1; }

// Training-mode batch norm forward: y = act((x - mean) / sqrt(var + eps) * w + b);
// writes the batch mean and 1/sqrt(var + eps) (double, one per channel) and, if
// stats is not null, float32 [mean (C), unbiased variance (C)] for running statistics.
int normlab_bn_fwd(const void* x, void* y, int dtype, int layout, int64_t N, int64_t C,
                   int64_t L, const float* w, const float* b, double eps, int actk,
                   float slope, double* mean, double* invstd, float* stats, int nt) {
  if (dtype == 0) return fwd_dispatch<float>(x, y, layout, N, C, L, w, b, eps, actk, slope, mean, invstd, stats, nt);
  if (dtype == 1) return fwd_dispatch<uint16_t>(x, y, layout, N, C, L, w, b, eps, actk, slope, mean, invstd, stats, nt);
  return 1;
}

// Backward: g is dL/d(output); s is the saved input x (from_out = 0) or the saved
// output z (from_out = 1). Writes dx (if not null), dw = sum(dy * x_hat), db = sum(dy).
int normlab_bn_bwd(const void* g, const void* s, void* dx, int dtype, int layout, int64_t N,
                   int64_t C, int64_t L, const float* w, const float* b, const double* mean,
                   const double* invstd, int actk, float slope, int from_out, double* dw,
                   double* db, int nt) {
  if (dtype == 0 && from_out == 0)
    return bwd_dispatch2<float, 0>(g, s, dx, layout, N, C, L, w, b, mean, invstd, actk, slope, dw, db, nt);
  if (dtype == 0 && from_out == 1)
    return bwd_dispatch2<float, 1>(g, s, dx, layout, N, C, L, w, b, mean, invstd, actk, slope, dw, db, nt);
  if (dtype == 1 && from_out == 0)
    return bwd_dispatch2<uint16_t, 0>(g, s, dx, layout, N, C, L, w, b, mean, invstd, actk, slope, dw, db, nt);
  if (dtype == 1 && from_out == 1)
    return bwd_dispatch2<uint16_t, 1>(g, s, dx, layout, N, C, L, w, b, mean, invstd, actk, slope, dw, db, nt);
  return 1;
}

}  // extern "C"
