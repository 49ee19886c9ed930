// CPU kernel of knn_rescore, stage 2 of the two-stage knn (docs/design.md, "Two-stage knn"):
// per row, the canonical score of each of its K' candidates (common/canonical.h), the top k of them
// by (score desc, index asc) with self first, and the certificate (K' >= N) | (c(last) + margin < c_(k)).
// Rows are independent: OpenMP over rows, O(K') scratch per thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "common/canonical.h"
#include "common/neighbor_logic.h"

namespace {

void rescore(const at::Tensor& x, const at::Tensor& cand, int64_t k, const at::Tensor& margin, at::Tensor& idx,
             at::Tensor& certified) {
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), kc = cand.size(2);
  const float* x_p = x.data_ptr<float>();
  const int64_t* cand_p = cand.data_ptr<int64_t>();
  const double* margin_p = margin.data_ptr<double>();
  int64_t* idx_p = idx.data_ptr<int64_t>();
  bool* cert_p = certified.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kc * d));
  at::parallel_for(0, b * n, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> s(kc);
    std::vector<int> order(kc);
    std::vector<const float*> keys(kc);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % n, row0 = row - i;
      const int64_t* c = cand_p + row * kc;
      for (int64_t t = 0; t < kc; ++t) keys[t] = x_p + (row0 + c[t]) * d;
      nformer::cpu_canonical_dots(x_p + row * d, keys.data(), kc, d, s.data());
      const double last = s[kc - 1];
      for (int64_t t = 0; t < kc; ++t)
        if (c[t] == i) s[t] = std::numeric_limits<double>::infinity();  // self first
      // Position breaks the tie of a repeated id, so the order is total.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int p, int q) {
        return nformer::ranks_before(s[p], c[p], s[q], c[q]) || (s[p] == s[q] && c[p] == c[q] && p < q);
      });
      for (int64_t t = 0; t < k; ++t) idx_p[row * k + t] = c[order[t]];
      cert_p[row] = kc >= n || last + margin_p[row] < s[order[k - 1]];
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
  TORCH_CHECK(margin.scalar_type() == at::kDouble && margin.dim() == 2 && margin.size(0) == b && margin.size(1) == n,
              "knn_rescore: margin must be float64 (B,N), got ", margin.scalar_type(), " ", margin.sizes());
  auto idx = at::empty({b, n, k}, candidates.options());
  auto certified = at::empty({b, n}, x.options().dtype(at::kBool));
  if (b * n == 0) return {idx, certified};
  // Out-of-range ids would read outside x.
  auto [lo, hi] = at::aminmax(candidates);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, "knn_rescore: candidate ids must lie in [0, N)");
  // The values as fp32 (the canonical score's input), detached.
  const at::Tensor xc = x.detach().to(at::kFloat).contiguous(), cc = candidates.contiguous(),
                   mc = margin.detach().contiguous();
  rescore(xc, cc, k, mc, idx, certified);
  return {idx, certified};
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) { m.impl("knn_rescore", &knn_rescore_cpu); }
