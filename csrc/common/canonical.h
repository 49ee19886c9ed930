// The canonical knn score (docs/design.md, "The canonical score"; Python: nformer_kernels/canonical.py),
// shared by the CPU and CUDA kernels. c(a, b) for fp32 rows: the products a[e]*b[e], exact in fp64,
// summed in kLanes interleaved lanes (lane l takes e = l, l + kLanes, ... in order), then the lanes
// folded in halves (s[l] += s[l + h], h = kLanes/2 ... 1). Every step is one correctly rounded fp64
// operation in a fixed order, so the bits are the same on every device, compiler, thread count and
// BLAS (FMA contraction cannot change an exact product), and c(a, b) == c(b, a).
#pragma once
#include <cstdint>

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

NF_HD double canonical_dot(const float* a, const float* b, int64_t d) {
  double s[kCanonicalLanes];
  for (int l = 0; l < kCanonicalLanes; ++l) s[l] = 0.0;
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes)
    for (int l = 0; l < kCanonicalLanes; ++l)
      s[l] = canonical_add(s[l], static_cast<double>(a[e0 + l]) * static_cast<double>(b[e0 + l]));
  for (int l = 0; e0 + l < d; ++l)  // the tail: the lanes past d add the zero padding, i.e. nothing
    s[l] = canonical_add(s[l], static_cast<double>(a[e0 + l]) * static_cast<double>(b[e0 + l]));
  for (int h = kCanonicalLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) s[l] = canonical_add(s[l], s[l + h]);
  return s[0];
}

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// canonical_dot for the CPU kernels, written for the vector units: lanes 0-7 and 8-15 are two
// 8-wide fp64 vectors (two zmm on AVX-512; the clones lower them to ymm or xmm pairs elsewhere).
// Each lane's additions stay in index order, so the bits are canonical_dot's.
NF_CPU_CLONES inline double cpu_canonical_dot(const float* a, const float* b, int64_t d) {
  typedef double v8 __attribute__((vector_size(64)));
  static_assert(kCanonicalLanes == 16, "two 8-wide vectors");
  v8 lo = {0, 0, 0, 0, 0, 0, 0, 0}, hi = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e0 = 0;
  for (; e0 + kCanonicalLanes <= d; e0 += kCanonicalLanes) {
    v8 a0, a1, b0, b1;
    for (int l = 0; l < 8; ++l) {
      a0[l] = a[e0 + l];
      a1[l] = a[e0 + 8 + l];
      b0[l] = b[e0 + l];
      b1[l] = b[e0 + 8 + l];
    }
    lo += a0 * b0;  // exact products: a fused multiply-add rounds the same
    hi += a1 * b1;
  }
  double s[kCanonicalLanes];
  for (int l = 0; l < 8; ++l) {
    s[l] = lo[l];
    s[8 + l] = hi[l];
  }
  for (int l = 0; e0 + l < d; ++l) s[l] += static_cast<double>(a[e0 + l]) * static_cast<double>(b[e0 + l]);
  for (int h = kCanonicalLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) s[l] += s[l + h];
  return s[0];
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
