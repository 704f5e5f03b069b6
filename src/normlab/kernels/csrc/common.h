// Helpers shared by normlab's C++ kernels (norm_kernels.cpp, online_kernels.cpp,
// group_kernels.cpp): bfloat16 loads and stores, and the shifted reductions every
// kernel's statistics rest on. Header-only; each kernel file includes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace normlab_kernels {

// Elements per float partial sum, flushed to double after each chunk.
constexpr int64_t kChunk = 4096;
// Independent float partial sums per reduction: several vector registers, so that the
// adds do not wait on each other (with one accumulator the reduction, not memory, would
// set the speed).
constexpr int kLanes = 64;

// dtype 0 is float32, 1 is bfloat16: read into float, rounded to nearest even on store.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  p[i] = static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

// The sum of kLanes partial sums, folded by vector adds and an `omp simd` reduction of
// the last 16 (a serial sum of 64 lanes would cost as much as a row of 256 values).
inline float lanes_sum(const float* a) {
  static_assert(kLanes == 64, "lanes_sum folds 64 lanes");
  float r[16];
  for (int j = 0; j < 16; ++j) r[j] = (a[j] + a[j + 16]) + (a[j + 32] + a[j + 48]);
  float t = 0.f;
#pragma omp simd reduction(+ : t)
  for (int j = 0; j < 16; ++j) t += r[j];
  return t;
}

// s1 += sum(p - k), s2 += sum((p - k)^2) over p[0..len). x - k is exact for x near k
// (Sterbenz), so with k near the mean large offsets cost no accuracy.
template <typename T>
inline void shifted_sums(const T* p, int64_t len, float k, double& s1, double& s2) {
  for (int64_t b = 0; b < len; b += kChunk) {
    const int64_t e = std::min(len, b + kChunk);
    float t1 = 0.f, t2 = 0.f;
    int64_t i = b;
    if (e - b >= kLanes) {
      float a1[kLanes] = {}, a2[kLanes] = {};
      for (; i + kLanes <= e; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float d = ld(p, i + j) - k;
          a1[j] += d;
          a2[j] += d * d;
        }
      }
      t1 = lanes_sum(a1);
      t2 = lanes_sum(a2);
    }
#pragma omp simd reduction(+ : t1, t2)
    for (int64_t r = i; r < e; ++r) {
      const float d = ld(p, r) - k;
      t1 += d;
      t2 += d * d;
    }
    s1 += t1;
    s2 += t2;
  }
}

// sg += sum(g), sgx += sum(g * (x - k)) over [0..len): the sums a backward pass needs.
template <typename T>
inline void grad_sums(const T* g, const T* x, int64_t len, float k, double& sg, double& sgx) {
  for (int64_t b = 0; b < len; b += kChunk) {
    const int64_t e = std::min(len, b + kChunk);
    float t1 = 0.f, t2 = 0.f;
    int64_t i = b;
    if (e - b >= kLanes) {
      float a1[kLanes] = {}, a2[kLanes] = {};
      for (; i + kLanes <= e; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float gv = ld(g, i + j);
          a1[j] += gv;
          a2[j] += gv * (ld(x, i + j) - k);
        }
      }
      t1 = lanes_sum(a1);
      t2 = lanes_sum(a2);
    }
#pragma omp simd reduction(+ : t1, t2)
    for (int64_t r = i; r < e; ++r) {
      const float gv = ld(g, r);
      t1 += gv;
      t2 += gv * (ld(x, r) - k);
    }
    sg += t1;
    sgx += t2;
  }
}

}  // namespace normlab_kernels
