// nformer::sparse_attention and nformer::sparse_attention_backward on CUDA: checks and
// launches of the kernels in sparse_attention_kernels.cuh.
#include "cuda/common.cuh"
#include "cuda/sparse_attention_kernels.cuh"

namespace nformer {
namespace cuda {
namespace {

struct Dims {
  int64_t B, N;
  int H, l, k, dv;
};

Dims check_common(const char* op, const at::Tensor& P, const at::Tensor& R, const at::Tensor& v,
                  const at::Tensor& idx, const at::Tensor& idx_like, const char* idx_like_name) {
  const at::Device device = v.device();
  check_cuda_input(P, op, "P", device);
  check_cuda_input(R, op, "R", device);
  check_cuda_input(v, op, "v", device);
  check_cuda_input(idx, op, "idx", device);
  check_cuda_input(idx_like, op, idx_like_name, device);
  TORCH_CHECK(P.dim() == 4, "nformer::", op, " (CUDA): P must be (B, N, H, l), got ", P.sizes());
  TORCH_CHECK(R.sizes() == P.sizes(), "nformer::", op, " (CUDA): R ", R.sizes(), " must have P's shape ", P.sizes());
  const int64_t B = P.size(0), N = P.size(1), H = P.size(2), l = P.size(3);
  TORCH_CHECK(H >= 1 && l >= 1, "nformer::", op, " (CUDA): P needs H >= 1 heads and l >= 1 landmarks, got ",
              P.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == B && v.size(1) == N && v.size(2) % H == 0, "nformer::", op,
              " (CUDA): v must be (B, N, H*dv) = (", B, ", ", N, ", multiple of ", H, "), got ", v.sizes());
  TORCH_CHECK(idx.dim() == 3 && idx.size(0) == B && idx.size(1) == N && idx.size(2) >= 1, "nformer::", op,
              " (CUDA): idx must be (B, N, k) with B=", B, ", N=", N, ", k >= 1, got ", idx.sizes());
  TORCH_CHECK(idx_like.sizes() == idx.sizes(), "nformer::", op, " (CUDA): ", idx_like_name, " ", idx_like.sizes(),
              " must have idx's shape ", idx.sizes());
  check_dtype(idx, at::kLong, op, "idx");
  const at::ScalarType vt = v.scalar_type();
  TORCH_CHECK(vt == at::kHalf || vt == at::kBFloat16 || vt == at::kFloat || vt == at::kDouble, "nformer::", op,
              " (CUDA): v must be float16, bfloat16, float32 or float64, got ", vt);
  check_dtype(P, acc_scalar_type(vt), op, "P");
  check_dtype(R, acc_scalar_type(vt), op, "R");
  TORCH_CHECK(idx.size(2) < (1 << 20) && H * idx.size(2) < (1 << 24) && H * l < (1 << 24) && v.size(2) < (1 << 30),
              "nformer::", op, " (CUDA): sizes too large: H=", H, " l=", l, " k=", idx.size(2), " d=", v.size(2));
  return {B, N, static_cast<int>(H), static_cast<int>(l), static_cast<int>(idx.size(2)), static_cast<int>(v.size(2) / H)};
}

// Dynamic shared memory for one block of kWarps warps, opted in when above the 48 KiB default.
template <typename Kernel>
size_t block_smem(Kernel kernel, const char* op, size_t slice_bytes) {
  const size_t bytes = slice_bytes * kWarps;
  const size_t have = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= have, "nformer::", op, " (CUDA): H*k too large: needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", have);
  if (bytes > 48 * 1024) set_dynamic_smem(kernel, bytes);
  return bytes;
}

// Largest vector width (16 bytes) when every feature pointer is aligned and heads split evenly.
template <typename scalar_t>
bool can_vectorise(int dv, std::initializer_list<const void*> ptrs) {
  if (dv % (16 / int(sizeof(scalar_t))) != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& P, const at::Tensor& R,
                                                         const at::Tensor& v, const at::Tensor& idx,
                                                         const at::Tensor& keep, double scale) {
  const char* op = "sparse_attention";
  const Dims dm = check_common(op, P, R, v, idx, keep, "keep");
  check_dtype(keep, at::kBool, op, "keep");
  c10::cuda::CUDAGuard guard(v.device());
  at::Tensor out = at::empty_like(v);
  at::Tensor probs = at::empty({dm.B, dm.N, dm.H, dm.k}, P.options());
  const int64_t rows = dm.B * dm.N;
  if (rows == 0) return {out, probs};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = attention_blocks(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "nformer_sparse_attention_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int slice = static_cast<int>(fwd_slice_bytes(dm.k, dm.H, dm.l, sizeof(acc_t)));
    auto launch = [&](auto kernel) {
      const size_t smem = block_smem(kernel, op, slice);
      kernel<<<blocks, kThreads, smem, stream>>>(P.data_ptr<acc_t>(), R.data_ptr<acc_t>(), v.data_ptr<scalar_t>(),
                                                 idx.data_ptr<int64_t>(), keep.data_ptr<bool>(),
                                                 static_cast<acc_t>(scale), out.data_ptr<scalar_t>(),
                                                 probs.data_ptr<acc_t>(), rows, dm.N, dm.H, dm.l, dm.k, dm.dv, slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (can_vectorise<scalar_t>(dm.dv, {v.data_ptr(), out.data_ptr()}))
      launch(sparse_attention_fwd_kernel<scalar_t, acc_t, kVec>);
    else
      launch(sparse_attention_fwd_kernel<scalar_t, acc_t, 1>);
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& P, const at::Tensor& R, const at::Tensor& v, const at::Tensor& idx,
    const at::Tensor& rev, const at::Tensor& probs, double scale) {
  const char* op = "sparse_attention_backward";
  const Dims dm = check_common(op, P, R, v, idx, rev, "rev");
  check_dtype(rev, at::kLong, op, "rev");
  check_cuda_input(grad_out, op, "grad_out", v.device());
  check_cuda_input(probs, op, "probs", v.device());
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "nformer::", op, " (CUDA): grad_out ", grad_out.sizes(),
              " must have v's shape ", v.sizes());
  check_dtype(grad_out, v.scalar_type(), op, "grad_out");
  TORCH_CHECK(probs.dim() == 4 && probs.size(0) == dm.B && probs.size(1) == dm.N && probs.size(2) == dm.H &&
                  probs.size(3) == dm.k,
              "nformer::", op, " (CUDA): probs must be (B, N, H, k) = (", dm.B, ", ", dm.N, ", ", dm.H, ", ", dm.k,
              "), got ", probs.sizes());
  check_dtype(probs, P.scalar_type(), op, "probs");
  c10::cuda::CUDAGuard guard(v.device());
  at::Tensor dP = at::empty_like(P), dR = at::empty_like(R), dv = at::empty_like(v);
  const int64_t rows = dm.B * dm.N;
  if (rows == 0) return {dP, dR, dv};
  at::Tensor ds = at::empty_like(probs);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int blocks = attention_blocks(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "nformer_sparse_attention_bwd_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int row_slice = static_cast<int>(bwd_row_slice_bytes(dm.k, dm.H, sizeof(acc_t)));
    const int col_slice = static_cast<int>(bwd_col_slice_bytes(dm.k, dm.H, sizeof(acc_t)));
    auto launch = [&](auto row_kernel, auto col_kernel, int vec) {
      const int group = lanes_per_dot(dm.dv, vec);
      const size_t row_smem = block_smem(row_kernel, op, row_slice);
      row_kernel<<<blocks, kThreads, row_smem, stream>>>(
          grad_out.data_ptr<scalar_t>(), R.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          probs.data_ptr<acc_t>(), static_cast<acc_t>(scale), dP.data_ptr<acc_t>(), ds.data_ptr<acc_t>(), rows, dm.N,
          dm.H, dm.l, dm.k, dm.dv, group, row_slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t col_smem = block_smem(col_kernel, op, col_slice);
      col_kernel<<<blocks, kThreads, col_smem, stream>>>(
          grad_out.data_ptr<scalar_t>(), P.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), rev.data_ptr<int64_t>(),
          probs.data_ptr<acc_t>(), ds.data_ptr<acc_t>(), static_cast<acc_t>(scale), dR.data_ptr<acc_t>(),
          dv.data_ptr<scalar_t>(), rows, dm.N, dm.H, dm.l, dm.k, dm.dv, col_slice);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (can_vectorise<scalar_t>(dm.dv, {grad_out.data_ptr(), v.data_ptr(), dv.data_ptr()}))
      launch(sparse_attention_bwd_row_kernel<scalar_t, acc_t, kVec>, sparse_attention_bwd_col_kernel<scalar_t, acc_t, kVec>,
             kVec);
    else
      launch(sparse_attention_bwd_row_kernel<scalar_t, acc_t, 1>, sparse_attention_bwd_col_kernel<scalar_t, acc_t, 1>,
             1);
  });
  return {dP, dR, dv};
}

}  // namespace
}  // namespace cuda
}  // namespace nformer

TORCH_LIBRARY_IMPL(nformer, CUDA, m) {
  m.impl("sparse_attention", &nformer::cuda::sparse_attention_cuda);
  m.impl("sparse_attention_backward", &nformer::cuda::sparse_attention_backward_cuda);
}
