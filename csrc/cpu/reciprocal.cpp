// CPU kernels of reciprocal_mask and reverse_index: O(N*k^2), parallel over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/neighbor_logic.h"

namespace {

// Out-of-range neighbour ids would make the row lookups read out of bounds.
void check_idx(const at::Tensor& idx, const char* op) {
  TORCH_CHECK(idx.device().is_cpu(), op, ": idx must be a CPU tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 3, op, ": idx must be (B,N,k), got ", idx.sizes());
  TORCH_CHECK(idx.is_contiguous(), op, ": idx must be contiguous");
  const int64_t n = idx.size(1), k = idx.size(2);
  TORCH_CHECK(k >= 1 && k <= n, op, ": need 1 <= k <= N, got k=", k, " N=", n);
  if (idx.numel() > 0) {
    auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, op,
                ": neighbour ids must lie in [0, N)");
  }
}

at::Tensor reciprocal_mask_cpu(const at::Tensor& idx) {
  check_idx(idx, "reciprocal_mask");
  const int64_t b = idx.size(0), n = idx.size(1);
  const int k = static_cast<int>(idx.size(2));
  auto keep = at::empty(idx.sizes(), idx.options().dtype(at::kBool));
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  bool* keep_p = keep.data_ptr<bool>();
  at::parallel_for(0, b * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t* idx_b = idx_p + (row / n) * n * k;
      const int64_t i = row % n;
      for (int t = 0; t < k; ++t) keep_p[row * k + t] = nformer::is_reciprocal(idx_b, k, i, t);
    }
  });
  return keep;
}

at::Tensor reverse_index_cpu(const at::Tensor& idx, const at::Tensor& keep) {
  check_idx(idx, "reverse_index");
  TORCH_CHECK(keep.device().is_cpu() && keep.scalar_type() == at::kBool,
              "reverse_index: keep must be a CPU bool tensor");
  TORCH_CHECK(keep.sizes() == idx.sizes() && keep.is_contiguous(),
              "reverse_index: keep must be contiguous with the shape of idx");
  const int64_t b = idx.size(0), n = idx.size(1);
  const int k = static_cast<int>(idx.size(2));
  auto rev = at::empty(idx.sizes(), idx.options());
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  const bool* keep_p = keep.data_ptr<bool>();
  int64_t* rev_p = rev.data_ptr<int64_t>();
  at::parallel_for(0, b * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = (row / n) * n * k;
      const int64_t j = row % n;
      for (int t = 0; t < k; ++t)
        rev_p[row * k + t] = nformer::reverse_position(idx_p + off, keep_p + off, k, j, t);
    }
  });
  return rev;
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) {
  m.impl("reciprocal_mask", &reciprocal_mask_cpu);
  m.impl("reverse_index", &reverse_index_cpu);
}
