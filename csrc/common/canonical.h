// The canonical knn score (docs/design.md, "The canonical score"; Python: nformer_kernels/canonical.py),
// shared by the CPU and CUDA kernels. c(a, b) for fp32 rows: the products a[e]*b[e], exact in fp64,
// summed in kLanes interleaved lanes (lane l takes e = l, l + kLanes, ... in order), then the lanes
// folded in halves (s[l] += s[l + h], h = kLanes/2 ... 1). Every step is one correctly rounded fp64
// operation in a fixed order, so the bits are the same on every device, compiler, thread count and
// BLAS (FMA contraction cannot change an exact product), and c(a, b) == c(b, a).
#pragma once
#include <cstdint>
#if defined(__x86_64__) && !defined(__CUDACC__) && !defined(__HIPCC__)
#include <immintrin.h>
#endif

#include "common/neighbor_logic.h"

namespace nformer {

constexpr int kCanonicalLanes = 16;

NF_HD double canonical_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);  // never contracted, whatever --use_fast_math says
#else
  return a + b;
#endif
}

// The tail (elements e0.. of a, b into lanes 0..) and the fold of the lane sums s: the end of
// canonical_dot, shared with the CPU's vectorised body.
NF_HD double canonical_finish(double* s, const float* a, const float* b, int64_t e0, int64_t d) {
  for (int l = 0; e0 + l < d; ++l)  // the lanes past d add the zero padding, i.e. nothing
    s[l] = canonical_add(s[l], static_cast<double>(a[e0 + l]) * static_cast<double>(b[e0 + l]));
  for (int h = kCanonicalLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) s[l] = canonical_add(s[l], s[l + h]);
  return s[0];
}

NF_HD double canonical_dot(const float* a, const float* b, int64_t d) {
  double s[kCanonicalLanes];
  for (int l = 0; l < kCanonicalLanes; ++l) s[l] = 0.0;
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes)
    for (int l = 0; l < kCanonicalLanes; ++l)
      s[l] = canonical_add(s[l], static_cast<double>(a[e0 + l]) * static_cast<double>(b[e0 + l]));
  return canonical_finish(s, a, b, e0, d);
}

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// canonical_dot for the CPU kernels. With AVX2/FMA (every x86-64 CPU of the last decade) lanes
// 0-15 are four 4-wide fp64 vectors, each widened from 4 floats by one vcvtps2pd; GCC's generic
// vectors lower that widening lane by lane, hence the intrinsics. Each lane's additions stay in
// index order and the products are exact (an FMA rounds as mul + add), so the bits are
// canonical_dot's on every path.
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline double cpu_canonical_dot_avx2(const float* a, const float* b,
                                                                         int64_t d) {
  static_assert(kCanonicalLanes == 16, "four 4-wide vectors");
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes)
    for (int q = 0; q < 4; ++q)
      acc[q] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + e0 + 4 * q)),
                               _mm256_cvtps_pd(_mm_loadu_ps(b + e0 + 4 * q)), acc[q]);
  alignas(32) double s[kCanonicalLanes];
  for (int q = 0; q < 4; ++q) _mm256_store_pd(s + 4 * q, acc[q]);
  return canonical_finish(s, a, b, e0, d);
}

// Whether this CPU runs the AVX2/FMA paths (checked once).
inline bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

inline double cpu_canonical_dot(const float* a, const float* b, int64_t d) {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return cpu_canonical_dot_avx2(a, b, d);
#endif
  return canonical_dot(a, b, d);
}

#if defined(__x86_64__)
// c(q, keys[t]) for four keys: lanes 0-15 of each are two 8-wide fp64 vectors (the lane layout of
// cpu_canonical_dot_avx2), and the query is widened once for the four. Four keys give eight
// independent addition chains, so the loop runs at the FMA/convert throughput instead of waiting
// on one chain's latency.
__attribute__((target("avx512f"))) inline void cpu_canonical_dots4_avx512(const float* q, const float* const* keys,
                                                                        int64_t d, double* out) {
  static_assert(kCanonicalLanes == 16, "two 8-wide vectors");
  __m512d acc[4][2];
  for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_pd();
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes) {
    const __m512d q0 = _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(q + e0)), q1 = _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(q + e0 + 8));
    for (int t = 0; t < 4; ++t) {
      acc[t][0] = _mm512_fmadd_pd(q0, _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(keys[t] + e0)), acc[t][0]);
      acc[t][1] = _mm512_fmadd_pd(q1, _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(keys[t] + e0 + 8)), acc[t][1]);
    }
  }
  alignas(64) double s[kCanonicalLanes];
  for (int t = 0; t < 4; ++t) {
    _mm512_store_pd(s, acc[t][0]);
    _mm512_store_pd(s + 8, acc[t][1]);
    out[t] = canonical_finish(s, q, keys[t], e0, d);
  }
}

// The same for two keys with AVX2 (eight chains of 4-wide vectors).
__attribute__((target("avx2,fma"))) inline void cpu_canonical_dots2_avx2(const float* q, const float* const* keys,
                                                                       int64_t d, double* out) {
  __m256d acc[2][4];
  for (int t = 0; t < 2; ++t)
    for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_setzero_pd();
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes)
    for (int v = 0; v < 4; ++v) {
      const __m256d qv = _mm256_cvtps_pd(_mm_loadu_ps(q + e0 + 4 * v));
      for (int t = 0; t < 2; ++t)
        acc[t][v] = _mm256_fmadd_pd(qv, _mm256_cvtps_pd(_mm_loadu_ps(keys[t] + e0 + 4 * v)), acc[t][v]);
    }
  alignas(32) double s[kCanonicalLanes];
  for (int t = 0; t < 2; ++t) {
    for (int v = 0; v < 4; ++v) _mm256_store_pd(s + 4 * v, acc[t][v]);
    out[t] = canonical_finish(s, q, keys[t], e0, d);
  }
}
#endif

// out[t] = c(q, keys[t]) for t < n, bit for bit cpu_canonical_dot: one query against many keys is
// the common case (a row's candidates), and batching the keys hides the additions' latency.
// Key rows are usually scattered (and out of cache): the next batch's rows are fetched meanwhile.
inline void cpu_canonical_dots(const float* q, const float* const* keys, int64_t n, int64_t d, double* out) {
  auto fetch = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1 && t < n; ++t)
      for (int64_t b = 0; b < d * int64_t(sizeof(float)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(keys[t]) + b);
  };
  int64_t t = 0;
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) {
    fetch(0, 4);
    for (; t + 4 <= n; t += 4) fetch(t + 4, t + 8), cpu_canonical_dots4_avx512(q, keys + t, d, out + t);
  }
  if (cpu_has_avx2_fma()) {  // without AVX-512, or its remainder (so every path runs on an AVX-512 CPU too)
    fetch(t, t + 2);
    for (; t + 2 <= n; t += 2) fetch(t + 2, t + 4), cpu_canonical_dots2_avx2(q, keys + t, d, out + t);
  }
#endif
  for (; t < n; ++t) out[t] = cpu_canonical_dot(q, keys[t], d);
}
#endif

// Twice the bound on |fp32 stage score - canonical score| for rows of norms norm_i and max_norm
// (nformer_kernels.canonical.score_error_bound, fp32 stage): gamma_d(2^-24) + gamma_d(2^-53) times
// the norms (each padded by kNormPad for its own rounding), 1% headroom.
constexpr double kNormPad = 1.0 + 9.5367431640625e-07;  // 1 + 2^-20

NF_HD double fp32_score_bound2_factor(int64_t d) {
  const double dd = static_cast<double>(d), u24 = 5.9604644775390625e-08, u53 = 1.1102230246251565e-16;
  return 2.0 * 1.01 * (dd * u24 / (1.0 - dd * u24) + dd * u53 / (1.0 - dd * u53));
}

inline double fp32_score_bound2(int64_t d, double norm_i, double max_norm) {
  return fp32_score_bound2_factor(d) * (norm_i * kNormPad) * (max_norm * kNormPad);
}

}  // namespace nformer
