// Device code of nformer::knn_rescore (launched from knn_rescore.cu), stage 2 of the certified
// knn: one warp per row. For each candidate in turn the 32 lanes split the d features of the
// dot product (acc_t accumulation) and a butterfly shuffle sum gives every lane the same score;
// scores and ids sit in the warp's slice of shared memory. Each lane then ranks its candidates
// against all K' (broadcast reads: one address per step) in the order (score desc, id asc, slot
// asc), writes those ranked below k to their slot, and the warp takes the k-th score for the
// certificate (K' >= N) | (s(last candidate) + margin < s_(k)). No block-wide barrier.
#pragma once
#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {
namespace {

// Launch choices shared by knn_rescore.cu and the CPU emulation: one warp per row, kWarps rows
// per block; per warp, K' scores then K' int32 ids (N < 2^31), 16-byte aligned slices.
constexpr int rescore_blocks(int64_t rows) { return static_cast<int>((rows + kWarps - 1) / kWarps); }
constexpr size_t rescore_slice_bytes(int kc, size_t acc_size) {
  return (size_t(kc) * (acc_size + sizeof(int)) + 15) / 16 * 16;
}
constexpr size_t rescore_smem_bytes(int kc, size_t acc_size) { return kWarps * rescore_slice_bytes(kc, acc_size); }
// The largest K' whose slices fit in `smem_bytes`.
constexpr int64_t rescore_max_candidates(size_t smem_bytes, size_t acc_size) {
  return int64_t(smem_bytes / kWarps / 16 * 16 / (acc_size + sizeof(int)));
}

// Every lane gets the same sum: each butterfly step adds the same two values on both lanes.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int m = kWarpSize / 2; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int m = kWarpSize / 2; m > 0; m /= 2) {
    const acc_t o = __shfl_xor_sync(kFullMask, v, m);
    v = o > v ? o : v;
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) knn_rescore_kernel(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ cand, const scalar_t* __restrict__ margin,
    int64_t* __restrict__ idx, bool* __restrict__ certified, int64_t rows, int n, int d, int kc, int k,
    int slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // whole warp
  acc_t* sc = reinterpret_cast<acc_t*>(smem + warp * slice_bytes);
  int* ids = reinterpret_cast<int*>(sc + kc);
  const int64_t row0 = row - row % n;
  const int self = static_cast<int>(row - row0);
  for (int c = lane; c < kc; c += kWarpSize) ids[c] = static_cast<int>(cand[row * kc + c]);
  __syncwarp();
  const scalar_t* xi = x + row * d;
  acc_t last = 0;
  for (int c = 0; c < kc; ++c) {
    const int j = ids[c];
    const scalar_t* xj = x + (row0 + j) * d;
    acc_t part = 0;
    for (int e = lane; e < d; e += kWarpSize) part += acc_t(xi[e]) * acc_t(xj[e]);
    const acc_t s = warp_sum(part);
    if (c == kc - 1) last = s;
    if (lane == 0) sc[c] = j == self ? acc_t(INFINITY) : s;  // self first
  }
  __syncwarp();
  acc_t kth = -INFINITY;
  for (int c = lane; c < kc; c += kWarpSize) {
    const acc_t s = sc[c];
    const int id = ids[c];
    int rank = 0;
    for (int c2 = 0; c2 < kc; ++c2) {
      const acc_t s2 = sc[c2];
      const int id2 = ids[c2];
      rank += ranks_before(s2, id2, s, id) || (s2 == s && id2 == id && c2 < c);  // slot breaks a repeated id
    }
    if (rank < k) idx[row * k + rank] = id;
    if (rank == k - 1) kth = s;
  }
  kth = warp_max(kth);  // only the lane holding rank k-1 has more than -inf
  if (lane == 0) certified[row] = kc >= n || last + acc_t(margin[row]) < kth;
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
