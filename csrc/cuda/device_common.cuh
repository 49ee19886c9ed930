// Device-side helpers shared by the CUDA kernels (no ATen / host API here: the kernel
// headers *_kernels.cuh include only this, so they compile without the host runtime).
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/neighbor_logic.h"

namespace nformer {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / kWarpSize;

// Scores, softmax and every reduction run in fp32, or fp64 for fp64 inputs.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// N elements loaded/stored with one vector instruction (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace cuda
}  // namespace nformer
