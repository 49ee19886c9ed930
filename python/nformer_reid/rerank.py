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

import numpy as np
import torch

import nformer_kernels as nk
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
                      knn_precision: str = KnnOptions.knn_precision) -> np.ndarray:
    """k-reciprocal re-ranking from features in O(N*k1) working memory (plus the (Q,G) output).

    Equal to re_ranking(q_g, q_q, g_g) where the distances are the Euclidean distances between
    the L2-normalised features (the Re-ID convention; the features are normalised here), up to
    float rounding (the weights are accumulated in float64). Assumes no exact distance ties in the
    first max(k1+1, k2) neighbours of any item (nk.knn breaks ties by index, as does the dense
    version's stable sort, but cosine vs squared-distance rounding can order near-ties differently).

    Neighbour lists: nk.knn(features, max(k1+1, k2), precision=knn_precision: every precision
    gives the exact lists, "certified" proves them from fp16 scans) (cosine order = Euclidean order for unit
    vectors) and nk.reciprocal_mask for R(i) and R_half(i). The column maxima of the squared
    distances and the query x gallery distances come from one chunked matmul pass (O(N^2 d)
    time, O(chunk*N) memory). V and its query expansion are sparse (about N*k1*k2 entries); the
    Jaccard term is computed per chunk of queries through an inverted index over gallery items,
    at most `pair_budget` (query entry, gallery entry) pairs at a time.
    Features: numpy arrays or tensors of real numbers (any precision and strides), finite
    (ValueError for NaN/Inf); normalisation is scale-free (1e-30 and 1e30 rows normalise like 1), a
    zero row stays zero. Identical features give od = 0 and a finite result in [0, 1 - lambda_value]
    (their neighbour order is then by index). pair_budget: a positive int.
    Returns the re-ranked (Q, G) distances as a float32 numpy array.
    """
    q, g = as_tensor(q_feat, "q_feat"), as_tensor(g_feat, "g_feat")
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feat and g_feat must be (Q,d) and (G,d), got {tuple(q.shape)} and {tuple(g.shape)}")
    for t, name in ((q, "q_feat"), (g, "g_feat")):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    pair_budget = as_int(pair_budget, "pair_budget", minimum=1)
    device = as_device(device) if device is not None else q.device
    if q.device != g.device:
        raise ValueError(f"q_feat and g_feat must be on one device, got {q.device} and {g.device}")
    num_q, num_g = q.shape[0], g.shape[0]
    n = num_q + num_g
    k1, k2, lambda_value = _check_params(k1, k2, lambda_value, n)
    x = torch.cat([q.to(torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32),
                   g.to(torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32)])
    if not bool(torch.isfinite(x).all()):
        raise ValueError("q_feat or g_feat contains NaN or Inf")
    x = torch.nn.functional.normalize(pow2_row_scale(x).to(device, torch.float32), dim=1)
    if num_q == 0 or num_g == 0:
        return np.zeros((num_q, num_g), dtype=np.float32)

    kk = max(k1 + 1, k2)
    rank = nk.knn(x, kk, precision=knn_precision)
    fwd = rank[:, :k1 + 1]
    keep = nk.reciprocal_mask(fwd)
    half = rank[:, :_half_k(k1) + 1]
    keep_half = nk.reciprocal_mask(half)

    sq_norm = (x.double() ** 2).sum(1)
    col_max, od_qg = _column_max_and_query_dist(x, sq_norm, num_q)
    rows, cols = _expansion(fwd, keep, half, keep_half)
    d2 = _pair_sq_dist(x, sq_norm, rows, cols)
    safe_max = torch.where(col_max > 0, col_max, torch.ones_like(col_max))  # all-zero column: od = 0
    w = torch.exp(-d2 / safe_max[rows])
    w_sum = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, rows, w)
    vals = w / w_sum[rows]
    if k2 != 1:
        rows, cols, vals = _query_expansion(rows, cols, vals, rank[:, :k2], n)
    final = od_qg.mul_(lambda_value)  # the only (Q, G) buffer
    for start, stop, shared in _shared_mass(rows, cols, vals, num_q, n, pair_budget):
        final[start:stop] += (1 - lambda_value) * (1 - shared / (2 - shared)).float()
    return final.cpu().numpy()


def _column_max_and_query_dist(x, sq_norm, num_q, chunk_elems=1 << 25):
    """max_j d(i,j)^2 for every item i (= column max by symmetry) and od for query x gallery."""
    n = x.shape[0]
    chunk = max(1, min(2048, chunk_elems // n))
    sq = sq_norm.float()
    col_max = torch.empty(n, dtype=torch.float64, device=x.device)
    od_qg = torch.empty(num_q, n - num_q, dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        part = torch.addmm(sq[None], x[s:e], x.T, alpha=-2)  # |x_j|^2 - 2 x_i.x_j in the GEMM epilogue
        col_max[s:e] = (part.amax(1) + sq[s:e]).clamp_(min=0).double()
        if s < num_q:
            q = min(e, num_q) - s
            od = part[:q, num_q:].add_(sq[s:s + q, None]).clamp_(min=0)
            top = col_max[s:s + q, None].float()
            od_qg[s:s + q] = od.div_(torch.where(top > 0, top, torch.ones_like(top)))
    return col_max, od_qg


def _pair_sq_dist(x, sq_norm, rows, cols, chunk=1 << 16):
    out = torch.empty(rows.numel(), dtype=torch.float64, device=x.device)
    for s in range(0, rows.numel(), chunk):
        r, c = rows[s:s + chunk], cols[s:s + chunk]
        dot = (x[r] * x[c]).sum(1).double()  # fp32 products: ~1e-7 error, well inside the 1e-6 contract
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


def _shared_mass(rows, cols, vals, num_q, n, pair_budget):
    """Yields (start, stop, s) with s[i, l] = sum_m min(V[start+i, m], V[num_q+l, m]) (float64)
    for chunks of queries, each within pair_budget pairs and pair_budget entries of s."""
    num_g = n - num_q
    device = rows.device
    gal = rows >= num_q  # inverted index over gallery items, grouped by column m
    g_cols, order = torch.sort(cols[gal], stable=True)
    g_rows, g_vals = rows[gal][order] - num_q, vals[gal][order]
    col_count = torch.bincount(g_cols, minlength=n)
    col_ptr = torch.cumsum(col_count, 0) - col_count
    q_sel = (rows < num_q).nonzero().squeeze(1)  # query entries, grouped by row
    q_rows, q_cols, q_vals = rows[q_sel], cols[q_sel], vals[q_sel]
    pairs_per_q = torch.zeros(num_q, dtype=torch.int64, device=device).index_add_(0, q_rows, col_count[q_cols])
    max_rows = max(1, pair_budget // num_g)
    entry_ptr = torch.cumsum(torch.bincount(q_rows, minlength=num_q), 0)
    start = 0
    while start < num_q:
        # as many queries as fit the pair budget (at least one)
        cum = torch.cumsum(pairs_per_q[start:], 0)
        fit = int(torch.searchsorted(cum, torch.tensor(pair_budget, device=device), right=True))
        stop = start + min(max(1, fit), max_rows)
        e0 = 0 if start == 0 else int(entry_ptr[start - 1])
        e1 = int(entry_ptr[stop - 1])
        r, c, v = q_rows[e0:e1], q_cols[e0:e1], q_vals[e0:e1]
        cnt = col_count[c]
        total = int(cnt.sum())
        offs = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        pos = torch.repeat_interleave(col_ptr[c], cnt) + offs
        target = (torch.repeat_interleave(r, cnt) - start) * num_g + g_rows[pos]
        shared = torch.zeros(stop - start, num_g, dtype=torch.float64, device=device)
        shared.view(-1).index_add_(0, target, torch.minimum(torch.repeat_interleave(v, cnt), g_vals[pos]))
        yield start, stop, shared
        start = stop
