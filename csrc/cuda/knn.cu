// nformer::knn on CUDA: checks, tile-size choice and launch of the kernels in knn_kernels.cuh.
#include <cstdlib>
#include <string>

#include "cuda/common.cuh"
#include "cuda/knn_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

void fail_k_too_large(int64_t k, size_t need, size_t have, int64_t max_k) {
  TORCH_CHECK(false, "nformer::knn (CUDA): k=", k, " needs ", need, " bytes of shared memory per block but this GPU "
              "allows ", have, "; the largest k supported here for this dtype is ", max_k);
}

template <typename mma_t, int BM>
void launch_mma(const at::Tensor& x, at::Tensor& out, int n, int d, int k, cudaStream_t stream) {
  const size_t smem = mma_smem_bytes(BM, k);
  auto kernel = knn_mma_kernel<mma_t, BM>;
  set_dynamic_smem(kernel, smem);
  const dim3 grid((n + BM - 1) / BM, x.size(0));
  const bool vec_ok = d % 8 == 0 && aligned16(x.data_ptr());
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const uint16_t*>(x.data_ptr()), out.data_ptr<int64_t>(), n, d,
                                           k, vec_ok);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// NFORMER_CUDA_KNN_ROWS=64|128 forces the WMMA row tile (read on every call: nformer-bench tune times
// both tiles on the GPU at hand); unset, the launcher chooses (mma_use_128_rows).
int forced_mma_rows() {
  const char* value = std::getenv("NFORMER_CUDA_KNN_ROWS");
  if (value == nullptr || *value == '\0') return 0;
  const std::string rows(value);
  TORCH_CHECK(rows == "64" || rows == "128", "NFORMER_CUDA_KNN_ROWS must be 64 or 128 (or unset), got '", rows, "'");
  return rows == "64" ? 64 : 128;
}

template <typename mma_t>
void knn_mma(const at::Tensor& x, at::Tensor& out, int n, int d, int k, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "nformer::knn (CUDA): fp16/bf16 inputs need an sm_80 or newer GPU, this one is sm_",
              prop->major, prop->minor, "; pass float32");
  const size_t have = prop->sharedMemPerBlockOptin;
  const int forced = forced_mma_rows();
  const bool fits128 = mma_smem_bytes(128, k) <= have;
  if (forced == 128 ? fits128 : forced == 0 && mma_use_128_rows(k, have, x.size(0) * ((n + 127) / 128),
                                                                 prop->multiProcessorCount)) {
    launch_mma<mma_t, 128>(x, out, n, d, k, stream);
  } else if (mma_smem_bytes(64, k) <= have) {
    launch_mma<mma_t, 64>(x, out, n, d, k, stream);
  } else {
    fail_k_too_large(k, mma_smem_bytes(64, k), have,
                     static_cast<int64_t>((have - mma_smem_bytes(64, 0)) / (64 * (sizeof(float) + sizeof(int)))));
  }
}

template <typename scalar_t>
void knn_fma(const at::Tensor& x, at::Tensor& out, int n, int d, int k, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const size_t have = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t smem = fma_smem_bytes<acc_t>(k);
  if (smem > have)
    fail_k_too_large(k, smem, have,
                     static_cast<int64_t>((have - fma_smem_bytes<acc_t>(0)) / (kFmaBM * (sizeof(acc_t) + sizeof(int)))));
  auto kernel = knn_fma_kernel<scalar_t, acc_t>;
  set_dynamic_smem(kernel, smem);
  const dim3 grid((n + kFmaBM - 1) / kFmaBM, x.size(0));
  kernel<<<grid, kThreads, smem, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), n, d, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor knn_cuda(const at::Tensor& x, int64_t k) {
  check_cuda_input(x, "knn", "x", x.device());
  TORCH_CHECK(x.dim() == 3, "nformer::knn (CUDA): x must be (B, N, d), got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2);
  TORCH_CHECK(k >= 1 && k <= N, "nformer::knn (CUDA): k must be in [1, N=", N, "], got ", k);
  TORCH_CHECK(N < INT_MAX && d < INT_MAX && B <= 65535, "nformer::knn (CUDA): x of shape ", x.sizes(),
              " is too large (need N, d < 2^31 and B <= 65535)");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, N, k}, x.options().dtype(at::kLong));
  if (B == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int n = static_cast<int>(N), di = static_cast<int>(d), ki = static_cast<int>(k);
  switch (x.scalar_type()) {
    case at::kHalf: knn_mma<__half>(x, out, n, di, ki, stream); break;
    case at::kBFloat16: knn_mma<__nv_bfloat16>(x, out, n, di, ki, stream); break;
    case at::kFloat: knn_fma<float>(x, out, n, di, ki, stream); break;
    case at::kDouble: knn_fma<double>(x, out, n, di, ki, stream); break;
    default: TORCH_CHECK(false, "nformer::knn (CUDA): x must be float16, bfloat16, float32 or float64, got ",
                         x.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace nformer

TORCH_LIBRARY_IMPL(nformer, CUDA, m) { m.impl("knn", &nformer::cuda::knn_cuda); }
