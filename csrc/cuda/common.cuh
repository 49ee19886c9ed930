// Host-side helpers shared by the CUDA launchers of the `nformer` ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/device_common.cuh"

namespace nformer {
namespace cuda {

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` must live on `device` (a CUDA device) and be contiguous: kernels index raw pointers.
inline void check_cuda_input(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "nformer::", op, " (CUDA): ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "nformer::", op, " (CUDA): ", name, " is on ", t.device(),
              " but the first input is on ", device);
  TORCH_CHECK(t.is_contiguous(), "nformer::", op, " (CUDA): ", name, " must be contiguous");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "nformer::", op, " (CUDA): ", name, " must be ", want, ", got ",
              t.scalar_type());
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Kernels needing more than the default 48 KiB of dynamic shared memory must opt in.
template <typename Kernel>
void set_dynamic_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace nformer
