// Per-element logic shared by the CPU and CUDA kernels, so that CI (CPU only)
// exercises the exact code the GPU runs. Every function compiles under g++ and nvcc:
// math goes through the C functions expf/exp, which both provide.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NF_HD __host__ __device__ __forceinline__
#else
#define NF_HD inline
#endif

// CPU only: compile a hot function for AVX-512 and AVX2+FMA as well as the baseline ISA
// and pick one at load time (the extension itself is built for the baseline ISA).
#if !defined(__CUDACC__) && !defined(__HIPCC__) && defined(__x86_64__) && defined(__linux__) && \
    defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define NF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NF_CPU_CLONES
#endif

namespace nformer {

// The softmax exp. On the GPU the fast intrinsic, explicitly: the extension is built without
// --use_fast_math, whose flush-to-zero would break the knn kernels' error bounds for tiny rows.
NF_HD float nf_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}
NF_HD double nf_exp(double x) { return exp(x); }

// Ordering of candidates in a top-k list: higher score first, then smaller index.
template <typename acc_t>
NF_HD bool ranks_before(acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Insert (s, id) into a list sorted by `ranks_before` that holds `k` entries
// (unused slots hold -INF / INT64_MAX). Returns false (and leaves the list) when
// the candidate does not beat the current k-th entry.
template <typename acc_t>
NF_HD bool topk_insert(acc_t* vals, int64_t* ids, int k, acc_t s, int64_t id) {
  if (!ranks_before(s, id, vals[k - 1], ids[k - 1])) return false;
  int p = k - 1;
  while (p > 0 && ranks_before(s, id, vals[p - 1], ids[p - 1])) {
    vals[p] = vals[p - 1];
    ids[p] = ids[p - 1];
    --p;
  }
  vals[p] = s;
  ids[p] = id;
  return true;
}

// Position of `target` in a neighbour row of length k, or -1.
NF_HD int find_in_row(const int64_t* row, int k, int64_t target) {
  for (int t = 0; t < k; ++t)
    if (row[t] == target) return t;
  return -1;
}

// Reciprocal test for entry t of row i: is i among the neighbours of idx[i,t]?
// `idx` points at the (N,k) neighbour table of one batch item.
NF_HD bool is_reciprocal(const int64_t* idx, int k, int64_t i, int t) {
  return find_in_row(idx + idx[i * k + t] * k, k, i) >= 0;
}

// rev[j,t'] for i = idx[j,t']: the t with idx[i,t] == j and keep[i,t], else -1.
NF_HD int64_t reverse_position(const int64_t* idx, const bool* keep, int k, int64_t j, int tp) {
  const int64_t i = idx[j * k + tp];
  const int t = find_in_row(idx + i * k, k, j);
  return (t >= 0 && keep[i * k + t]) ? t : -1;
}

// In-place masked softmax over k scores: probs where keep, 0 elsewhere.
// All-masked rows give all zeros (never NaN). acc_t is float, or double for fp64 inputs.
template <typename acc_t>
NF_HD void masked_softmax(acc_t* s, const bool* keep, int k) {
  acc_t mx = -INFINITY;
  for (int t = 0; t < k; ++t)
    if (keep[t] && s[t] > mx) mx = s[t];
  if (mx == -INFINITY) {
    for (int t = 0; t < k; ++t) s[t] = 0;
    return;
  }
  acc_t sum = 0;
  for (int t = 0; t < k; ++t) {
    s[t] = keep[t] ? nf_exp(s[t] - mx) : acc_t(0);
    sum += s[t];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int t = 0; t < k; ++t) s[t] *= inv;
}

// Softmax backward for one row: ds = p * (dp - sum_t p*dp), written into dp.
template <typename acc_t>
NF_HD void softmax_backward(const acc_t* p, acc_t* dp, int k) {
  acc_t dot = 0;
  for (int t = 0; t < k; ++t) dot += p[t] * dp[t];
  for (int t = 0; t < k; ++t) dp[t] = p[t] * (dp[t] - dot);
}

}  // namespace nformer
