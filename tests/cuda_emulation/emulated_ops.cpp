// Runs the kernels of csrc/cuda/*_kernels.cuh on the CPU (emu.h), launched with the grid, block,
// shared-memory and tile choices of csrc/cuda/*.cu, which both take from the constexpr helpers of the
// kernel headers; the device properties are an H100's (kOptin, the SM count the caller passes).
// Dynamic shared memory: one static buffer, defined in the kernels' namespace so their
// `extern __shared__ smem[]` declarations resolve to it (blocks run one at a time).
#include <torch/extension.h>
#include <algorithm>
#include "emu.h"
namespace nformer { namespace cuda { namespace { alignas(128) unsigned char smem[1 << 22]; } } }
#include "cuda/knn_kernels.cuh"
#include "cuda/knn_rescore_kernels.cuh"
#include "cuda/knn_rows_kernels.cuh"
#include "cuda/reciprocal_kernels.cuh"
#include "cuda/sparse_attention_kernels.cuh"

using namespace nformer::cuda;
constexpr size_t kOptin = 232448;  // H100 sharedMemPerBlockOptin
static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

torch::Tensor emu_knn(torch::Tensor x, int64_t k, int64_t force_bm, int64_t sm_count) {
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2);
  TORCH_CHECK(x.is_contiguous() && k >= 1 && k <= N && d >= 1);
  auto out = torch::empty({B, N, k}, x.options().dtype(torch::kLong));
  const int n = N, di = d, ki = k;
  auto mma = [&](auto tag) {
    using mma_t = decltype(tag);
    const bool use128 = force_bm ? force_bm == 128 : mma_use_128_rows(ki, kOptin, B * ((N + 127) / 128), sm_count);
    const bool vec_ok = d % 8 == 0 && aligned16(x.data_ptr());
    const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
    if (use128) {
      TORCH_CHECK(mma_smem_bytes(128, ki) <= sizeof(smem));
      emu::launch(dim3((n + 127) / 128, B), dim3(kThreads), [&] { knn_mma_kernel<mma_t, 128>(xp, out.data_ptr<int64_t>(), n, di, ki, vec_ok); });
    } else {
      TORCH_CHECK(mma_smem_bytes(64, ki) <= kOptin);
      emu::launch(dim3((n + 63) / 64, B), dim3(kThreads), [&] { knn_mma_kernel<mma_t, 64>(xp, out.data_ptr<int64_t>(), n, di, ki, vec_ok); });
    }
  };
  auto fma = [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    TORCH_CHECK(fma_smem_bytes<acc_t>(ki) <= kOptin);
    emu::launch(dim3((n + kFmaBM - 1) / kFmaBM, B), dim3(kThreads),
                [&] { knn_fma_kernel<scalar_t, acc_t>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), n, di, ki); });
  };
  switch (x.scalar_type()) {
    case torch::kHalf: mma(__half{}); break;
    case torch::kBFloat16: mma(__nv_bfloat16{}); break;
    case torch::kFloat: fma(float{}); break;
    case torch::kDouble: fma(double{}); break;
    default: TORCH_CHECK(false, "dtype");
  }
  return out;
}

std::vector<torch::Tensor> emu_knn_rescore(torch::Tensor x, torch::Tensor cand, int64_t k, torch::Tensor margin) {
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2), kc = cand.size(2);
  TORCH_CHECK(x.is_contiguous() && cand.is_contiguous() && margin.is_contiguous() && k >= 1 && k <= kc);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && margin.scalar_type() == torch::kDouble, "x float32, margin float64");
  auto idx = torch::empty({B, N, k}, cand.options());
  auto certified = torch::empty({B, N}, x.options().dtype(torch::kBool));
  const int64_t rows = B * N;
  TORCH_CHECK(rescore_smem_bytes(kc) <= kOptin);
  const int slice = rescore_slice_bytes(kc);
  emu::launch(dim3(rescore_blocks(rows)), dim3(kThreads), [&] {
    knn_rescore_kernel(x.data_ptr<float>(), cand.data_ptr<int64_t>(), margin.data_ptr<double>(), idx.data_ptr<int64_t>(),
                       certified.data_ptr<bool>(), rows, N, d, kc, k, slice);
  });
  return {idx, certified};
}

torch::Tensor emu_knn_rows(torch::Tensor x, torch::Tensor rows, int64_t k) {
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2), R = rows.size(1);
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 2 && rows.size(0) == B && k >= 1 && k <= N);
  auto out = torch::empty({B, R, k}, rows.options());
  if (B * R == 0) return out;
  const torch::Tensor rc = rows.contiguous();
  auto [lo, hi] = at::aminmax(rc);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < N, "knn_rows: rows must lie in [0, N)");
  TORCH_CHECK(rows_smem_bytes(k) <= kOptin);
  // As knn_rows.cu: fp32 values, beta per query row.
  const torch::Tensor xf = x.detach().to(torch::kFloat).contiguous();
  const torch::Tensor norms = at::linalg_vector_norm(xf, 2, at::IntArrayRef{-1}, false, at::kDouble).mul_(nformer::kNormPad);
  const torch::Tensor top = std::get<0>(norms.max(-1, true));
  const torch::Tensor beta = norms.gather(1, rc).mul_(top).mul_(0.5 * nformer::fp32_score_bound2_factor(d)).contiguous();
  emu::launch(dim3(rows_blocks(R), B), dim3(kThreads), [&] {
    knn_rows_kernel(xf.data_ptr<float>(), rc.data_ptr<int64_t>(), beta.data_ptr<double>(), out.data_ptr<int64_t>(),
                    N, d, R, k);
  });
  return out;
}

torch::Tensor emu_reciprocal_mask(torch::Tensor idx, int64_t sm_count) {
  auto keep = torch::empty(idx.sizes(), idx.options().dtype(torch::kBool));
  const int64_t total = idx.numel();
  emu::launch(dim3(lookup_grid(total, int(sm_count))), dim3(kThreads), [&] {
    reciprocal_mask_kernel(idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), total, idx.size(1), int(idx.size(2)));
  });
  return keep;
}

torch::Tensor emu_reverse_index(torch::Tensor idx, torch::Tensor keep, int64_t sm_count) {
  auto rev = torch::empty_like(idx);
  const int64_t total = idx.numel();
  emu::launch(dim3(lookup_grid(total, int(sm_count))), dim3(kThreads), [&] {
    reverse_index_kernel(idx.data_ptr<int64_t>(), keep.data_ptr<bool>(), rev.data_ptr<int64_t>(), total, idx.size(1),
                         int(idx.size(2)));
  });
  return rev;
}

std::vector<torch::Tensor> emu_sparse_attention(torch::Tensor P, torch::Tensor R, torch::Tensor v, torch::Tensor idx,
                                                torch::Tensor keep, double scale) {
  const int64_t B = P.size(0), N = P.size(1);
  const int H = P.size(2), l = P.size(3), k = idx.size(2), dv = v.size(2) / H;
  auto out = torch::empty_like(v);
  auto probs = torch::empty({B, N, H, k}, P.options());
  const int64_t rows = B * N;
  const int blocks = attention_blocks(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "emu_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int slice = fwd_slice_bytes(k, H, l, sizeof(acc_t));
    TORCH_CHECK(size_t(slice) * kWarps <= kOptin);
    const bool vec = dv % kVec == 0 && aligned16(v.data_ptr()) && aligned16(out.data_ptr());
    auto run = [&](auto kernel) {
      emu::launch(dim3(blocks), dim3(kThreads), [&] {
        kernel(P.data_ptr<acc_t>(), R.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
               keep.data_ptr<bool>(), acc_t(scale), out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), rows, N, H, l,
               k, dv, slice);
      });
    };
    if (vec) run(sparse_attention_fwd_kernel<scalar_t, acc_t, kVec>);
    else run(sparse_attention_fwd_kernel<scalar_t, acc_t, 1>);
  });
  return {out, probs};
}

std::vector<torch::Tensor> emu_sparse_attention_backward(torch::Tensor grad_out, torch::Tensor P, torch::Tensor R,
                                                         torch::Tensor v, torch::Tensor idx, torch::Tensor rev,
                                                         torch::Tensor probs, double scale) {
  const int64_t B = P.size(0), N = P.size(1);
  const int H = P.size(2), l = P.size(3), k = idx.size(2), dv = v.size(2) / H;
  auto dP = torch::empty_like(P), dR = torch::empty_like(R), dv_out = torch::empty_like(v), ds = torch::empty_like(probs);
  const int64_t rows = B * N;
  const int blocks = attention_blocks(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "emu_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int row_slice = bwd_row_slice_bytes(k, H, sizeof(acc_t));
    const int col_slice = bwd_col_slice_bytes(k, H, sizeof(acc_t));
    auto run = [&](auto row_kernel, auto col_kernel, int vec) {
      const int group = lanes_per_dot(dv, vec);
      emu::launch(dim3(blocks), dim3(kThreads), [&] {
        row_kernel(grad_out.data_ptr<scalar_t>(), R.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                   probs.data_ptr<acc_t>(), acc_t(scale), dP.data_ptr<acc_t>(), ds.data_ptr<acc_t>(), rows, N, H, l, k,
                   dv, group, row_slice);
      });
      emu::launch(dim3(blocks), dim3(kThreads), [&] {
        col_kernel(grad_out.data_ptr<scalar_t>(), P.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), rev.data_ptr<int64_t>(),
                   probs.data_ptr<acc_t>(), ds.data_ptr<acc_t>(), acc_t(scale), dR.data_ptr<acc_t>(),
                   dv_out.data_ptr<scalar_t>(), rows, N, H, l, k, dv, col_slice);
      });
    };
    const bool vec = dv % kVec == 0 && aligned16(grad_out.data_ptr()) && aligned16(v.data_ptr()) && aligned16(dv_out.data_ptr());
    if (vec) run(sparse_attention_bwd_row_kernel<scalar_t, acc_t, kVec>, sparse_attention_bwd_col_kernel<scalar_t, acc_t, kVec>, kVec);
    else run(sparse_attention_bwd_row_kernel<scalar_t, acc_t, 1>, sparse_attention_bwd_col_kernel<scalar_t, acc_t, 1>, 1);
  });
  return {dP, dR, dv_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("knn", &emu_knn);
  m.def("knn_rescore", &emu_knn_rescore);
  m.def("knn_rows", &emu_knn_rows);
  m.def("reciprocal_mask", &emu_reciprocal_mask);
  m.def("reverse_index", &emu_reverse_index);
  m.def("sparse_attention", &emu_sparse_attention);
  m.def("sparse_attention_backward", &emu_sparse_attention_backward);
}
