// normlab's fused Online Normalization training step (Chiley et al., NeurIPS 2019):
// online norm -> per-channel affine -> layer scaling (or no ECM), forward and the
// paper's backward, for a contiguous (N, C, L) tensor. Plain C++ with a C ABI, compiled
// with csrc/norm_kernels.cpp into one library by normlab.kernels._build.
//
// The recursions run over the samples in order, so the kernels walk the batch sample by
// sample (the order the method itself takes): for sample n every channel's row is read
// from memory once, its statistics taken, the scan advanced one step for every channel,
// and the same rows (now in cache: C x L elements) read again to write the result. Each
// direction thus moves the bytes of one pass over memory.
//
// Forward, per (n, c) with s a float shift near the row's mean (the mean of its first 16
// values, or of the whole row when that was far off):
//   d1 = mean(x - s), s2 = mean((x - s)^2) - d1^2 (exact for large means, x - s being
//   exact near s), m = s + d1;
//   a = 1/sqrt(var_{n-1} + eps), c0 = (s - mu_{n-1}) a, so y = (x - s) a + c0;
//   z = w y + b; mean_l(z^2) = w^2 a^2 s2 + (w (a d1 + c0) + b)^2 (no cancellation), whose
//   mean over c is layer scaling's per-sample mean square; out = (x - s) A + B.
// Backward, per (n, c): G = sum(g), Gx = sum(g (x - s)); every other sum the paper's
// algorithm needs follows from them and the forward's per-(n, c) values, and
// dx = P g + Q (x - s) + R.
//
// dtype 0 is float32, 1 is bfloat16 (computed in float, rounded to nearest even on store).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

using namespace normlab_kernels;

constexpr int kNc = 5;  // per-(n, c) values kept for backward: s, a, c0, d1, s2

// The affine as double arrays (1 and 0 without one): branch-free, vectorisable loops.
inline void affine_or_identity(const float* w, const float* b, int64_t C,
                               std::vector<double>& wd, std::vector<double>& bd) {
  wd.assign(C, 1.0);
  bd.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    if (w) wd[c] = w[c];
    if (b) bd[c] = b[c];
  }
}

// nc holds, per sample n, kNc planes of C doubles: s (the row's shift, a float value),
// a = 1/sqrt(var_{n-1} + eps), c0 = (s - mu_{n-1}) a, d1 = mean(x - s), s2 = var(x).
template <typename T>
void on_fwd(const T* x, T* y, int64_t N, int64_t C, int64_t L, const float* w,
            const float* b, double alpha, double eps, int ls, double ls_eps, double* mu,
            double* var, double* nc, double* ls_out, int nt) {
  const double Ld = static_cast<double>(L);
  std::vector<float> sf(C), af(C), bf(C);
  std::vector<double> wd, bd;
  affine_or_identity(w, b, C, wd, bd);
  const bool par = nt > 1 && C > 1 && static_cast<double>(C) * L >= 32768.0;
#pragma omp parallel num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    double* q0 = nc + n * kNc * C;  // s
    double* q1 = q0 + C;            // a
    double* q2 = q1 + C;            // c0
    double* q3 = q2 + C;            // d1
    double* q4 = q3 + C;            // s2
    const T* xn = x + n * C * L;
    T* yn = y + n * C * L;
    // Phase 1: the moments of every row of sample n (shifted sums, see below).
    if (L == 1) {
#pragma omp single
      for (int64_t c = 0; c < C; ++c) {
        q0[c] = ld(xn, c);
        q3[c] = 0.0;
        q4[c] = 0.0;
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        const T* xr = xn + c * L;
        // Shift by the mean of the row's first (up to) 16 values, one pass of shifted
        // sums; if that was far from the mean (d1^2 > var: the sums would cancel), a
        // second pass (on the cached row) about the first pass's mean.
        const int64_t head = std::min<int64_t>(L, 16);
        float sh = 0.f;
        for (int64_t l = 0; l < head; ++l) sh += ld(xr, l);
        sh /= static_cast<float>(head);
        double t1 = 0.0, t2 = 0.0;
        shifted_sums(xr, L, sh, t1, t2);
        double d1 = t1 / Ld;
        if (!(d1 * d1 <= t2 / Ld - d1 * d1)) {  // also taken for NaN, which stays NaN
          sh = static_cast<float>(sh + d1);
          t1 = 0.0;
          t2 = 0.0;
          shifted_sums(xr, L, sh, t1, t2);
          d1 = t1 / Ld;
        }
        q0[c] = sh;
        q3[c] = d1;
        q4[c] = std::max(t2 / Ld - d1 * d1, 0.0);  // std::max(NaN, 0.0) is NaN
      }
    }
    // Phase 2 (C values): one step of the scans, layer scaling's mean square, and the
    // output's per-row scale and shift.
#pragma omp single
    {
      double zsq = 0.0;
#pragma omp simd reduction(+ : zsq)
      for (int64_t c = 0; c < C; ++c) {
        const double mu_p = mu[c], var_p = var[c];
        const double a = 1.0 / std::sqrt(var_p + eps);
        const double c0 = (q0[c] - mu_p) * a;
        const double delta = (q0[c] - mu_p) + q3[c];  // m - mu_{n-1}
        var[c] = alpha * var_p + (1.0 - alpha) * q4[c] + alpha * (1.0 - alpha) * delta * delta;
        mu[c] = mu_p + (1.0 - alpha) * delta;
        q1[c] = a;
        q2[c] = c0;
        const double wc = wd[c], bc = bd[c];
        const double zm = wc * (a * q3[c] + c0) + bc;  // mean of z = w y + b
        zsq += wc * wc * a * a * q4[c] + zm * zm;
      }
      const double ls_n = ls ? 1.0 / std::sqrt(zsq / static_cast<double>(C) + ls_eps) : 1.0;
      ls_out[n] = ls_n;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double wc = wd[c], bc = bd[c];
        sf[c] = static_cast<float>(q0[c]);
        af[c] = static_cast<float>(q1[c] * wc * ls_n);
        bf[c] = static_cast<float>((q2[c] * wc + bc) * ls_n);
      }
    }
    // Phase 3: out = (x - s) A + B, from the rows still in cache.
    if (L == 1) {
#pragma omp single
      {
        const float* sp = sf.data();
        const float* ap = af.data();
        const float* bp = bf.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) st(yn, c, (ld(xn, c) - sp[c]) * ap[c] + bp[c]);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        const T* xr = xn + c * L;
        T* yr = yn + c * L;
        const float sh = sf[c], A = af[c], B = bf[c];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) st(yr, l, (ld(xr, l) - sh) * A + B);
      }
    }
  }
}

template <typename T>
void on_bwd(const T* g, const T* x, T* dx, int64_t N, int64_t C, int64_t L, const float* w,
            const float* b, double kb, int ls, const double* nc, const double* ls_in,
            double* u, double* v, double* dw, double* db, int nt) {
  std::vector<double> sg(C), sgx(C);
  std::vector<float> sf(C), pf(C), qf(C), rf(C);
  std::vector<double> wd, bd;
  affine_or_identity(w, b, C, wd, bd);
  const double Ld = static_cast<double>(L);
  const double inv_l = 1.0 / Ld;
  const bool par = nt > 1 && C > 1 && static_cast<double>(C) * L >= 32768.0;
#pragma omp parallel num_threads(nt) if (par)
  for (int64_t n = 0; n < N; ++n) {
    const double* q0 = nc + n * kNc * C;
    const double* q1 = q0 + C;
    const double* q2 = q1 + C;
    const double* q3 = q2 + C;
    const double* q4 = q3 + C;
    const T* gn = g + n * C * L;
    const T* xn = x + n * C * L;
    // Phase 1: sum(g) and sum(g (x - s)) of every row (x - s = 0 when L = 1).
    if (L == 1) {
#pragma omp single
      for (int64_t c = 0; c < C; ++c) {
        sg[c] = ld(gn, c);
        sgx[c] = 0.0;
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        sg[c] = 0.0;
        sgx[c] = 0.0;
        grad_sums(gn + c * L, xn + c * L, L, static_cast<float>(q0[c]), sg[c], sgx[c]);
      }
    }
    // Phase 2 (C values): layer scaling's projection, the affine's gradients, one step of
    // the controllers and the per-row coefficients of dx.
#pragma omp single
    {
      const double lsn = ls_in[n];
      double kn = 0.0;
      if (ls) {
        double t = 0.0;  // sum(g z) over the sample, z = (x - s) a w + (c0 w + b)
#pragma omp simd reduction(+ : t)
        for (int64_t c = 0; c < C; ++c) {
          const double wc = wd[c], bc = bd[c];
          t += q1[c] * wc * sgx[c] + (q2[c] * wc + bc) * sg[c];
        }
        kn = lsn * lsn * lsn * t / (static_cast<double>(C) * Ld);  // dz = ls g - kn z
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double a = q1[c], c0 = q2[c], d1 = q3[c], s2 = q4[c];
        const double wc = wd[c], bc = bd[c];
        const double Az = a * wc, Bz = c0 * wc + bc;
        // sums over the row of dz = dL/dz and of dz (x - s)
        const double sdz = lsn * sg[c] - kn * Ld * (Az * d1 + Bz);
        const double sdzx = lsn * sgx[c] - kn * Ld * (Az * (s2 + d1 * d1) + Bz * d1);
        const double sdzy = a * sdzx + c0 * sdz;  // y = (x - s) a + c0
        dw[c] += sdzy;
        db[c] += sdz;
        // The online-norm backward sees dy = w dz.
        const double g_mean = wc * sdz * inv_l, gy_mean = wc * sdzy * inv_l;
        const double y_mean = a * d1 + c0;
        const double y_sq = a * a * s2 + y_mean * y_mean;
        const double vp = v[c], up = u[c];
        v[c] = (1.0 - kb * y_sq) * vp + gy_mean;
        u[c] = (1.0 - kb) * up + (g_mean - kb * vp * y_mean) * a;
        // dx = dy a - kb vp a y - kb up,  dy = w (ls g - kn ((x - s) Az + Bz))
        sf[c] = static_cast<float>(q0[c]);
        pf[c] = static_cast<float>(wc * lsn * a);
        qf[c] = static_cast<float>(-(wc * kn * Az + kb * vp * a) * a);
        rf[c] = static_cast<float>(-(wc * kn * Bz + kb * vp * c0) * a - kb * up);
      }
    }
    if (!dx) continue;
    T* dn = dx + n * C * L;
    // Phase 3: dx = P g + Q (x - s) + R, from the rows still in cache.
    if (L == 1) {
#pragma omp single
      {
        const float* sp = sf.data();
        const float* pp = pf.data();
        const float* qp = qf.data();
        const float* rp = rf.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          st(dn, c, ld(gn, c) * pp[c] + (ld(xn, c) - sp[c]) * qp[c] + rp[c]);
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c) {
        const T* gr = gn + c * L;
        const T* xr = xn + c * L;
        T* dr = dn + c * L;
        const float sh = sf[c], P = pf[c], Q = qf[c], R = rf[c];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) st(dr, l, ld(gr, l) * P + (ld(xr, l) - sh) * Q + R);
      }
    }
  }
}

}  // namespace

extern "C" {

// Online norm (-> affine w, b if not null -> layer scaling if ls) training forward of a
// contiguous (N, C, L) x. mu, var (C, double): in mu_0, var_0, out mu_N, var_N.
// nc (N, 5, C) and ls_out (N) receive what backward needs.
int normlab_online_fwd(const void* x, void* y, int dtype, int64_t N, int64_t C, int64_t L,
                       const float* w, const float* b, double alpha, double eps, int ls,
                       double ls_eps, double* mu, double* var, double* nc, double* ls_out,
                       int nt) {
  if (dtype == 0)
    on_fwd<float>(static_cast<const float*>(x), static_cast<float*>(y), N, C, L, w, b, alpha,
                  eps, ls, ls_eps, mu, var, nc, ls_out, nt);
  else if (dtype == 1)
    on_fwd<uint16_t>(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), N, C, L, w,
                     b, alpha, eps, ls, ls_eps, mu, var, nc, ls_out, nt);
  else
    return 1;
  return 0;
}

// The paper's backward through layer scaling, the affine and online norm: writes dx (if
// not null) and adds sum(dL/dz * y), sum(dL/dz) to dw, db (C, double); u, v (C, double):
// in u_0, v_0, out u_N, v_N. kb = 1 - alpha_bkw.
int normlab_online_bwd(const void* g, const void* x, void* dx, int dtype, int64_t N,
                       int64_t C, int64_t L, const float* w, const float* b, double kb,
                       int ls, const double* nc, const double* ls_in, double* u, double* v,
                       double* dw, double* db, int nt) {
  if (dtype == 0)
    on_bwd<float>(static_cast<const float*>(g), static_cast<const float*>(x),
                  static_cast<float*>(dx), N, C, L, w, b, kb, ls, nc, ls_in, u, v, dw, db, nt);
  else if (dtype == 1)
    on_bwd<uint16_t>(static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(x),
                     static_cast<uint16_t*>(dx), N, C, L, w, b, kb, ls, nc, ls_in, u, v, dw,
                     db, nt);
  else
    return 1;
  return 0;
}

}  // extern "C"
