// Device code of nformer::reciprocal_mask and nformer::reverse_index (launched from
// reciprocal.cu): one thread per (row, slot), O(k) each (O(k^2) per row), through the same
// per-element functions as the CPU kernels.
#pragma once
#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {
namespace {

// Launch choice shared by reciprocal.cu and the CPU emulation: grid-stride loops over `total`
// (row, slot) entries, at most 32 blocks per SM.
constexpr int lookup_grid(int64_t total, int sm_count) {
  const int64_t wanted = (total + kThreads - 1) / kThreads, cap = int64_t(sm_count) * 32;
  return static_cast<int>(wanted < cap ? wanted : cap);
}

__global__ void reciprocal_mask_kernel(const int64_t* __restrict__ idx, bool* __restrict__ keep, int64_t total,
                                       int64_t n, int k) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, batch_row0 = row - row % n;
    keep[e] = is_reciprocal(idx + batch_row0 * k, k, row - batch_row0, static_cast<int>(e - row * k));
  }
}

__global__ void reverse_index_kernel(const int64_t* __restrict__ idx, const bool* __restrict__ keep,
                                     int64_t* __restrict__ rev, int64_t total, int64_t n, int k) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / k, batch_row0 = row - row % n;
    rev[e] = reverse_position(idx + batch_row0 * k, keep + batch_row0 * k, k, row - batch_row0,
                              static_cast<int>(e - row * k));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace nformer
