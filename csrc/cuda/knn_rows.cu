// nformer::knn_rows on CUDA: checks, the per-row bound and the launch of knn_rows_kernels.cuh.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/knn_rows_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

at::Tensor knn_rows_cuda(const at::Tensor& x, const at::Tensor& rows, int64_t k) {
  check_cuda_input(x, "knn_rows", "x", x.device());
  check_cuda_input(rows, "knn_rows", "rows", x.device());
  check_dtype(rows, at::kLong, "knn_rows", "rows");
  TORCH_CHECK(x.dim() == 3, "nformer::knn_rows (CUDA): x must be (B, N, d), got ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "nformer::knn_rows (CUDA): x must be floating point, got ", x.scalar_type());
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == B, "nformer::knn_rows (CUDA): rows must be (B, R) with B=", B,
              ", got ", rows.sizes());
  TORCH_CHECK(k >= 1 && k <= N, "nformer::knn_rows (CUDA): k must be in [1, N=", N, "], got ", k);
  const int64_t R = rows.size(1);
  TORCH_CHECK(N < INT_MAX && d < INT_MAX && R < INT_MAX && B <= 65535, "nformer::knn_rows (CUDA): x of shape ",
              x.sizes(), " with ", R, " rows is too large (need N, d, R < 2^31 and B <= 65535)");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, R, k}, rows.options());
  if (B * R == 0) return out;
  const at::Tensor rc = rows.contiguous();
  auto [lo, hi] = at::aminmax(rc);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < N, "nformer::knn_rows (CUDA): rows must lie in [0, N)");
  const size_t smem = rows_smem_bytes(static_cast<int>(k));
  const size_t have = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= have, "nformer::knn_rows (CUDA): k=", k, " needs ", smem, " bytes of shared memory per block "
              "but this GPU allows ", have, "; the largest k supported here is ", rows_max_k(have));
  // The values as fp32 (the canonical score's input: fp16/bf16 exactly, fp64 rounded); beta per query
  // row from its norm and the largest (common/canonical.h).
  const at::Tensor xf = x.detach().to(at::kFloat).contiguous();
  const at::Tensor norms = at::linalg_vector_norm(xf, 2, at::IntArrayRef{-1}, false, at::kDouble).mul_(kNormPad);
  const at::Tensor top = std::get<0>(norms.max(-1, true));
  const at::Tensor beta = norms.gather(1, rc).mul_(top).mul_(0.5 * fp32_score_bound2_factor(d)).contiguous();
  set_dynamic_smem(knn_rows_kernel, smem);
  knn_rows_kernel<<<dim3(rows_blocks(R), B), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      xf.data_ptr<float>(), rc.data_ptr<int64_t>(), beta.data_ptr<double>(), out.data_ptr<int64_t>(),
      static_cast<int>(N), static_cast<int>(d), static_cast<int>(R), static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace nformer

TORCH_LIBRARY_IMPL(nformer, CUDA, m) { m.impl("knn_rows", &nformer::cuda::knn_rows_cuda); }
