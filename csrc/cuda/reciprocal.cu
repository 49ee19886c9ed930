// nformer::reciprocal_mask and nformer::reverse_index on CUDA: checks and launches of the
// kernels in reciprocal_kernels.cuh.
#include "cuda/common.cuh"
#include "cuda/reciprocal_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

void check_idx(const at::Tensor& idx, const char* op) {
  check_cuda_input(idx, op, "idx", idx.device());
  check_dtype(idx, at::kLong, op, "idx");
  TORCH_CHECK(idx.dim() == 3, "nformer::", op, " (CUDA): idx must be (B, N, k), got ", idx.sizes());
  TORCH_CHECK(idx.size(2) >= 1 && idx.size(2) <= idx.size(1), "nformer::", op,
              " (CUDA): idx must have 1 <= k <= N, got shape ", idx.sizes());
}

int grid_for(int64_t total) {
  return lookup_grid(total, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

at::Tensor reciprocal_mask_cuda(const at::Tensor& idx) {
  check_idx(idx, "reciprocal_mask");
  c10::cuda::CUDAGuard guard(idx.device());
  at::Tensor keep = at::empty(idx.sizes(), idx.options().dtype(at::kBool));
  const int64_t total = idx.numel();
  if (total == 0) return keep;
  reciprocal_mask_kernel<<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), total, idx.size(1), static_cast<int>(idx.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

at::Tensor reverse_index_cuda(const at::Tensor& idx, const at::Tensor& keep) {
  check_idx(idx, "reverse_index");
  check_cuda_input(keep, "reverse_index", "keep", idx.device());
  check_dtype(keep, at::kBool, "reverse_index", "keep");
  TORCH_CHECK(keep.sizes() == idx.sizes(), "nformer::reverse_index (CUDA): keep ", keep.sizes(),
              " must have idx's shape ", idx.sizes());
  c10::cuda::CUDAGuard guard(idx.device());
  at::Tensor rev = at::empty_like(idx);
  const int64_t total = idx.numel();
  if (total == 0) return rev;
  reverse_index_kernel<<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), rev.data_ptr<int64_t>(), total, idx.size(1),
      static_cast<int>(idx.size(2)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rev;
}

}  // namespace
}  // namespace cuda
}  // namespace nformer

TORCH_LIBRARY_IMPL(nformer, CUDA, m) {
  m.impl("reciprocal_mask", &nformer::cuda::reciprocal_mask_cuda);
  m.impl("reverse_index", &nformer::cuda::reverse_index_cuda);
}
