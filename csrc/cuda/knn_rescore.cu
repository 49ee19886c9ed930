// nformer::knn_rescore on CUDA: checks and launch of the warp-per-row kernel in knn_rescore_kernels.cuh.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/knn_rescore_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

void launch_rescore(const at::Tensor& x, const at::Tensor& cand, const at::Tensor& margin, at::Tensor& idx,
                    at::Tensor& certified, int k) {
  const int64_t rows = x.size(0) * x.size(1);
  const int kc = static_cast<int>(cand.size(2));
  const size_t smem = rescore_smem_bytes(kc);
  const size_t have = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= have, "nformer::knn_rescore (CUDA): K'=", kc, " candidates need ", smem,
              " bytes of shared memory per block but this GPU allows ", have, "; the largest K' here is ",
              rescore_max_candidates(have));
  set_dynamic_smem(knn_rescore_kernel, smem);
  knn_rescore_kernel<<<rescore_blocks(rows), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), cand.data_ptr<int64_t>(), margin.data_ptr<double>(), idx.data_ptr<int64_t>(),
      certified.data_ptr<bool>(), rows, static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), kc, k,
      static_cast<int>(rescore_slice_bytes(kc)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> knn_rescore_cuda(const at::Tensor& x, const at::Tensor& candidates, int64_t k,
                                                    const at::Tensor& margin) {
  check_cuda_input(x, "knn_rescore", "x", x.device());
  check_cuda_input(candidates, "knn_rescore", "candidates", x.device());
  check_cuda_input(margin, "knn_rescore", "margin", x.device());
  check_dtype(candidates, at::kLong, "knn_rescore", "candidates");
  TORCH_CHECK(x.dim() == 3, "nformer::knn_rescore (CUDA): x must be (B, N, d), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2);
  TORCH_CHECK(candidates.dim() == 3 && candidates.size(0) == B && candidates.size(1) == N,
              "nformer::knn_rescore (CUDA): candidates must be (B, N, K') = (", B, ", ", N, ", K'), got ",
              candidates.sizes());
  const int64_t kc = candidates.size(2);
  TORCH_CHECK(k >= 1 && k <= kc, "nformer::knn_rescore (CUDA): need 1 <= k <= K', got k=", k, " K'=", kc);
  TORCH_CHECK(margin.sizes() == x.sizes().slice(0, 2), "nformer::knn_rescore (CUDA): margin must be (B, N), got ",
              margin.sizes());
  check_dtype(margin, at::kDouble, "knn_rescore", "margin");
  TORCH_CHECK(x.is_floating_point(), "nformer::knn_rescore (CUDA): x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(N < INT_MAX && d < INT_MAX && kc < INT_MAX && B * N < int64_t(INT_MAX) * kWarps,
              "nformer::knn_rescore (CUDA): x of shape ", x.sizes(), " with K'=", kc, " is too large");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor idx = at::empty({B, N, k}, candidates.options());
  at::Tensor certified = at::empty({B, N}, x.options().dtype(at::kBool));
  if (B * N == 0) return {idx, certified};
  // The values as fp32 (the canonical score's input: fp16/bf16 exactly, fp64 rounded).
  launch_rescore(x.to(at::kFloat).contiguous(), candidates.contiguous(), margin.contiguous(), idx, certified,
                 static_cast<int>(k));
  return {idx, certified};
}

}  // namespace
}  // namespace cuda
}  // namespace nformer

TORCH_LIBRARY_IMPL(nformer, CUDA, m) { m.impl("knn_rescore", &nformer::cuda::knn_rescore_cuda); }
