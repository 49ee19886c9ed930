// CPU kernel of knn: exact inner-product top-k with self first, O(N*k + threads*tile^2) memory.
//
// S = X X^T is symmetric, so it is computed in T x T tiles of which only the upper
// triangle (blocks I <= J) is formed: an off-diagonal tile updates the running top-k of
// its rows and, transposed, of its columns. The off-diagonal pairs are scheduled as a
// round-robin tournament (circle method): every round is a perfect matching of the
// blocks, so within a round no two tasks touch the same row block and the running
// lists need no locks or atomics. Each task is one BLAS GEMM into a per-thread
// scratch tile plus a selection scan: every row (and column) keeps its current
// (k-1)-th score as a threshold, most candidates are rejected by one vectorised
// compare, and the few survivors go through nformer::topk_insert, whose tie order
// (higher score, then smaller index) makes the result independent of visit order.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <vector>

#include "common/neighbor_logic.h"

namespace {

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;  // without OpenMP the parallel regions below run serially
#endif
}

// Columns tested per vectorised compare before the scalar fallback.
constexpr int64_t kChunk = 32;

// Running top-m lists (m = k-1: every neighbour but self) of all N rows of one batch
// item. ids live in the output tensor (row stride k; slot 0 holds self).
template <typename acc_t>
struct RunningTopk {
  acc_t* vals;  // (N, m)
  int64_t* ids; // (N, k), entries 1..k-1 used
  acc_t* thr;   // (N): vals[i, m-1], the score a candidate must reach
  int m;
  int64_t k;

  void offer(int64_t row, acc_t s, int64_t id) {
    acc_t* v = vals + row * m;
    if (nformer::topk_insert(v, ids + row * k + 1, m, s, id)) thr[row] = v[m - 1];
  }
};

// Does any of the kChunk scores reach its row's or its column's threshold? The fixed
// trip count lets this compile to a few vector compares.
template <typename acc_t>
bool chunk_has_candidate(const acc_t* s, const acc_t* col_thr, acc_t row_thr) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int64_t c = 0; c < kChunk; ++c) hit |= (s[c] >= row_thr) | (s[c] >= col_thr[c]);
  return hit != 0;
}

template <typename acc_t>
bool chunk_has_candidate(const acc_t* s, acc_t row_thr) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int64_t c = 0; c < kChunk; ++c) hit |= s[c] >= row_thr;
  return hit != 0;
}

// Off-diagonal tile S (ti x tj) = X[i0:i0+ti] X[j0:j0+tj]^T: offers S[a,c] to row i0+a
// and to row j0+c. The caller guarantees no other thread touches these rows meanwhile.
template <typename acc_t>
NF_CPU_CLONES void select_pair_tile(const acc_t* S, int64_t ti, int64_t tj, int64_t i0, int64_t j0,
                                     RunningTopk<acc_t>& topk) {
  const acc_t* col_thr = topk.thr + j0;
  const int64_t full = tj - tj % kChunk;
  for (int64_t a = 0; a < ti; ++a) {
    const int64_t gi = i0 + a;
    const acc_t* s = S + a * tj;
    auto offer_range = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        if (s[c] >= topk.thr[gi]) topk.offer(gi, s[c], j0 + c);
        if (s[c] >= col_thr[c]) topk.offer(j0 + c, s[c], gi);
      }
    };
    for (int64_t c0 = 0; c0 < full; c0 += kChunk)
      if (chunk_has_candidate(s + c0, col_thr + c0, topk.thr[gi])) offer_range(c0, c0 + kChunk);
    offer_range(full, tj);
  }
}

// Diagonal tile S (t x t) of block [i0, i0+t): offers S[a,c], c != a, to row i0+a only.
template <typename acc_t>
NF_CPU_CLONES void select_diag_tile(const acc_t* S, int64_t t, int64_t i0, RunningTopk<acc_t>& topk) {
  const int64_t full = t - t % kChunk;
  for (int64_t a = 0; a < t; ++a) {
    const int64_t gi = i0 + a;
    const acc_t* s = S + a * t;
    auto offer_range = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        if (c != a && s[c] >= topk.thr[gi]) topk.offer(gi, s[c], i0 + c);
    };
    for (int64_t c0 = 0; c0 < full; c0 += kChunk)
      if (chunk_has_candidate(s + c0, topk.thr[gi])) offer_range(c0, c0 + kChunk);
    offer_range(full, t);
  }
}

// Largest tile edge: a 512 x 512 fp32 tile is 1 MiB (about an L2), and a 512 x 512 x d
// GEMM runs at single-core BLAS peak.
constexpr int64_t kMaxTile = 512;

// Smaller tiles for small N so each round still has a task per thread.
int64_t tile_size(int64_t n, int64_t threads) {
  const int64_t per_thread = (n + 2 * threads - 1) / (2 * threads);
  return std::clamp<int64_t>(per_thread, 64, kMaxTile);
}

// knn of one batch item x (N, d) into out (N, k), using up to `threads` threads.
template <typename acc_t>
void knn_one(const at::Tensor& x, int64_t k, int64_t* out, int threads) {
  const int64_t n = x.size(0);
  const int m = static_cast<int>(k - 1);
  for (int64_t i = 0; i < n; ++i) out[i * k] = i;
  if (m == 0) return;
  std::vector<acc_t> vals(n * m, -std::numeric_limits<acc_t>::infinity());
  std::vector<acc_t> thr(n, -std::numeric_limits<acc_t>::infinity());
  for (int64_t i = 0; i < n; ++i)
    std::fill(out + i * k + 1, out + (i + 1) * k, std::numeric_limits<int64_t>::max());
  RunningTopk<acc_t> topk{vals.data(), out, thr.data(), m, k};

  const int64_t T = std::min(n, tile_size(n, threads));
  const int64_t nb = (n + T - 1) / T;
  std::vector<std::vector<acc_t>> scratch(threads, std::vector<acc_t>(T * T));
  auto rows = [&](int64_t I) { return std::min(T, n - I * T); };
  auto block = [&](int64_t I) { return x.narrow(0, I * T, rows(I)); };
  // GEMM of blocks I, J into this thread's scratch tile (BLAS runs single-threaded
  // inside the parallel region).
  auto tile = [&](int64_t I, int64_t J) {
    acc_t* buf = scratch[thread_id()].data();
    at::Tensor s = at::from_blob(buf, {rows(I), rows(J)}, x.options());
    at::mm_out(s, block(I), block(J).t());
    return buf;
  };
  // An exception must not leave an OpenMP region: keep the first, rethrow after it.
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](auto&& task) {
    try {
      task();
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };

  // Circle method over M (even) slots; slot nb is a bye when nb is odd. Dynamic
  // scheduling within a round keeps both threads busy when one gets preempted.
  const int64_t M = nb + (nb & 1);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t I = 0; I < nb; ++I)
      guarded([&] { select_diag_tile(tile(I, I), rows(I), I * T, topk); });
    for (int64_t r = 0; r + 1 < M; ++r) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < M / 2; ++p) {
        int64_t I = p == 0 ? M - 1 : (r + p) % (M - 1);
        int64_t J = p == 0 ? r : (r - p + M - 1) % (M - 1);
        if (I >= nb || J >= nb) continue;
        if (I > J) std::swap(I, J);
        guarded([&] { select_pair_tile(tile(I, J), rows(I), rows(J), I * T, J * T, topk); });
      }
    }
  }
  if (error) std::rethrow_exception(error);
  // Slots never filled mean some scores were NaN (inputs are checked upstream).
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(out[i * k + m] != std::numeric_limits<int64_t>::max(),
                "knn: non-finite similarities (NaN/Inf in x?)");
}

at::Tensor knn_cpu(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "knn: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3, "knn: x must be (B,N,d), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "knn: x must be float32/float64/float16/bfloat16, got ", dt);
  const int64_t b = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "knn: need 1 <= k <= N, got k=", k, " N=", n);
  auto out = at::empty({b, n, k}, x.options().dtype(at::kLong));
  if (b == 0) return out;
  // Half inputs are widened once (O(N*d)), so the GEMM accumulates in fp32. Detached: the
  // tiles are written with mm_out, which refuses inputs that require grad.
  const at::Tensor xa = (dt == at::kDouble ? x : x.to(at::kFloat)).detach().contiguous();
  int64_t* out_p = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "knn_cpu", [&] {
    if (b > 1 && n <= kMaxTile) {  // one tile per item: parallel over the batch instead
      at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bi = begin; bi < end; ++bi) knn_one<scalar_t>(xa[bi], k, out_p + bi * n * k, 1);
      });
    } else {
      for (int64_t bi = 0; bi < b; ++bi) knn_one<scalar_t>(xa[bi], k, out_p + bi * n * k, at::get_num_threads());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) { m.impl("knn", &knn_cpu); }
