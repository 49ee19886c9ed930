// CPU kernel of knn_rescore, stage 2 of the certified knn (docs/design.md, "Certified knn"):
// per row, the exact score of each of its K' candidates, the top k of them by (score desc,
// index asc) with self first, and the certificate (K' >= N) | (s(last candidate) + margin < s_(k)).
// Rows are independent: OpenMP over rows, O(K') scratch per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "common/neighbor_logic.h"

namespace {

// fp32 and fp64 accumulate in their own precision; fp16/bf16 in fp32, with each score (and
// last + margin) rounded to the input dtype as the contract's plain-PyTorch form computes them.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
NF_CPU_CLONES acc_of<scalar_t> dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  using acc_t = acc_of<scalar_t>;
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < d; ++e) s += static_cast<acc_t>(a[e]) * static_cast<acc_t>(b[e]);
  return static_cast<acc_t>(static_cast<scalar_t>(s));
}

template <typename scalar_t>
void rescore(const at::Tensor& x, const at::Tensor& cand, int64_t k, const at::Tensor& margin, at::Tensor& idx,
             at::Tensor& certified) {
  using acc_t = acc_of<scalar_t>;
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), kc = cand.size(2);
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const int64_t* cand_p = cand.data_ptr<int64_t>();
  const scalar_t* margin_p = margin.data_ptr<scalar_t>();
  int64_t* idx_p = idx.data_ptr<int64_t>();
  bool* cert_p = certified.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kc * d));
  at::parallel_for(0, b * n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(kc);
    std::vector<int> order(kc);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n, row0 = row - i;
      const int64_t* c = cand_p + row * kc;
      for (int64_t t = 0; t < kc; ++t) s[t] = dot(x_p + row * d, x_p + (row0 + c[t]) * d, d);
      const acc_t last = s[kc - 1];
      for (int64_t t = 0; t < kc; ++t)
        if (c[t] == i) s[t] = std::numeric_limits<acc_t>::infinity();  // self first
      // Position breaks the tie of a repeated id, so the order is total.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int p, int q) {
        return nformer::ranks_before(s[p], c[p], s[q], c[q]) || (s[p] == s[q] && c[p] == c[q] && p < q);
      });
      for (int64_t t = 0; t < k; ++t) idx_p[row * k + t] = c[order[t]];
      const acc_t bound = static_cast<acc_t>(static_cast<scalar_t>(last + static_cast<acc_t>(margin_p[row])));
      cert_p[row] = kc >= n || bound < s[order[k - 1]];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_rescore_cpu(const at::Tensor& x, const at::Tensor& candidates, int64_t k,
                                                   const at::Tensor& margin) {
  TORCH_CHECK(x.device().is_cpu() && candidates.device().is_cpu() && margin.device().is_cpu(),
              "knn_rescore: x, candidates and margin must be CPU tensors");
  TORCH_CHECK(x.dim() == 3, "knn_rescore: x must be (B,N,d), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "knn_rescore: x must be float32/float64/float16/bfloat16, got ", dt);
  const int64_t b = x.size(0), n = x.size(1);
  TORCH_CHECK(candidates.scalar_type() == at::kLong && candidates.dim() == 3 && candidates.size(0) == b &&
                  candidates.size(1) == n,
              "knn_rescore: candidates must be int64 (B,N,K') = (", b, ",", n, ",K'), got ", candidates.scalar_type(),
              " ", candidates.sizes());
  const int64_t kc = candidates.size(2);
  TORCH_CHECK(k >= 1 && k <= kc, "knn_rescore: need 1 <= k <= K', got k=", k, " K'=", kc);
  TORCH_CHECK(margin.scalar_type() == dt && margin.dim() == 2 && margin.size(0) == b && margin.size(1) == n,
              "knn_rescore: margin must be (B,N) of x's dtype, got ", margin.scalar_type(), " ", margin.sizes());
  auto idx = at::empty({b, n, k}, candidates.options());
  auto certified = at::empty({b, n}, x.options().dtype(at::kBool));
  if (b * n == 0) return {idx, certified};
  // Out-of-range ids would read outside x.
  auto [lo, hi] = at::aminmax(candidates);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, "knn_rescore: candidate ids must lie in [0, N)");
  const at::Tensor xc = x.detach().contiguous(), cc = candidates.contiguous(), mc = margin.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "knn_rescore_cpu",
                                  [&] { rescore<scalar_t>(xc, cc, k, mc, idx, certified); });
  return {idx, certified};
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) { m.impl("knn_rescore", &knn_rescore_cpu); }
