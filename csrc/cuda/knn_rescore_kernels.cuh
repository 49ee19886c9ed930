// Device code of nformer::knn_rescore (launched from knn_rescore.cu), stage 2 of the two-stage knn:
// one warp per row. Each lane scores its own candidates (c = lane, lane + 32, ...) with the canonical
// score (common/canonical.h: fp64, fixed order, the same bits as every other backend); scores and
// ids sit in the warp's slice of shared memory. Each lane then ranks its candidates against all K'
// (broadcast reads: one address per step) in the order (score desc, id asc, slot asc), writes those
// ranked below k to their slot, and the warp takes the k-th score for the certificate
// (K' >= N) | (c(last candidate) + margin < c_(k)). No block-wide barrier.
#pragma once
#include "common/canonical.h"
#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {
namespace {

// Launch choices shared by knn_rescore.cu and the CPU emulation: one warp per row, kWarps rows
// per block; per warp, K' fp64 scores then K' int32 ids (N < 2^31), 16-byte aligned slices.
constexpr size_t kScoreBytes = sizeof(double);
constexpr int rescore_blocks(int64_t rows) { return static_cast<int>((rows + kWarps - 1) / kWarps); }
constexpr size_t rescore_slice_bytes(int kc) { return (size_t(kc) * (kScoreBytes + sizeof(int)) + 15) / 16 * 16; }
constexpr size_t rescore_smem_bytes(int kc) { return kWarps * rescore_slice_bytes(kc); }
// The largest K' whose slices fit in `smem_bytes`.
constexpr int64_t rescore_max_candidates(size_t smem_bytes) {
  return int64_t(smem_bytes / kWarps / 16 * 16 / (kScoreBytes + sizeof(int)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int m = kWarpSize / 2; m > 0; m /= 2) {
    const acc_t o = __shfl_xor_sync(kFullMask, v, m);
    v = o > v ? o : v;
  }
  return v;
}

__global__ void __launch_bounds__(kThreads) knn_rescore_kernel(
    const float* __restrict__ x, const int64_t* __restrict__ cand, const double* __restrict__ margin,
    int64_t* __restrict__ idx, bool* __restrict__ certified, int64_t rows, int n, int d, int kc, int k,
    int slice_bytes) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t row = int64_t(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // whole warp
  double* sc = reinterpret_cast<double*>(smem + warp * slice_bytes);
  int* ids = reinterpret_cast<int*>(sc + kc);
  const int64_t row0 = row - row % n;
  const int self = static_cast<int>(row - row0);
  const float* xi = x + row * d;
  for (int c = lane; c < kc; c += kWarpSize) {
    const int j = static_cast<int>(cand[row * kc + c]);
    ids[c] = j;
    sc[c] = canonical_dot(xi, x + (row0 + j) * d, d);
  }
  __syncwarp();
  const double last = sc[kc - 1];
  __syncwarp();
  for (int c = lane; c < kc; c += kWarpSize)
    if (ids[c] == self) sc[c] = INFINITY;  // self first
  __syncwarp();
  double kth = -INFINITY;
  for (int c = lane; c < kc; c += kWarpSize) {
    const double s = sc[c];
    const int id = ids[c];
    int rank = 0;
    for (int c2 = 0; c2 < kc; ++c2) {
      const double s2 = sc[c2];
      const int id2 = ids[c2];
      rank += ranks_before(s2, id2, s, id) || (s2 == s && id2 == id && c2 < c);  // slot breaks a repeated id
    }
    if (rank < k) idx[row * k + rank] = id;
    if (rank == k - 1) kth = s;
  }
  kth = warp_max(kth);  // only the lane holding rank k-1 has more than -inf
  if (lane == 0) certified[row] = kc >= n || last + margin[row] < kth;
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
