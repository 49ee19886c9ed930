"""Re-ID retrieval metrics (torchreid / fast-reid protocol): CMC and mAP, distances
(plot_cmc, from nformer_reid.plotting, is importable from here too).

evaluate_rank never argsorts a gallery row. A true match's rank is 1 + the number of kept gallery
entries before it, and only entries no farther than a query's farthest true match can precede
one. Per chunk of queries it selects those entries (one compare + one compaction pass), sorts
their (query, distance) keys, and locates every true match in that sorted list by binary search;
the few same-identity entries (matches and same-camera drops) are handled sparsely.
Cost: two passes over Q x G plus O(K log K) for the K entries before the last match (a few % of
Q x G for a trained model; up to all of it for random distances).
"""
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nformer_reid.plotting import plot_cmc  # noqa: F401  (public name of this module)
from nformer_reid.utils.checks import as_device, as_features, as_int, as_tensor, ldexp, pow2_row_scale, pow2_scale

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# Gallery identities that never count as a match (Market-1501 convention): -1 junk, 0 distractor.
NON_MATCH_PIDS = (-1, 0)


def _default_device(distmat):
    if isinstance(distmat, torch.Tensor):
        return distmat.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _row_key(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (row, value) for int64 rows >= 0 and float32 values (-0.0 == +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # sign-magnitude -> ordered
    return bits.add_(rows << 32)


def _row_keys(rows_a, values_a, rows_b, values_b):
    """_row_key of two lists at once, for float32 values or (any other dtype) their dense ranks
    among both lists: equal values get equal keys, order is exact in the values' own dtype."""
    if values_a.dtype == torch.float32:
        return _row_key(rows_a, values_a), _row_key(rows_b, values_b)
    both = torch.cat([values_a, values_b])
    if both.is_floating_point():
        both = both + 0.0  # -0.0 == +0.0
    rank = torch.unique(both, return_inverse=True)[1]
    return rank[:values_a.numel()].add(rows_a << 32), rank[values_a.numel():].add(rows_b << 32)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower floats (compared exactly), float64 for float64, int64 for
    integers: distances are compared exactly in their own precision."""
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64 if dtype.is_floating_point else torch.int64


def _same_pid_entries(q_pids, q_cams, g_pids, g_cams):
    """Sparse (query, gallery) pairs with the same pid, grouped by query, gallery index ascending.

    Returns rows, cols, is_match (other camera, pid not -1/0), dropped (same camera).
    """
    order = torch.argsort(g_pids, stable=True)
    uniq, counts = torch.unique_consecutive(g_pids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.searchsorted(uniq, q_pids).clamp_(max=uniq.numel() - 1)
    per_q = torch.where(uniq[slot] == q_pids, counts[slot], torch.zeros_like(slot))
    rows = torch.repeat_interleave(torch.arange(q_pids.numel(), device=q_pids.device), per_q)
    first = torch.repeat_interleave(torch.cumsum(per_q, 0) - per_q, per_q)
    cols = order[starts[slot[rows]] + torch.arange(rows.numel(), device=rows.device) - first]
    dropped = g_cams[cols] == q_cams[rows]
    valid_pid = torch.ones_like(dropped)
    for pid in NON_MATCH_PIDS:
        valid_pid &= q_pids[rows] != pid
    return rows, cols, ~dropped & valid_pid, dropped


def count_valid_queries(q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike) -> int:
    """How many queries have a valid match in the gallery (same pid in another camera, pid not
    -1/0): the queries evaluate_rank scores (it raises ValueError when there are none)."""
    ids = []
    for name, arr in (("q_pids", q_pids), ("g_pids", g_pids), ("q_camids", q_camids), ("g_camids", g_camids)):
        t = as_tensor(arr, name).reshape(-1)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        ids.append(t.to(torch.int64))
    q_p, g_p, q_c, g_c = ids
    if q_p.numel() != q_c.numel() or g_p.numel() != g_c.numel():
        raise ValueError("q_pids / q_camids and g_pids / g_camids must have matching lengths")
    if q_p.numel() == 0 or g_p.numel() == 0:
        return 0
    rows, _, is_match, _ = _same_pid_entries(q_p, q_c, g_p, g_c)
    return int(torch.unique(rows[is_match]).numel())


def _segment_cumsum(flags: torch.Tensor, seg_start: torch.Tensor, seg_id: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of flags within segments of a grouped 1-D list."""
    total = torch.cumsum(flags, 0)
    before = torch.cat([total.new_zeros(1), total])[seg_start]
    return total - before[seg_id]


def evaluate_rank(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                  g_camids: ArrayLike, max_rank: int = 50, *, chunk_size: Optional[int] = None,
                  device=None) -> Tuple[np.ndarray, float]:
    """CMC and mAP of a query x gallery distance matrix (smaller = more similar).

    Protocol (torchreid / fast-reid): per query, gallery entries with the same pid AND the same
    camera are dropped; gallery pids -1 (junk) and 0 (distractors) never match; queries left with
    no valid match are skipped (one warning; ValueError if no query has one). CMC is first-match
    (cmc[r] = fraction of queries whose first match is within the top r+1); AP is averaged over
    the kept list. Distances are compared exactly in their own precision (float16 / bfloat16 /
    float32 as float32, float64 as float64, integers as int64); equal distances rank by gallery
    index (as a stable argsort would). Any strides (transposed, sliced, broadcast) are accepted.

    distmat: (Q, G) numpy array or torch tensor of real numbers, all finite (else ValueError);
    pids/camids: integer arrays of length Q and G. max_rank and chunk_size (queries per pass,
    default ~16M distances) are positive ints (numpy integers accepted).
    Runs on distmat's device for tensors, else on CUDA when available (or on `device`).
    Returns (cmc, mAP): cmc float32 numpy array of length min(max_rank, G), mAP a float, in [0, 1].
    """
    device = as_device(device) if device is not None else _default_device(distmat)
    dist = as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(dist.shape)}")
    if dist.dtype == torch.bool or dist.is_complex():
        raise TypeError(f"distmat must hold real numbers, got {dist.dtype}")
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat must be non-empty, got shape {tuple(dist.shape)}")
    max_rank = as_int(max_rank, "max_rank", minimum=1)
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    ids = {}
    for name, arr, n in (("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g),
                         ("q_camids", q_camids, num_q), ("g_camids", g_camids, num_g)):
        t = as_tensor(arr, name).reshape(-1)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries, distmat implies {n}")
        ids[name] = t.to(device=device, dtype=torch.int64)
    max_rank = min(max_rank, num_g)
    work = _working_dtype(dist.dtype)

    # Same-identity entries, sorted by (query, distance, gallery index): k-th match and drops before it.
    s_row, s_col, s_match, s_drop = _same_pid_entries(ids["q_pids"], ids["q_camids"], ids["g_pids"],
                                                      ids["g_camids"])
    s_dist = dist[s_row.to(dist.device), s_col.to(dist.device)].to(device=device, dtype=work)
    if s_dist.is_floating_point() and not bool(torch.isfinite(s_dist).all()):
        raise ValueError("distmat contains NaN or Inf")
    if work == torch.float32:
        order = torch.sort(_row_key(s_row, s_dist), stable=True).indices
    else:  # by distance, then (stable) by query
        order = torch.sort(s_dist, stable=True).indices
        order = order[torch.sort(s_row[order], stable=True).indices]
    s_row, s_col, s_match, s_drop, s_dist = (t[order] for t in (s_row, s_col, s_match, s_drop, s_dist))
    s_count = torch.bincount(s_row, minlength=num_q)
    s_start = torch.cumsum(s_count, 0) - s_count
    kth = _segment_cumsum(s_match, s_start, s_row)
    drops_before = _segment_cumsum(s_drop, s_start, s_row)
    keep = s_match.nonzero().squeeze(1)
    m_row, m_col, m_dist, kth, drops_before = (t[keep] for t in (s_row, s_col, s_dist, kth, drops_before))
    num_pos = torch.bincount(m_row, minlength=num_q)
    lowest = torch.finfo(work).min if work.is_floating_point else torch.iinfo(work).min
    far = torch.full((num_q,), lowest, dtype=work, device=device).scatter_reduce_(0, m_row, m_dist, reduce="amax")
    num_valid = int((num_pos > 0).sum())
    if num_valid == 0:
        raise ValueError("no query has a valid match in the gallery (same pid in another camera, "
                         "pid not -1/0): check the pids/camids")
    if num_valid < num_q:
        warnings.warn(f"evaluate_rank: {num_q - num_valid} of {num_q} queries have no valid gallery match "
                      "and are skipped", RuntimeWarning, stacklevel=2)
    if chunk_size is None:  # ~16M distances per chunk
        chunk_size = max(1, (1 << 24) // num_g)

    # before[j] = number of gallery entries (any identity) ranked before match j.
    before = torch.zeros_like(m_row)
    m_start = torch.cumsum(num_pos, 0) - num_pos  # matches are grouped by query
    has_match = num_pos > 0
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        d = dist[start:stop].to(device=device, dtype=work).contiguous()
        if d.is_floating_point() and not bool(torch.isfinite(d.sum())) and not bool(torch.isfinite(d).all()):
            raise ValueError("distmat contains NaN or Inf")
        if not bool(has_match[start:stop].any()):
            continue
        # entries no farther than the query's farthest match (queries without a match: none)
        sel = (d <= far[start:stop, None]) & has_match[start:stop, None]
        flat = sel.view(-1).nonzero().squeeze(1)
        lo, hi = int(m_start[start]), int(m_start[stop - 1] + num_pos[stop - 1])
        q_local = m_row[lo:hi] - start
        keys, m_keys = _row_keys(flat // num_g, d.view(-1)[flat], q_local, m_dist[lo:hi])
        keys = torch.sort(keys).values
        row_begin = torch.searchsorted(keys, q_local << 32)
        less = torch.searchsorted(keys, m_keys) - row_begin
        ties = torch.searchsorted(keys, m_keys, right=True) - row_begin - less > 1
        for j in ties.nonzero().squeeze(1).tolist():  # rare: another entry at exactly this distance
            row = d[int(q_local[j])]
            less[j] += int((row[: int(m_col[lo + j])] == m_dist[lo + j]).sum())
        before[lo:hi] = less

    rank = (before + 1 - drops_before).double()  # 1-based rank within the kept list
    ap = torch.zeros(num_q, dtype=torch.float64, device=device).index_add_(0, m_row, kth.double() / rank)
    mAP = float((ap / num_pos.clamp(min=1)).sum() / num_valid)
    first = rank[kth == 1].long()
    hits = torch.bincount(first - 1, minlength=num_g).double()
    cmc = (torch.cumsum(hits, 0)[:max_rank] / num_valid).float().cpu().numpy()
    return cmc, mAP


def compute_distance_matrix(qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean",
                            normalize: bool = True, chunk_size: int = 4096) -> torch.Tensor:
    """Query x gallery distances as a float32 tensor: "euclidean" = squared Euclidean (torchreid's
    convention), "cosine" = 1 - cosine similarity. normalize L2-normalises both sides first (the
    Re-ID default).

    qf (Q, d) and gf (G, d): finite real numbers (numpy or torch, any dtype and strides; ValueError
    for NaN/Inf). Normalisation is scale-free (rows are divided by a power of two near their largest
    magnitude first, so 1e-30 and 1e30 features normalise like 1); a zero row normalises to the zero
    vector (cosine distance 1, squared Euclidean distance 1 to every unit vector). Without normalize,
    ValueError if a squared distance exceeds the float32 range. Results are >= 0 ("euclidean") and
    within [0, 2] ("cosine"); Q or G may be 0.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    qf, gf = as_features(qf, "qf"), as_features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be (Q,d) and (G,d), got {tuple(qf.shape)} and {tuple(gf.shape)}")
    if qf.device != gf.device:
        raise ValueError(f"qf and gf must be on one device, got {qf.device} and {gf.device}")
    work = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    qf, gf = qf.to(work), gf.to(work)
    exponent = 0
    if normalize or metric == "cosine":  # exact power-of-two row scaling, then float32 as always
        qf = torch.nn.functional.normalize(pow2_row_scale(qf).float(), dim=1)
        gf = torch.nn.functional.normalize(pow2_row_scale(gf).float(), dim=1)
    else:  # one common power-of-two scale: the squared distances scale by its square
        exponent = max(pow2_scale(qf), pow2_scale(gf))
        qf, gf = ldexp(qf, -exponent).float(), ldexp(gf, -exponent).float()
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    g_sq = (gf * gf).sum(1)
    for s in range(0, qf.shape[0], chunk_size):
        q = qf[s:s + chunk_size]
        sim = q @ gf.T
        if metric == "cosine":
            out[s:s + chunk_size] = (1 - sim).clamp_(0, 2)
        else:
            out[s:s + chunk_size] = ((q * q).sum(1, keepdim=True) + g_sq[None] - 2 * sim).clamp_(min=0)
    if exponent:
        out = ldexp(out.double(), min(2 * exponent, 1000)).float()  # 2**1000: any non-zero entry overflows
        if out.numel() and not bool(torch.isfinite(out).all()):
            raise ValueError("squared distances between qf and gf exceed the float32 range; rescale the features "
                             "or use normalize=True")
    return out
