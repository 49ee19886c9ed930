// Device code of nformer::knn_rows (launched from knn_rows.cu): the canonical top-k of R query rows
// (gathered through `rows`) against all N rows, exact by itself (it rescans the rows a two-stage knn
// could not certify), O(R*k) memory.
//
// The score tiles are knn's fp32 FMA tiles (fma_score_tile, no TF32), whose scores f are within beta
// of the canonical ones c (common/canonical.h). One warp per row keeps a list sorted by (c desc,
// id asc) and a gate: the c of its last entry minus beta. A candidate below the gate has c below
// that entry's and cannot enter; each lane scores its candidate at or above it canonically
// (canonical_dot: the same bits as every backend) and the warp inserts those that rank before the
// last entry (warp_insert). Self sits in slot 0 from the start.
#pragma once
#include <climits>

#include "common/canonical.h"
#include "cuda/knn_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

// Launch choices shared by knn_rows.cu and the CPU emulation: kFmaBM query rows per block; shared
// memory: knn's fp32 score tile, then per row k canonical scores (fp64) and k ids.
constexpr size_t kRowsEntryBytes = sizeof(double) + sizeof(int);
constexpr size_t rows_smem_bytes(int k) {
  return size_t(kFmaBM) * fma_lds<float>() * sizeof(float) + size_t(kFmaBM) * k * kRowsEntryBytes;
}
constexpr int64_t rows_max_k(size_t smem_bytes) {
  return smem_bytes < rows_smem_bytes(0) ? 0 : int64_t((smem_bytes - rows_smem_bytes(0)) / (kFmaBM * kRowsEntryBytes));
}
constexpr int rows_blocks(int64_t R) { return static_cast<int>((R + kFmaBM - 1) / kFmaBM); }

__global__ void __launch_bounds__(kThreads, 2) knn_rows_kernel(const float* __restrict__ x,
                                                           const int64_t* __restrict__ q_rows,
                                                           const double* __restrict__ beta,
                                                           int64_t* __restrict__ out, int n, int d, int R, int k) {
  constexpr int BM = kFmaBM, BN = fma_tile_n<float>(), LDS = fma_lds<float>();
  static_assert(size_t(BM) * LDS * sizeof(float) % alignof(double) == 0, "the lists' fp64 scores stay aligned");
  extern __shared__ __align__(128) unsigned char smem[];
  float* S = reinterpret_cast<float*>(smem);
  double* list_c = reinterpret_cast<double*>(smem + size_t(BM) * LDS * sizeof(float));
  int* list_i = reinterpret_cast<int*>(list_c + BM * k);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int r0 = blockIdx.x * BM;
  x += static_cast<int64_t>(blockIdx.y) * n * d;
  q_rows += static_cast<int64_t>(blockIdx.y) * R;
  beta += static_cast<int64_t>(blockIdx.y) * R;
  out += static_cast<int64_t>(blockIdx.y) * R * k;
  for (int e = threadIdx.x; e < BM * k; e += kThreads) {  // slot 0: self (+inf); the rest empty
    const bool self = e % k == 0 && r0 + e / k < R;
    list_c[e] = self ? INFINITY : -INFINITY;
    list_i[e] = self ? static_cast<int>(q_rows[r0 + e / k]) : INT_MAX;
  }
  auto row_of = [&](int r) { return r0 + r < R ? static_cast<int>(q_rows[r0 + r]) : -1; };
  for (int col0 = 0; col0 < n; col0 += BN) {
    fma_score_tile<float, float>(x, row_of, col0, n, d, S);  // its barriers order the lists' updates too
    for (int r = warp; r < BM; r += kWarps) {
      if (r0 + r >= R) break;
      const int q = static_cast<int>(q_rows[r0 + r]);
      const double b = beta[r0 + r];
      const float* xq = x + static_cast<int64_t>(q) * d;
      double* lc = list_c + r * k;
      int* li = list_i + r * k;
#pragma unroll 1
      for (int c = 0; c < BN / kWarpSize; ++c) {
        const int col = col0 + c * kWarpSize + lane;
        const float f = S[r * LDS + c * kWarpSize + lane];
        bool pending = col < n && col != q && double(f) >= lc[k - 1] - b;
        double cs = -INFINITY;
        if (pending) cs = canonical_dot(xq, x + static_cast<int64_t>(col) * d, d);
        pending = pending && ranks_before(cs, col, lc[k - 1], li[k - 1]);
        unsigned mask;
        while ((mask = __ballot_sync(kFullMask, pending)) != 0) {
          const int src = __ffs(mask) - 1;
          warp_insert(lc, li, k, __shfl_sync(kFullMask, cs, src), __shfl_sync(kFullMask, col, src), lane);
          pending = pending && lane != src && ranks_before(cs, col, lc[k - 1], li[k - 1]);
        }
      }
    }
  }
  write_lists<BM>(list_i, out, k, r0, R, warp, lane);  // each warp its own rows' lists
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
