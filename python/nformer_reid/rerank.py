"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017): the dense algorithm and an O(N*k1)-memory version built on nk.knn.

Algorithm (N = Q + G probe+gallery items, d = Euclidean distance):
  od[i, j]  = d(i, j)^2 / max_k d(k, j)^2, transposed (rows i; column maxima; for symmetric d this
              is row i divided by its own maximum); 0 where the column maximum is 0 (an item at
              distance 0 from everything, e.g. all features identical)
  N(i, k)   = the k+1 items nearest to i (self first), ranked by od[i]
  R(i)      = k1-reciprocal neighbours: j in N(i, k1) with i in N(j, k1)
  R*(i)     = R(i) united with R_half(c) for every c in R(i) whose R_half(c) (the same with
              round(k1/2)) has more than 2/3 of its members in R(i)
  V[i, j]   = exp(-od[i, j]) normalised over j in R*(i), else 0
  V <- mean of V over N(i, k2-1) (local query expansion; skipped when k2 == 1)
  jaccard[i, j] = 1 - s / (2 - s), s = sum_m min(V[i, m], V[j, m])
  final     = (1 - lambda) * jaccard + lambda * od, query rows x gallery columns.
"""
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

import nformer_kernels as nk
from nformer_kernels.canonical import exact_fp32_matmul
from nformer_kernels.ops import PRECISIONS as KNN_PRECISIONS
from nformer_reid.config import KnnOptions
from nformer_reid.utils.checks import as_device, as_float, as_int, as_tensor, pow2_row_scale


def _to_numpy(x, name):
    """A 2-D array of finite real distances as numpy (any strides; float16/integers accepted)."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def _check_params(k1, k2, lambda_value, n):
    k1, k2 = as_int(k1, "k1"), as_int(k2, "k2")
    for name, k in (("k1", k1), ("k2", k2)):
        if k < 1:
            raise ValueError(f"{name} must be a positive int, got {k!r}")
    lambda_value = as_float(lambda_value, "lambda_value")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    if max(k1 + 1, k2) > n:
        raise ValueError(f"k1 + 1 = {k1 + 1} and k2 = {k2} must not exceed the number of items N = {n}")
    return k1, k2, lambda_value


def _half_k(k1):
    return int(np.around(k1 / 2.0))  # numpy rounding (half to even), as the reference code


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               dtype=np.float32) -> np.ndarray:
    """Dense k-reciprocal re-ranking (torchreid's API). O(N^2) memory, N = Q + G.

    q_g_dist (Q,G), q_q_dist (Q,Q), g_g_dist (G,G): Euclidean distances, NOT squared (the
    algorithm squares them, as the original code squares its cdist). torchreid's engine passes
    squared Euclidean distances to its copy; pass those to reproduce its numbers, or their square
    roots for the paper's definition. Neighbour ranks break distance ties by index (stable sort).
    dtype: working precision (float32 as the reference code; float64 for tighter comparisons).
    Inputs: numpy arrays or tensors of finite real numbers (ValueError for NaN/Inf), any strides;
    the result is scale-free (distances are divided by a power of two near their largest
    magnitude first) and finite; all-zero distances (identical items) give od = 0 and a result in
    [0, 1 - lambda_value]. k1, k2: positive ints, lambda_value in [0, 1] (numpy scalars accepted).
    Returns the re-ranked (Q, G) distances as a numpy array of `dtype`.
    """
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    q_g, q_q, g_g = (_to_numpy(x, n) for x, n in ((q_g_dist, "q_g_dist"), (q_q_dist, "q_q_dist"),
                                                  (g_g_dist, "g_g_dist")))
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(f"shapes do not fit: q_g {q_g.shape}, q_q {q_q.shape}, g_g {g_g.shape}")
    n = num_q + num_g
    k1, k2, lambda_value = _check_params(k1, k2, lambda_value, n)
    blocks = [q_q, q_g, q_g.T, g_g]
    peak = max(float(np.abs(b).max()) if b.size else 0.0 for b in blocks)
    shift = -math.frexp(peak)[1] if peak > 0 else 0  # exact power-of-two scaling: squares stay in range
    od = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64 if shift else dtype)
    if shift:
        od = (od * 2.0 ** shift).astype(dtype)
    np.square(od, out=od)
    col_max = od.max(axis=0)
    od = np.ascontiguousarray((od / np.where(col_max > 0, col_max, 1)).T)
    kk = max(k1 + 1, k2)
    rank = np.concatenate([np.argsort(od[s:s + 1024], axis=1, kind="stable")[:, :kk]
                           for s in range(0, n, 1024)])
    kh = _half_k(k1) + 1

    def reciprocal(i, k):
        fwd = rank[i, :k]
        return fwd[(rank[fwd, :k] == i).any(axis=1)]

    V = np.zeros((n, n), dtype=dtype)
    for i in range(n):
        r = reciprocal(i, k1 + 1)
        expansion = [r]
        for c in r:
            rc = reciprocal(c, kh)
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                expansion.append(rc)
        members = np.unique(np.concatenate(expansion))
        w = np.exp(-od[i, members])
        V[i, members] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)]).astype(dtype)
    od_qg = od[:num_q, num_q:]
    rows, cols = np.nonzero(V)  # inverted index: items with weight on each column
    by_col = np.argsort(cols, kind="stable")
    col_rows = rows[by_col]
    col_ptr = np.searchsorted(cols[by_col], np.arange(n + 1))
    final = np.empty((num_q, num_g), dtype=dtype)
    for i in range(num_q):
        shared = np.zeros(n, dtype=dtype)
        for j in np.nonzero(V[i])[0]:
            others = col_rows[col_ptr[j]:col_ptr[j + 1]]
            shared[others] += np.minimum(V[i, j], V[others, j])
        jaccard = 1 - shared[num_q:] / (2 - shared[num_q:])
        final[i] = jaccard * (1 - lambda_value) + od_qg[i] * lambda_value
    return final


def re_ranking_sparse(q_feat, g_feat, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                      pair_budget: int = 1 << 22, device=None,
                      knn_precision: str = KnnOptions.knn_precision, topk: Optional[int] = None):
    """k-reciprocal re-ranking from features in O(N*k1) working memory (plus the (Q,G) output).

    Equal to re_ranking(q_g, q_q, g_g) where the distances are the Euclidean distances between
    the L2-normalised features (the Re-ID convention; the features are normalised here), up to
    float rounding (the weights are accumulated in float64). Assumes no exact distance ties in the
    first max(k1+1, k2) neighbours of any item (nk.knn breaks ties by index, as does the dense
    version's stable sort, but cosine vs squared-distance rounding can order near-ties differently).

    Neighbour lists: nk.knn(features, max(k1+1, k2), precision=knn_precision: every precision
    gives the exact lists, "certified" proves them from fp16 scans) (cosine order = Euclidean order
    for unit vectors) and nk.reciprocal_mask for R(i) and R_half(i). The largest squared distance
    of every item (the column maxima od divides by) and the query x gallery products come from one
    pass over the upper triangle of x x^T in tiles (one GEMM and two min-reductions per tile:
    N^2 d / 2 multiply-adds, O(tile) memory). V and its query expansion are sparse (about
    N*k1*k2 entries); the Jaccard term is computed per chunk of queries through an inverted index
    over gallery items, at most `pair_budget` (query entry, gallery entry) pairs and pair_budget
    float64 scratch entries at a time, and only where a query and a gallery item share mass
    (jaccard = 1 elsewhere). Runs on the device of the features (or `device`): CPU or CUDA
    tensors, no host round trip until the result (CUDA matmuls in full fp32 for the call,
    whatever a caller's TF32 / matmul precision settings say: nformer_kernels.canonical.exact_fp32_matmul).

    Features: numpy arrays or tensors of real numbers (any precision and strides), finite
    (ValueError for NaN/Inf); normalisation is scale-free (1e-30 and 1e30 rows normalise like 1), a
    zero row stays zero. Identical features give od = 0 and a finite result in [0, 1 - lambda_value]
    (their neighbour order is then by index). pair_budget: a positive int.
    topk: None (default) returns the re-ranked (Q, G) distances as a float32 numpy array (3.8 GB
    at MSMT17 size, 11,659 x 82,161). An int R >= 1 returns (indices, distances) instead: per
    query the R' = min(R, G) gallery items of smallest re-ranked distance, as (Q, R') int64 and
    float32 numpy arrays in increasing distance (ties by gallery index, as a stable argsort of
    the full rows orders them), in O(pair_budget + N*k1*k2) memory besides them (the query x
    gallery distances are recomputed per chunk of queries: Q*G*d more multiply-adds).
    re_ranking_sparse_chunks streams the full rows instead.
    """
    if topk is not None:
        topk = as_int(topk, "topk", minimum=1)
    plan = _prepare(q_feat, g_feat, k1, k2, lambda_value, pair_budget, device, knn_precision,
                    store=topk is None)
    num_q, num_g = plan.num_q, plan.num_g
    if topk is None:
        if plan.t_qg is None:  # no queries or no gallery items
            return np.zeros((num_q, num_g), dtype=np.float32)
        with exact_fp32_matmul():
            for _ in _final_chunks(plan):
                pass  # each chunk is finished in place in plan.t_qg
        return plan.t_qg.cpu().numpy()
    r = min(topk, num_g)
    idx = np.zeros((num_q, r), dtype=np.int64)
    dist = np.zeros((num_q, r), dtype=np.float32)
    if num_q == 0 or num_g == 0:
        return idx, dist
    with exact_fp32_matmul():
        for start, stop, block in _final_chunks(plan):
            i, d = _stable_smallest(block, r)
            idx[start:stop], dist[start:stop] = i.cpu().numpy(), d.cpu().numpy()
    return idx, dist


def re_ranking_sparse_chunks(q_feat, g_feat, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, *,
                             pair_budget: int = 1 << 22, device=None,
                             knn_precision: str = KnnOptions.knn_precision) -> Iterator[Tuple[int, int, np.ndarray]]:
    """re_ranking_sparse's (Q, G) result as a stream: yields (start, stop, rows) with rows the
    float32 numpy (stop - start, G) re-ranked distances of queries start..stop-1, for consecutive
    slices covering all Q queries in order (each at most pair_budget // G rows, at least one).
    Memory: O(pair_budget + N*k1*k2) besides the rows yielded; the query x gallery distances
    are recomputed per slice. Same arguments and checks as re_ranking_sparse (raised at the
    first next(), as for any generator); same values."""
    plan = _prepare(q_feat, g_feat, k1, k2, lambda_value, pair_budget, device, knn_precision, store=False)
    if plan.num_q and not plan.num_g:
        yield 0, plan.num_q, np.zeros((plan.num_q, 0), dtype=np.float32)
    if plan.num_q == 0 or plan.num_g == 0:
        return
    chunks = _final_chunks(plan)
    while True:
        with exact_fp32_matmul():  # only while a slice is computed, not while the caller holds it
            item = next(chunks, None)
            if item is None:
                return
            start, stop, block = item
            rows = block.cpu().numpy()
        yield start, stop, rows


@dataclass
class _Plan:
    x: torch.Tensor  # (N, d) unit rows (queries first), float32
    sq_norm: torch.Tensor  # (N,) float64 squared norms (1, or 0 for a zero row)
    num_q: int
    num_g: int
    safe_max: torch.Tensor  # (N,) float64 max squared distance of each item (1 where it is 0)
    t_qg: Optional[torch.Tensor]  # (Q, G) float32 sq_g - 2 x_q . x_g (store=True), turned into the result in place
    rows: torch.Tensor  # sparse V (after the query expansion): rows, cols, float64 values
    cols: torch.Tensor
    vals: torch.Tensor
    lambda_value: float
    pair_budget: int


def _prepare(q_feat, g_feat, k1, k2, lambda_value, pair_budget, device, knn_precision, store):
    """Checks the arguments and computes everything but the (Q, G) combination: the neighbour
    lists, the maximum distances, sparse V (and with store the (Q, G) squared distances)."""
    q, g = as_tensor(q_feat, "q_feat"), as_tensor(g_feat, "g_feat")
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feat and g_feat must be (Q,d) and (G,d), got {tuple(q.shape)} and {tuple(g.shape)}")
    for t, name in ((q, "q_feat"), (g, "g_feat")):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    pair_budget = as_int(pair_budget, "pair_budget", minimum=1)
    if not isinstance(knn_precision, str) or knn_precision not in KNN_PRECISIONS:
        raise ValueError(f"knn_precision must be one of {KNN_PRECISIONS}, got {knn_precision!r}")
    device = as_device(device) if device is not None else q.device
    if q.device != g.device:
        raise ValueError(f"q_feat and g_feat must be on one device, got {q.device} and {g.device}")
    num_q, num_g = q.shape[0], g.shape[0]
    n = num_q + num_g
    k1, k2, lambda_value = _check_params(k1, k2, lambda_value, n)
    wide = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    x = torch.cat([q.to(wide), g.to(wide)])
    if not bool(torch.isfinite(x).all()):
        raise ValueError("q_feat or g_feat contains NaN or Inf")
    x = torch.nn.functional.normalize(pow2_row_scale(x).to(device, torch.float32), dim=1)
    sq_norm = (x.double() ** 2).sum(1)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if num_q == 0 or num_g == 0:
        return _Plan(x, sq_norm, num_q, num_g, sq_norm, None, empty, empty, empty.double(), lambda_value,
                     pair_budget)

    kk = max(k1 + 1, k2)
    with exact_fp32_matmul():
        rank = nk.knn(x, kk, precision=knn_precision)
        max_d2, t_qg = _max_sq_dist_pass(x, sq_norm.float(), num_q, store)
        fwd = rank[:, :k1 + 1]
        keep = nk.reciprocal_mask(fwd, check_inputs=False)  # slices of knn lists: valid by construction
        half = rank[:, :_half_k(k1) + 1]
        keep_half = nk.reciprocal_mask(half, check_inputs=False)
        rows, cols = _expansion(fwd, keep, half, keep_half)
        d2 = _pair_sq_dist(x, sq_norm, rows, cols)
    safe_max = torch.where(max_d2 > 0, max_d2, torch.ones_like(max_d2))  # all-zero column: od = 0
    w = torch.exp(-d2 / safe_max[rows])
    w_sum = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, rows, w)
    vals = w / w_sum[rows]
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, rank[:, :k2], n)
    return _Plan(x, sq_norm, num_q, num_g, safe_max, t_qg, rows, cols, vals, lambda_value, pair_budget)


def _final_chunks(plan):
    """Yields (start, stop, block): the finished float32 re-ranked distances of queries
    start..stop-1 (plan.t_qg's rows turned into them in place when it is stored, else new rows)."""
    lam, num_q = plan.lambda_value, plan.num_q
    x, sq = plan.x, plan.sq_norm.float()
    # V moves into the Jaccard pass, which keeps only its inverted index of it
    chunks = _shared_mass(plan.rows, plan.cols, plan.vals, num_q, num_q + plan.num_g, plan.pair_budget, lam < 1)
    plan.rows = plan.cols = plan.vals = None
    for start, stop, pos, shared in chunks:
        if plan.t_qg is not None:
            block = plan.t_qg[start:stop]
        else:
            block = torch.addmm(sq[None, num_q:], x[start:stop], x[num_q:].T, alpha=-2)
        torch.maximum(block, -sq[start:stop, None], out=block)  # d2 >= 0: rounding of (near-)duplicates
        # lambda * od + (1 - lambda) * jaccard, od = (sq_i + block) / max_d2_i, jaccard = 1 where
        # nothing is shared ...
        scale = lam / plan.safe_max[start:stop]
        offset = (scale * plan.sq_norm[start:stop] + (1 - lam)).float()[:, None]
        torch.addcmul(offset, block, scale.float()[:, None], out=block)
        if pos is not None:  # ... and 1 - s / (2 - s) where s > 0
            block.view(-1).index_add_(0, pos, (-(1 - lam) * shared / (2 - shared)).float())
        yield start, stop, block


def _stable_smallest(block, r):
    """(indices, values) of the r smallest entries of each row, increasing, ties by column index."""
    kth = block.topk(r, dim=1, largest=False).values[:, -1:]
    below = block < kth
    tied = block == kth
    chosen = below | (tied & (tied.cumsum(dim=1) <= r - below.sum(dim=1, keepdim=True)))
    ids = chosen.nonzero()[:, 1].view(-1, r)  # per row, in column order
    vals = torch.gather(block, 1, ids)
    order = torch.sort(vals, dim=1, stable=True).indices
    return torch.gather(ids, 1, order), torch.gather(vals, 1, order)


def _blocks(start, stop, step):
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def _max_sq_dist_pass(x, sq, num_q, store, block_rows=None, tile_cols=None):
    """(max_d2, t_qg): every item's largest squared distance to any item (itself included;
    float64, >= 0) and, with store, the (Q, G) float32 t_qg[i, j] = sq_j - 2 x_i.x_j, so that
    d2 = sq_i + t_qg[i, j] (None otherwise).

    One pass over the tiles I <= J of x x^T (queries first; a tile never straddles the
    query/gallery border), one GEMM and two reductions per tile: for unit rows
    max_j d2(i, j) = sq_i + max_j (sq_j - 2 x_i.x_j) = sq_i + 1 - 2 min_j x_i.x_j up to the
    rounding of sq_j = 1 (the query x gallery strip computes sq_j - 2 x_i.x_j itself, in the GEMM,
    as the result needs it). Zero rows (sq = 0) enter the pass as copies of a nonzero row, so the
    extremes are over the nonzero rows; their own distances (d2(i, zero) = sq_i) are added
    exactly. A maximum within fp32 rounding of 0 is 0 (identical features)."""
    n, device = x.shape[0], x.device
    on_gpu = device.type == "cuda"
    rows_per_block = block_rows or 2048  # large GEMMs: fewer calls, near the BLAS peak on 2 cores
    cols_per_tile = tile_cols or (32768 if on_gpu else 4096)
    num_g = n - num_q
    zero = sq == 0
    t_qg = torch.empty((num_q, num_g), device=device) if store else None
    if bool(zero.all()):  # every row zero: every distance is 0
        return torch.zeros(n, dtype=torch.float64, device=device), (t_qg.zero_() if store else None)
    has_zero = bool(zero.any())
    real_sq = sq
    if has_zero:
        first = (~zero).nonzero()[0, 0]
        x = torch.where(zero[:, None], x[first], x)
        sq = torch.where(zero, sq[first], sq)
    min_s = torch.full((n,), float("inf"), device=device)  # min_j x_i.x_j over the plain tiles
    max_t = torch.full((n,), float("-inf"), device=device)  # max_j sq_j - 2 x_i.x_j over the strip
    scratch = torch.empty(rows_per_block * max(rows_per_block, cols_per_tile), device=device)
    strip_rows = rows_per_block if store else min(rows_per_block, max(1, (1 << 24) // max(1, num_g)))
    strip = None if store or not num_q else torch.empty(min(strip_rows, num_q) * num_g, device=device)

    def visit(r0, r1, c0, c1):
        s = torch.mm(x[r0:r1], x[c0:c1].T, out=scratch[:(r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))
        torch.minimum(min_s[r0:r1], s.amin(1), out=min_s[r0:r1])
        if c0 >= r1:  # off the diagonal: the same pairs for the column items
            torch.minimum(min_s[c0:c1], s.amin(0), out=min_s[c0:c1])

    for r0, r1 in _blocks(0, num_q, rows_per_block) + _blocks(num_q, n, rows_per_block):
        visit(r0, r1, r0, r1)
        for c0, c1 in _blocks(r1, num_q if r0 < num_q else n, cols_per_tile):
            visit(r0, r1, c0, c1)
        if r0 < num_q and num_g:  # the query x gallery strip: whole rows, one GEMM per block
            for a0, a1 in _blocks(r0, r1, strip_rows):
                out = t_qg[a0:a1] if store else strip[:(a1 - a0) * num_g].view(a1 - a0, num_g)
                t = torch.addmm(sq[None, num_q:], x[a0:a1], x[num_q:].T, alpha=-2, out=out)
                torch.maximum(max_t[a0:a1], t.amax(1), out=max_t[a0:a1])
                torch.maximum(max_t[num_q:], t.amax(0), out=max_t[num_q:])
    max_d2 = sq.double() + torch.maximum(1 - 2 * min_s.double(), max_t.double())
    if has_zero:
        max_d2 = torch.where(zero, torch.ones_like(max_d2), torch.maximum(max_d2, sq.double()))
        if store:  # the true values of zero rows: x_i.x_j = 0
            t_qg[zero[:num_q]] = real_sq[None, num_q:]
            t_qg[:, zero[num_q:]] = 0
    # Below the rounding of an fp32 d2 of unit rows an item is at distance 0 from everything
    # (all features identical): od = 0, as the dense version's 0/0 convention gives.
    rounding = (x.shape[1] + 2) * 2.0 ** -22
    return torch.where(max_d2 > rounding, max_d2, torch.zeros_like(max_d2)), t_qg


def _pair_sq_dist(x, sq_norm, rows, cols, chunk=1 << 13):
    """d2(rows[p], cols[p]) in float64 from fp32 dot products (chunks small enough to stay in cache)."""
    out = torch.empty(rows.numel(), dtype=torch.float64, device=x.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        dot = torch.bmm(x[r].unsqueeze(1), x[c].unsqueeze(2)).view(-1).double()  # ~1e-7 error: inside 1e-6
        out[s:s + chunk] = (sq_norm[r] + sq_norm[c] - 2 * dot).clamp_(min=0)
    return out


def _expansion(fwd, keep, half, keep_half, chunk=8192):
    """Sparse (row, col) entries of R*(i) for every item i, sorted by (row, col)."""
    rows, cols = [], []
    for s in range(0, fwd.shape[0], chunk):
        r = torch.where(keep[s:s + chunk], fwd[s:s + chunk], -1)  # R(i), -1 = not reciprocal
        cand = fwd[s:s + chunk]
        r_half = torch.where(keep_half[cand], half[cand], -1)  # R_half(c) of each candidate
        len_half = keep_half[cand].sum(-1)
        inside = ((r_half[..., None] == r[:, None, None, :]).any(-1) & (r_half >= 0)).sum(-1)
        accept = keep[s:s + chunk] & (inside.double() > 2.0 / 3 * len_half.double())
        members = torch.cat([r, torch.where(accept[..., None], r_half, -1).flatten(1)], 1)
        members = members.sort(1).values
        first = torch.ones_like(members, dtype=torch.bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        valid = first & (members >= 0)
        rr, cc = valid.nonzero(as_tuple=True)
        rows.append(rr + s)
        cols.append(members[rr, cc])
    return torch.cat(rows), torch.cat(cols)


def _query_expansion(rows, cols, vals, nbrs, n, chunk=4096):
    """V'[i] = mean of V[r] over r in nbrs[i] (sparse, rows of V grouped by row)."""
    counts = torch.bincount(rows, minlength=n)
    ptr = torch.cumsum(counts, 0) - counts
    out_r, out_c, out_v = [], [], []
    k2 = nbrs.shape[1]
    for s in range(0, n, chunk):
        src = nbrs[s:s + chunk].reshape(-1)
        dst = torch.arange(s, s + src.numel() // k2, device=rows.device).repeat_interleave(k2)
        cnt = counts[src]
        total = int(cnt.sum())
        offs = torch.arange(total, device=rows.device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        pos = torch.repeat_interleave(ptr[src], cnt) + offs
        r = torch.repeat_interleave(dst, cnt)
        key = r * n + cols[pos]
        uniq, inv = torch.unique(key, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=vals.dtype, device=vals.device).index_add_(0, inv, vals[pos])
        out_r.append(uniq // n)
        out_c.append(uniq % n)
        out_v.append(summed / k2)
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


def _shared_mass(rows, cols, vals, num_q, n, pair_budget, needed=True):
    """Yields (start, stop, pos, s) for consecutive chunks of queries: pos (int64) the flat
    positions i * G + l in the chunk's (stop - start, G) block of the (query, gallery) pairs
    that share mass and s (float64) their sum_m min(V[start+i, m], V[num_q+l, m]); every other
    pair shares none. Each chunk is within pair_budget pairs and pair_budget scratch entries.
    needed=False (lambda = 1): the same chunks with pos = s = None."""
    num_g = n - num_q
    device = rows.device
    max_rows = max(1, pair_budget // num_g)
    if not needed:
        for start in range(0, num_q, max_rows):
            yield start, min(start + max_rows, num_q), None, None
        return
    gal = rows >= num_q  # inverted index over gallery items, grouped by column m
    g_cols, order = torch.sort(cols[gal], stable=True)
    # int32 positions where they fit: half the memory traffic of the pair arrays below
    small = max(order.numel(), min(max_rows, num_q) * num_g) < 2 ** 31
    index_type = torch.int32 if small else torch.int64
    g_rows, g_vals = (rows[gal][order] - num_q).to(index_type), vals[gal][order]
    col_count = torch.bincount(g_cols, minlength=n)
    del g_cols, order
    col_ptr = (torch.cumsum(col_count, 0) - col_count).to(index_type)
    col_count = col_count.to(index_type)
    q_sel = (rows < num_q).nonzero().squeeze(1)  # query entries, grouped by row
    q_rows, q_cols, q_vals = rows[q_sel], cols[q_sel], vals[q_sel]
    del rows, cols, vals, gal, q_sel  # the index above is all that is needed of V from here on
    pairs_per_q = torch.zeros(num_q, dtype=torch.int64, device=device).index_add_(0, q_rows,
                                                                                  col_count[q_cols].long())
    entry_ptr = torch.cumsum(torch.bincount(q_rows, minlength=num_q), 0)
    cum_pairs = torch.cumsum(pairs_per_q, 0)
    scratch = torch.zeros(min(max_rows, num_q) * num_g, dtype=torch.float64, device=device)
    start = 0
    while start < num_q:
        # as many queries as fit the pair budget (at least one)
        before = 0 if start == 0 else int(cum_pairs[start - 1])
        fit = int(torch.searchsorted(cum_pairs, torch.tensor(before + pair_budget, device=device), right=True))
        stop = min(max(start + 1, fit), start + max_rows, num_q)
        e0 = 0 if start == 0 else int(entry_ptr[start - 1])
        e1 = int(entry_ptr[stop - 1])
        r, c, v = q_rows[e0:e1], q_cols[e0:e1], q_vals[e0:e1]
        cnt = col_count[c]
        total = int(cnt.sum())
        # pair p of entry e: gallery entry col_ptr[c_e] + (p - first pair of e)
        first = torch.cumsum(cnt, 0, dtype=index_type) - cnt
        pos = torch.repeat_interleave(col_ptr[c] - first, cnt, output_size=total)
        pos += torch.arange(total, dtype=index_type, device=device)
        target = torch.repeat_interleave(((r - start) * num_g).to(index_type), cnt, output_size=total)
        target += g_rows[pos]
        mins = torch.repeat_interleave(v, cnt, output_size=total)
        torch.minimum(mins, g_vals[pos], out=mins)
        block = scratch[:(stop - start) * num_g]
        block.index_add_(0, target, mins)
        touched = block.nonzero().squeeze(1)  # V > 0 on its support: shared mass > 0 exactly there
        shared = block[touched]
        block[touched] = 0  # the scratch is all zero again for the next chunk
        yield start, stop, touched, shared
        start = stop
