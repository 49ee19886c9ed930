// CPU kernels of knn and knn_rows: the canonical top-k (docs/design.md, "The canonical score"), self
// first, O(N*k + threads*tile^2) memory.
//
// knn: S = X X^T is symmetric, so it is computed in T x T tiles of which only the upper triangle
// (blocks I <= J) is formed: an off-diagonal tile updates the running top-k of its rows and,
// transposed, of its columns. The off-diagonal pairs are scheduled as a round-robin tournament
// (circle method): every round is a perfect matching of the blocks, so within a round no two tasks
// touch the same row block and the running lists need no locks or atomics. knn_rows: the running
// lists of a subset of rows against every row (row blocks in parallel, no symmetry).
//
// Each task is one fp32 BLAS GEMM into a per-thread scratch tile plus a selection scan. A BLAS score
// f is within beta of the canonical score c (common/canonical.h), beta from the row norms; so the
// canonical order is the order by f where two scores are more than 2*beta apart and by (c, index)
// where they are not (c computed on demand, once per entry). A row's list keeps every key that is
// not more than 2*beta below its m-th largest f and is put in that order at the end, or, once it
// overflows with near-ties, keeps its canonical top m by c (RunningTopk): the result is the same on
// every CPU, BLAS, tile split and thread count. Every row keeps a gate below which no f can enter:
// most candidates are rejected by one vectorised compare.
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
#include <memory>
#include <mutex>
#include <vector>

#include <cmath>

#include "common/canonical.h"
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
constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();  // a canonical score not yet computed

// Each list has kSlack slots beyond m for entries within 2*beta of its m-th f.
constexpr int kSlack = 32;

// Running candidate lists of a set of query rows, in one of two forms.
//
// By f (every row starts so): the list holds every offered key not yet known to rank below m others
// (m = k-1: every neighbour but self), slots [0, m) the m largest BLAS scores f, sorted, the tail the
// rest. An entry more than 2*beta below the m-th f ranks below m entries canonically and is dropped;
// entries closer than that are kept unordered and put in canonical order once, at the end, with c
// computed only where two f are within 2*beta. Near-ties that pass through a list on their way out
// so cost no canonical score.
//
// By c: a list whose tail fills holds more near-ties than slots (a near-duplicate group larger than
// the list, common in Re-ID galleries). It is put in canonical order then, keeping its top m with
// their c, and every later offer is scored at once: its c ranks it against the m-th c, and an f more
// than beta below the m-th c cannot. In an off-diagonal tile a pair is offered to both its rows, so
// one c serves both when both are in this form (c(a, b) == c(b, a)): a group of G rows costs about
// G^2/2 canonical scores in all, not G^2 or more.
struct RunningTopk {
  using Entry = std::pair<float, int32_t>;
  const float* x;         // (N, d) the keys (and, through query(), the query rows)
  const int64_t* q_rows;  // query row r is key row q_rows[r] (nullptr: r itself)
  int64_t d;
  float* f;               // (R, cap) BLAS scores, descending
  int32_t* ids;           // (R, cap) key rows (N < 2^31 is checked): a small list stays in cache
  int* size;              // (R) entries held
  float* gate;            // (R) below it an f cannot enter: m-th f - 2*beta, or m-th c - beta (by c),
                          // rounded down (-inf until m entries)
  float* tail_min;        // (R) smallest f of the tail (+inf when empty): most gate moves skip it
  const double* beta2;    // (R) 2*beta
  bool* by_c;             // (R) the list is held by c
  double* top_c;          // (R, m) a list held by c: its canonical top m, in order
  int64_t* top_ids;
  int m, cap;

  const float* query(int64_t r) const { return x + (q_rows ? q_rows[r] : r) * d; }

  // Row r's m-th largest f - 2*beta: an entry below it ranks below m others canonically.
  double floor_of(int64_t r) const { return double(f[r * cap + m - 1]) - beta2[r]; }

  // A row's held entries (sorted by f), the positions of its canonical top m (in canonical order)
  // and their c: one per thread, reused row after row.
  struct Ranked {
    std::vector<Entry> all;
    std::vector<int> order, need;
    std::vector<double> c, need_c;
    std::vector<const float*> keys;
  };

  // c for row r's entries at the positions s.need of s.all, in one batch.
  void score(int64_t r, Ranked& s) const {
    s.keys.clear();
    for (int e : s.need) s.keys.push_back(x + int64_t(s.all[e].second) * d);
    s.need_c.resize(s.need.size());
    nformer::cpu_canonical_dots(query(r), s.keys.data(), int64_t(s.need.size()), d, s.need_c.data());
    for (size_t i = 0; i < s.need.size(); ++i) s.c[s.need[i]] = s.need_c[i];
  }

  // Ranks row r's list (held by f). Two entries more than 2*beta apart in f are in c's order, so
  // unless `all_c` asks for every c, c is computed only for entries within 2*beta of a neighbour in
  // f (every pair closer than that then has both), and those compare by (c, index), the rest by f:
  // the canonical order itself, whichever pairs the sort compares.
  Ranked& rank(int64_t r, bool all_c) const {
    thread_local Ranked s;
    const int64_t o = r * cap;
    const int n = size[r];
    s.all.clear();
    for (int e = 0; e < n; ++e) s.all.emplace_back(f[o + e], ids[o + e]);
    std::sort(s.all.begin() + m, s.all.end(), [](const Entry& a, const Entry& b) { return a.first > b.first; });
    const std::vector<Entry>& all = s.all;
    const double b2 = beta2[r];
    s.c.assign(n, kUnknown);
    s.need.clear();
    for (int e = 0; e < n; ++e)
      if (all_c || (e > 0 && double(all[e - 1].first) - double(all[e].first) <= b2) ||
          (e + 1 < n && double(all[e].first) - double(all[e + 1].first) <= b2))
        s.need.push_back(e);
    score(r, s);
    const std::vector<double>& c = s.c;
    s.order.resize(n);
    for (int e = 0; e < n; ++e) s.order[e] = e;
    auto before = [&](int a, int b) {
      if (!std::isnan(c[a]) && !std::isnan(c[b])) return nformer::ranks_before(c[a], all[a].second, c[b], all[b].second);
      return all[a].first > all[b].first;
    };
    std::partial_sort(s.order.begin(), s.order.begin() + m, s.order.end(), before);
    s.order.resize(m);
    return s;
  }

  void set_gate(int64_t r, double g) {
    float gf = static_cast<float>(g);
    if (double(gf) > g) gf = std::nextafter(gf, -std::numeric_limits<float>::infinity());
    gate[r] = gf;
  }

  // Row r's list (held by f, full) is put in canonical order and held by c from now on: nothing
  // ranked below m others can rank higher later.
  void hold_by_c(int64_t r) {
    const Ranked& s = rank(r, true);
    double* cr = top_c + r * m;
    int64_t* ir = top_ids + r * m;
    for (int e = 0; e < m; ++e) cr[e] = s.c[s.order[e]], ir[e] = s.all[s.order[e]].second;
    by_c[r] = true;
    set_gate_by_c(r);
  }

  // A list held by c: no f more than beta below its m-th c can rank before it.
  void set_gate_by_c(int64_t r) { set_gate(r, top_c[r * m + m - 1] - beta2[r] / 2); }

  // Offers key idn with BLAS score fn to row r; the caller has checked fn >= gate[r]. c is the
  // pair's canonical score if already computed (NaN if not), computed here when a list held by c
  // needs it and kept for the pair's other row.
  inline __attribute__((always_inline)) void offer(int64_t r, float fn, int32_t idn, double& c) {
    if (!by_c[r] && size[r] == cap) hold_by_c(r);
    if (by_c[r])
      offer_by_c(r, fn, idn, c);
    else
      offer_by_f(r, fn, idn);
  }

  void offer_by_c(int64_t r, float fn, int32_t idn, double& c) {
    double* cr = top_c + r * m;
    int64_t* ir = top_ids + r * m;
    if (double(fn) + beta2[r] / 2 < cr[m - 1]) return;  // c <= f + beta < the m-th c
    if (std::isnan(c)) c = nformer::cpu_canonical_dot(query(r), x + int64_t(idn) * d, d);
    if (nformer::topk_insert(cr, ir, m, c, int64_t(idn))) set_gate_by_c(r);
  }

  // Slots [0, m) hold the m largest f, sorted; the tail [m, n) the rest, unsorted, each within
  // 2*beta of the m-th, so an offer shifts at most m entries.
  inline __attribute__((always_inline)) void offer_by_f(int64_t r, float fn, int32_t idn) {
    int n = size[r];
    const int64_t o = r * cap;
    float* fr = f + o;
    int32_t* ir = ids + o;
    if (n >= m && !(fn > fr[m - 1])) {  // into the tail
      if (double(fn) >= floor_of(r)) {
        fr[n] = fn;
        ir[n] = idn;
        size[r] = n + 1;
        tail_min[r] = std::min(tail_min[r], fn);
      }
      return;
    }
    int p = std::min(n, m - 1);
    if (n >= m) {  // the m-th moves to the tail
      fr[n] = fr[m - 1];
      ir[n] = ir[m - 1];
      tail_min[r] = std::min(tail_min[r], fr[m - 1]);
    }
    for (; p > 0 && fr[p - 1] < fn; --p) {
      fr[p] = fr[p - 1];
      ir[p] = ir[p - 1];
    }
    fr[p] = fn;
    ir[p] = idn;
    ++n;
    if (n >= m) {  // drop what ranks below the m first; nothing below m-th f - 2*beta can enter
      const double g = floor_of(r);
      if (double(tail_min[r]) < g) {
        float low = std::numeric_limits<float>::infinity();
        for (int e = m; e < n;) {
          if (double(fr[e]) < g) {
            --n;
            fr[e] = fr[n];
            ir[e] = ir[n];
          } else {
            low = std::min(low, fr[e++]);
          }
        }
        tail_min[r] = low;
      }
      set_gate(r, g);
    }
    size[r] = n;
  }

  // Writes row r's canonical top m to out[1..m]; false if it holds fewer (NaN scores).
  bool finish(int64_t r, int64_t* out) const {
    if (by_c[r]) {
      std::copy(top_ids + r * m, top_ids + (r + 1) * m, out + 1);
      return true;
    }
    if (size[r] < m) return false;
    const Ranked& s = rank(r, false);
    for (int e = 0; e < m; ++e) out[1 + e] = s.all[s.order[e]].second;
    return true;
  }
};

// Does any of the kChunk scores reach its row's or its column's gate? The fixed trip count lets
// this compile to a few vector compares.
inline bool chunk_has_candidate(const float* s, const float* col_gate, float row_gate) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int64_t c = 0; c < kChunk; ++c) hit |= (s[c] >= row_gate) | (s[c] >= col_gate[c]);
  return hit != 0;
}

inline bool chunk_has_candidate(const float* s, float row_gate) {
  int hit = 0;
#pragma omp simd reduction(| : hit)
  for (int64_t c = 0; c < kChunk; ++c) hit |= s[c] >= row_gate;
  return hit != 0;
}

// Off-diagonal tile S (ti x tj) = X[i0:i0+ti] X[j0:j0+tj]^T: offers S[a,c] to row i0+a and to row
// j0+c. The caller guarantees no other thread touches these rows meanwhile.
NF_CPU_CLONES void select_pair_tile(const float* S, int64_t ti, int64_t tj, int64_t i0, int64_t j0,
                                    RunningTopk& topk) {
  const float* col_gate = topk.gate + j0;
  const int64_t full = tj - tj % kChunk;
  for (int64_t a = 0; a < ti; ++a) {
    const int64_t gi = i0 + a;
    const float* s = S + a * tj;
    auto offer_range = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double pair_c = kUnknown;  // one canonical score for both rows
        if (s[c] >= topk.gate[gi]) topk.offer(gi, s[c], j0 + c, pair_c);
        if (s[c] >= col_gate[c]) topk.offer(j0 + c, s[c], gi, pair_c);
      }
    };
    for (int64_t c0 = 0; c0 < full; c0 += kChunk)
      if (chunk_has_candidate(s + c0, col_gate + c0, topk.gate[gi])) offer_range(c0, c0 + kChunk);
    offer_range(full, tj);
  }
}

// Tile S (ti x tj) of query rows [r0, r0+ti) against keys [j0, j0+tj) (or the diagonal tile of a
// block, with self_in_tile): offers S[a,c] to query row r0+a, the query's own key skipped.
NF_CPU_CLONES void select_row_tile(const float* S, int64_t ti, int64_t tj, int64_t r0, int64_t j0,
                                   RunningTopk& topk) {
  const int64_t full = tj - tj % kChunk;
  for (int64_t a = 0; a < ti; ++a) {
    const int64_t r = r0 + a;
    const int64_t self = topk.q_rows ? topk.q_rows[r] : r;
    const float* s = S + a * tj;
    auto offer_range = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double unknown = kUnknown;
        if (j0 + c != self && s[c] >= topk.gate[r]) topk.offer(r, s[c], j0 + c, unknown);
      }
    };
    for (int64_t c0 = 0; c0 < full; c0 += kChunk)
      if (chunk_has_candidate(s + c0, topk.gate[r])) offer_range(c0, c0 + kChunk);
    offer_range(full, tj);
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

// Per-row state of the running lists of R query rows, and 2*beta from the norms of the queries and
// of all keys.

struct ListState {
  int m, cap;
  std::vector<float> f, gate, tail_min;
  std::vector<double> beta2, top_c;
  std::vector<int32_t> ids;
  std::vector<int64_t> top_ids;
  std::vector<int> size;
  std::unique_ptr<bool[]> by_c;
  ListState(const float* x, int64_t n, int64_t d, const int64_t* q_rows, int64_t R, int m)
      : m(m),
        cap(m + kSlack),
        f(R * cap),
        gate(R, -std::numeric_limits<float>::infinity()),
        tail_min(R, std::numeric_limits<float>::infinity()),
        beta2(R),
        top_c(R * m),
        ids(R * cap),
        top_ids(R * m),
        size(R, 0),
        by_c(new bool[R]()) {
    std::vector<double> norms(n);
    double top = 0;
    for (int64_t j = 0; j < n; ++j) {
      norms[j] = std::sqrt(nformer::cpu_canonical_dot(x + j * d, x + j * d, d));
      top = std::max(top, norms[j]);
    }
    for (int64_t r = 0; r < R; ++r) beta2[r] = nformer::fp32_score_bound2(d, norms[q_rows ? q_rows[r] : r], top);
  }
  RunningTopk lists(const float* x, const int64_t* q_rows, int64_t d) {
    return RunningTopk{x,           q_rows,      d,           f.data(),     ids.data(),  size.data(),
                       gate.data(), tail_min.data(), beta2.data(), by_c.get(), top_c.data(), top_ids.data(),
                       m,           cap};
  }
};

// Runs task(I, ...) guarded: an exception must not leave an OpenMP region; the first is rethrown.
struct Guard {
  std::exception_ptr error;
  std::mutex mutex;
  template <typename Task>
  void operator()(Task&& task) {
    try {
      task();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  }
  void rethrow() {
    if (error) std::rethrow_exception(error);
  }
};

// Each row's canonical top m into out (rows x k, slot 0 already self). A list short of m entries
// means some scores were NaN (inputs are checked upstream).
void finish_lists(RunningTopk& topk, int64_t rows, int64_t k, int64_t* out, int threads) {
  bool filled = true;
  // Rows whose lists hold the same keys (a near-duplicate group) are finished one after another,
  // so the key rows their canonical scores read are still in cache: ordered by smallest key.
  std::vector<std::pair<int32_t, int64_t>> by_key(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* ir = topk.ids + r * topk.cap;
    by_key[r] = {topk.size[r] ? *std::min_element(ir, ir + topk.size[r]) : 0, r};
  }
  std::sort(by_key.begin(), by_key.end());
#pragma omp parallel for num_threads(threads) schedule(dynamic, 64) reduction(&& : filled)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = by_key[i].second;
    filled = topk.finish(r, out + r * k) && filled;
  }
  TORCH_CHECK(filled, "knn: non-finite similarities (NaN/Inf in x?)");
}

// knn of one batch item x (N, d) fp32 into out (N, k), using up to `threads` threads.
void knn_one(const at::Tensor& x, int64_t k, int64_t* out, int threads) {
  const int64_t n = x.size(0), d = x.size(1);
  const int m = static_cast<int>(k - 1);
  for (int64_t i = 0; i < n; ++i) out[i * k] = i;
  if (m == 0) return;
  const float* xp = x.data_ptr<float>();
  ListState state(xp, n, d, nullptr, n, m);
  RunningTopk topk = state.lists(xp, nullptr, d);

  const int64_t T = std::min(n, tile_size(n, threads));
  const int64_t nb = (n + T - 1) / T;
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(T * T));
  auto rows = [&](int64_t I) { return std::min(T, n - I * T); };
  auto block = [&](int64_t I) { return x.narrow(0, I * T, rows(I)); };
  // GEMM of blocks I, J into this thread's scratch tile (BLAS runs single-threaded inside the
  // parallel region).
  auto tile = [&](int64_t I, int64_t J) {
    float* buf = scratch[thread_id()].data();
    at::Tensor s = at::from_blob(buf, {rows(I), rows(J)}, x.options());
    at::mm_out(s, block(I), block(J).t());
    return buf;
  };
  Guard guarded;
  // Circle method over M (even) slots; slot nb is a bye when nb is odd. Dynamic scheduling within
  // a round keeps both threads busy when one gets preempted.
  const int64_t M = nb + (nb & 1);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t I = 0; I < nb; ++I)
      guarded([&] { select_row_tile(tile(I, I), rows(I), rows(I), I * T, I * T, topk); });
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
  guarded.rethrow();
  finish_lists(topk, n, k, out, threads);
}

// knn_rows of one batch item: query rows q_rows (R) of x (N, d) fp32 against all N rows, into out (R, k).
void knn_rows_one(const at::Tensor& x, const int64_t* q_rows, int64_t R, int64_t k, int64_t* out, int threads) {
  const int64_t n = x.size(0), d = x.size(1);
  const int m = static_cast<int>(k - 1);
  for (int64_t r = 0; r < R; ++r) out[r * k] = q_rows[r];
  if (m == 0 || R == 0) return;
  const float* xp = x.data_ptr<float>();
  ListState state(xp, n, d, q_rows, R, m);
  RunningTopk topk = state.lists(xp, q_rows, d);
  const at::Tensor queries = x.index_select(0, at::from_blob(const_cast<int64_t*>(q_rows), {R}, at::kLong));
  const int64_t T = std::min<int64_t>(kMaxTile, std::max<int64_t>(64, n));
  const int64_t TQ = std::clamp<int64_t>((R + threads - 1) / threads, 1, kMaxTile);
  const int64_t nq = (R + TQ - 1) / TQ, nk = (n + T - 1) / T;
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(TQ * T));
  Guard guarded;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t I = 0; I < nq; ++I) {
    guarded([&] {
      const int64_t tq = std::min(TQ, R - I * TQ);
      const at::Tensor qb = queries.narrow(0, I * TQ, tq);
      float* buf = scratch[thread_id()].data();
      for (int64_t J = 0; J < nk; ++J) {  // each row block's lists belong to one thread
        const int64_t tk = std::min(T, n - J * T);
        at::Tensor s = at::from_blob(buf, {tq, tk}, x.options());
        at::mm_out(s, qb, x.narrow(0, J * T, tk).t());
        select_row_tile(buf, tq, tk, I * TQ, J * T, topk);
      }
    });
  }
  guarded.rethrow();
  finish_lists(topk, R, k, out, threads);
}

// The values of x as fp32 (fp16/bf16 exactly, fp64 rounded), detached: the canonical score's input.
at::Tensor as_fp32(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B,N,d), got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32/float64/float16/bfloat16, got ", dt);
  // Detached: the tiles are written with mm_out, which refuses inputs that require grad.
  return x.detach().to(at::kFloat).contiguous();
}

at::Tensor knn_cpu(const at::Tensor& x, int64_t k) {
  const at::Tensor xa = as_fp32(x, "knn");
  const int64_t b = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "knn: need 1 <= k <= N, got k=", k, " N=", n);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "knn: the cpu backend takes N < 2^31 rows, got N=", n);
  auto out = at::empty({b, n, k}, x.options().dtype(at::kLong));
  if (b == 0) return out;
  int64_t* out_p = out.data_ptr<int64_t>();
  if (b > 1 && n <= kMaxTile) {  // one tile per item: parallel over the batch instead
    at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) knn_one(xa[bi], k, out_p + bi * n * k, 1);
    });
  } else {
    for (int64_t bi = 0; bi < b; ++bi) knn_one(xa[bi], k, out_p + bi * n * k, at::get_num_threads());
  }
  return out;
}

at::Tensor knn_rows_cpu(const at::Tensor& x, const at::Tensor& rows, int64_t k) {
  const at::Tensor xa = as_fp32(x, "knn_rows");
  const int64_t b = x.size(0), n = x.size(1);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.size(0) == b,
              "knn_rows: rows must be an int64 CPU tensor (B,R) with B=", b, ", got ", rows.scalar_type(), " ",
              rows.sizes());
  TORCH_CHECK(k >= 1 && k <= n, "knn_rows: need 1 <= k <= N, got k=", k, " N=", n);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "knn_rows: the cpu backend takes N < 2^31 rows, got N=", n);
  const int64_t R = rows.size(1);
  auto out = at::empty({b, R, k}, rows.options());
  if (b * R == 0) return out;
  const at::Tensor rc = rows.contiguous();
  auto [lo, hi] = at::aminmax(rc);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, "knn_rows: rows must lie in [0, N)");
  for (int64_t bi = 0; bi < b; ++bi)
    knn_rows_one(xa[bi], rc.data_ptr<int64_t>() + bi * R, R, k, out.data_ptr<int64_t>() + bi * R * k,
                 at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nformer, CPU, m) {
  m.impl("knn", &knn_cpu);
  m.impl("knn_rows", &knn_rows_cpu);
}
