// CPU kernels of sparse_attention (forward) and sparse_attention_backward.
// Parallel over rows; the backward runs a row pass (dP, ds) then a column pass
// (dR, dv) that gathers through rev, so no two threads ever write the same row.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "common/neighbor_logic.h"

namespace {

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Validates the tensors both passes share; returns the value dtype's acc dtype.
at::ScalarType check_common(const char* op, const at::Tensor& P, const at::Tensor& R,
                            const at::Tensor& v, const at::Tensor& idx) {
  for (auto [t, name] : {std::pair{&P, "P"}, {&R, "R"}, {&v, "v"}, {&idx, "idx"}})
    check_cpu_contiguous(*t, op, name);
  const auto vt = v.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || vt == at::kHalf || vt == at::kBFloat16, op,
              ": v must be float32/float64/float16/bfloat16, got ", vt);
  const auto acc = vt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(P.scalar_type() == acc && R.scalar_type() == acc, op, ": P and R must be ", acc,
              " for v of dtype ", vt);
  TORCH_CHECK(P.dim() == 4 && R.sizes() == P.sizes(), op, ": P and R must both be (B,N,H,l), got ",
              P.sizes(), " and ", R.sizes());
  const int64_t b = P.size(0), n = P.size(1), h = P.size(2);
  TORCH_CHECK(h >= 1 && v.dim() == 3 && v.size(0) == b && v.size(1) == n && v.size(2) % h == 0, op,
              ": v must be (B,N,H*dv), got ", v.sizes(), " with H=", h);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 3 && idx.size(0) == b &&
                  idx.size(1) == n && idx.size(2) >= 1 && idx.size(2) <= n,
              op, ": idx must be int64 (B,N,k) with 1 <= k <= N, got ", idx.sizes());
  if (idx.numel() > 0) {
    auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, op,
                ": neighbour ids must lie in [0, N)");
  }
  return acc;
}

// Hot loops over dv channels: `omp simd` allows the reassociation a float reduction needs
// to vectorise; the row functions below carry NF_CPU_CLONES so these get AVX2/AVX-512 code.
template <typename acc_t, typename scalar_t>
inline void axpy(acc_t* a, acc_t w, const scalar_t* x, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) a[c] += w * static_cast<acc_t>(x[c]);
}

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* a, const scalar_t* x, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += a[c] * static_cast<acc_t>(x[c]);
  return s;
}

// Pointers and sizes of one call; rows are flattened (b*N + i), `n` is N.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *P, *R;
  const scalar_t* v;
  const int64_t* idx;
  int64_t n, H, l, dv;
  int k;
  acc_t scale;
  int64_t hdv() const { return H * dv; }
};

// Forward for rows [begin, end): scores, masked softmax (into probs), weighted gather of v.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
NF_CPU_CLONES void forward_rows(const Problem<scalar_t>& pb, const bool* keep, scalar_t* out, acc_t* probs,
                                int64_t begin, int64_t end) {
  const int64_t H = pb.H, l = pb.l, dv = pb.dv, hdv = pb.hdv();
  const int k = pb.k;
  std::vector<acc_t> acc(hdv);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = (row / pb.n) * pb.n;  // first row of this batch item
    const int64_t* nbr = pb.idx + row * k;
    const bool* kp = keep + row * k;
    acc_t* pr = probs + row * H * k;
    for (int64_t h = 0; h < H; ++h) {
      const acc_t* p_ih = pb.P + (row * H + h) * l;
      acc_t* s = pr + h * k;
      for (int t = 0; t < k; ++t) {
        const acc_t* r_jh = pb.R + ((base + nbr[t]) * H + h) * l;
        acc_t d = 0;
        for (int64_t m = 0; m < l; ++m) d += p_ih[m] * r_jh[m];
        s[t] = pb.scale * d;
      }
      nformer::masked_softmax(s, kp, k);
    }
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int t = 0; t < k; ++t) {
      if (!kp[t]) continue;
      const scalar_t* v_j = pb.v + (base + nbr[t]) * hdv;
      for (int64_t h = 0; h < H; ++h) axpy(acc.data() + h * dv, pr[h * k + t], v_j + h * dv, dv);
    }
    scalar_t* o = out + row * hdv;
    for (int64_t c = 0; c < hdv; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

// Backward row pass for rows [begin, end): ds = softmax'(da), da[t] = <grad_out[i,h], v[idx[i,t],h]>;
// dP from ds and R.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
NF_CPU_CLONES void backward_row_pass(const Problem<scalar_t>& pb, const scalar_t* grad_out, const acc_t* probs,
                                     acc_t* ds, acc_t* dP, int64_t begin, int64_t end) {
  const int64_t H = pb.H, l = pb.l, dv = pb.dv, hdv = pb.hdv();
  const int k = pb.k;
  std::vector<acc_t> g(hdv);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = (row / pb.n) * pb.n;
    const int64_t* nbr = pb.idx + row * k;
    const scalar_t* g_i = grad_out + row * hdv;
    for (int64_t c = 0; c < hdv; ++c) g[c] = static_cast<acc_t>(g_i[c]);
    for (int64_t h = 0; h < H; ++h) {
      const acc_t* pr = probs + (row * H + h) * k;
      acc_t* d = ds + (row * H + h) * k;
      for (int t = 0; t < k; ++t)  // probs == 0 (not kept) gives ds == 0 whatever da is
        d[t] = pr[t] == acc_t(0) ? acc_t(0) : dot(g.data() + h * dv, pb.v + (base + nbr[t]) * hdv + h * dv, dv);
      nformer::softmax_backward(pr, d, k);
      acc_t* dp = dP + (row * H + h) * l;
      for (int64_t m = 0; m < l; ++m) dp[m] = 0;
      for (int t = 0; t < k; ++t) {
        if (d[t] == acc_t(0)) continue;
        const acc_t* r_jh = pb.R + ((base + nbr[t]) * H + h) * l;
        for (int64_t m = 0; m < l; ++m) dp[m] += d[t] * r_jh[m];
      }
      for (int64_t m = 0; m < l; ++m) dp[m] *= pb.scale;
    }
  }
}

// Backward column pass for rows [begin, end): row j gathers every (i, t) with idx[i,t] == j
// through rev[j, :] into dv[j] and dR[j], so each row is written by one thread only.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
NF_CPU_CLONES void backward_column_pass(const Problem<scalar_t>& pb, const scalar_t* grad_out, const int64_t* rev,
                                        const acc_t* probs, const acc_t* ds, acc_t* dR, scalar_t* dv_out,
                                        int64_t begin, int64_t end) {
  const int64_t H = pb.H, l = pb.l, dv = pb.dv, hdv = pb.hdv();
  const int k = pb.k;
  std::vector<acc_t> acc(hdv);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t base = (row / pb.n) * pb.n;
    const int64_t* nbr = pb.idx + row * k;
    const int64_t* rv = rev + row * k;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    acc_t* dr = dR + row * H * l;
    for (int64_t e = 0; e < H * l; ++e) dr[e] = 0;
    for (int tp = 0; tp < k; ++tp) {
      const int64_t t = rv[tp];
      if (t < 0) continue;
      const int64_t i = base + nbr[tp];
      for (int64_t h = 0; h < H; ++h) {
        axpy(acc.data() + h * dv, probs[(i * H + h) * k + t], grad_out + i * hdv + h * dv, dv);
        const acc_t dsv = ds[(i * H + h) * k + t];
        const acc_t* p_ih = pb.P + (i * H + h) * l;
        for (int64_t m = 0; m < l; ++m) dr[h * l + m] += dsv * p_ih[m];
      }
    }
    for (int64_t e = 0; e < H * l; ++e) dr[e] *= pb.scale;
    scalar_t* o = dv_out + row * hdv;
    for (int64_t c = 0; c < hdv; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& P, const at::Tensor& R, const at::Tensor& v, const at::Tensor& idx,
                               double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return {P.data_ptr<acc_t>(), R.data_ptr<acc_t>(), v.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          P.size(1), P.size(2), P.size(3), v.size(2) / P.size(2), static_cast<int>(idx.size(2)),
          static_cast<acc_t>(scale)};
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& P, const at::Tensor& R,
                                                        const at::Tensor& v, const at::Tensor& idx,
                                                        const at::Tensor& keep, double scale) {
  const char* op = "sparse_attention";
  const auto acc_type = check_common(op, P, R, v, idx);
  check_cpu_contiguous(keep, op, "keep");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == idx.sizes(), op,
              ": keep must be bool with the shape of idx");
  const int64_t b = P.size(0), n = P.size(1), H = P.size(2), k = idx.size(2);
  auto out = at::empty_like(v);
  auto probs = at::empty({b, n, H, k}, P.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pb = make_problem<scalar_t>(P, R, v, idx, scale);
    at::parallel_for(0, b * n, 64, [&](int64_t begin, int64_t end) {
      forward_rows(pb, keep.data_ptr<bool>(), out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), begin, end);
    });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& P, const at::Tensor& R, const at::Tensor& v,
    const at::Tensor& idx, const at::Tensor& rev, const at::Tensor& probs, double scale) {
  const char* op = "sparse_attention_backward";
  const auto acc_type = check_common(op, P, R, v, idx);
  check_cpu_contiguous(grad_out, op, "grad_out");
  check_cpu_contiguous(rev, op, "rev");
  check_cpu_contiguous(probs, op, "probs");
  TORCH_CHECK(grad_out.scalar_type() == v.scalar_type() && grad_out.sizes() == v.sizes(), op,
              ": grad_out must match v in dtype and shape");
  const int64_t b = P.size(0), n = P.size(1), H = P.size(2), k = idx.size(2);
  TORCH_CHECK(rev.scalar_type() == at::kLong && rev.sizes() == idx.sizes(), op,
              ": rev must be int64 with the shape of idx");
  if (rev.numel() > 0) {
    auto [lo, hi] = at::aminmax(rev);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < k, op, ": rev must lie in [-1, k)");
  }
  TORCH_CHECK(probs.scalar_type() == acc_type && probs.sizes() == at::IntArrayRef({b, n, H, k}), op,
              ": probs must be ", acc_type, " (B,N,H,k)");

  auto dP = at::empty_like(P);
  auto dR = at::empty_like(R);
  auto dv = at::empty_like(v);
  auto ds = at::empty_like(probs);  // softmax-input gradient, handed from the row to the column pass
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "sparse_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pb = make_problem<scalar_t>(P, R, v, idx, scale);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const acc_t* pr = probs.data_ptr<acc_t>();
    at::parallel_for(0, b * n, 64, [&](int64_t begin, int64_t end) {
      backward_row_pass(pb, g, pr, ds.data_ptr<acc_t>(), dP.data_ptr<acc_t>(), begin, end);
    });
    at::parallel_for(0, b * n, 64, [&](int64_t begin, int64_t end) {
      backward_column_pass(pb, g, rev.data_ptr<int64_t>(), pr, ds.data_ptr<acc_t>(), dR.data_ptr<acc_t>(),
                           dv.data_ptr<scalar_t>(), begin, end);
    });
  });
  return {dP, dR, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cpu);
}
