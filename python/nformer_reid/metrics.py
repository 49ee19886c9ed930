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

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

# Gallery identities that never count as a match (Market-1501 convention): -1 junk, 0 distractor.
NON_MATCH_PIDS = (-1, 0)


def _as_tensor(x, name):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc


def _default_device(distmat):
    if isinstance(distmat, torch.Tensor):
        return distmat.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _row_key(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (row, value) for int64 rows >= 0 and float32 values (-0.0 == +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # sign-magnitude -> ordered
    return bits.add_(rows << 32)


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
    the kept list. Distances are compared in float32; equal distances rank by gallery index
    (as a stable argsort would).

    distmat: (Q, G) numpy array or torch tensor; pids/camids: integer arrays of length Q and G.
    Runs on distmat's device for tensors, else on CUDA when available (or on `device`).
    Returns (cmc, mAP): cmc float32 numpy array of length min(max_rank, G), mAP a float, in [0, 1].
    """
    device = torch.device(device) if device is not None else _default_device(distmat)
    dist = _as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(dist.shape)}")
    if dist.dtype == torch.bool or dist.is_complex():
        raise TypeError(f"distmat must hold real numbers, got {dist.dtype}")
    num_q, num_g = dist.shape
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat must be non-empty, got shape {tuple(dist.shape)}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    ids = {}
    for name, arr, n in (("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g),
                         ("q_camids", q_camids, num_q), ("g_camids", g_camids, num_g)):
        t = _as_tensor(arr, name).reshape(-1)
        if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries, distmat implies {n}")
        ids[name] = t.to(device=device, dtype=torch.int64)
    max_rank = min(max_rank, num_g)

    # Same-identity entries, sorted by (query, distance, gallery index): k-th match and drops before it.
    s_row, s_col, s_match, s_drop = _same_pid_entries(ids["q_pids"], ids["q_camids"], ids["g_pids"],
                                                      ids["g_camids"])
    s_dist = dist[s_row.to(dist.device), s_col.to(dist.device)].to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(s_dist).all()):
        raise ValueError("distmat contains NaN or Inf")
    order = torch.sort(_row_key(s_row, s_dist), stable=True).indices
    s_row, s_col, s_match, s_drop, s_dist = (t[order] for t in (s_row, s_col, s_match, s_drop, s_dist))
    s_count = torch.bincount(s_row, minlength=num_q)
    s_start = torch.cumsum(s_count, 0) - s_count
    kth = _segment_cumsum(s_match, s_start, s_row)
    drops_before = _segment_cumsum(s_drop, s_start, s_row)
    keep = s_match.nonzero().squeeze(1)
    m_row, m_col, m_dist, kth, drops_before = (t[keep] for t in (s_row, s_col, s_dist, kth, drops_before))
    num_pos = torch.bincount(m_row, minlength=num_q)
    far = torch.full((num_q,), float("-inf"), device=device).scatter_reduce_(0, m_row, m_dist, reduce="amax")
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
    before = torch.empty_like(m_row)
    m_start = torch.cumsum(num_pos, 0) - num_pos  # matches are grouped by query
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        d = dist[start:stop].to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(d.sum())) and not bool(torch.isfinite(d).all()):
            raise ValueError("distmat contains NaN or Inf")
        flat = (d <= far[start:stop, None]).view(-1).nonzero().squeeze(1)  # queries w/o a match: none
        keys = torch.sort(_row_key(flat // num_g, d.view(-1)[flat])).values
        lo, hi = int(m_start[start]), int(m_start[stop - 1] + num_pos[stop - 1])
        q_local = m_row[lo:hi] - start
        m_keys = _row_key(q_local, m_dist[lo:hi])
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


def compute_distance_matrix(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean",
                            normalize: bool = True, chunk_size: int = 4096) -> torch.Tensor:
    """Query x gallery distances: "euclidean" = squared Euclidean (torchreid's convention),
    "cosine" = 1 - cosine similarity. normalize L2-normalises both sides first (the Re-ID default)."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    qf, gf = _as_tensor(qf, "qf").float(), _as_tensor(gf, "gf").float()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be (Q,d) and (G,d), got {tuple(qf.shape)} and {tuple(gf.shape)}")
    if normalize or metric == "cosine":
        qf = torch.nn.functional.normalize(qf, dim=1)
        gf = torch.nn.functional.normalize(gf, dim=1)
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    g_sq = (gf * gf).sum(1)
    for s in range(0, qf.shape[0], chunk_size):
        q = qf[s:s + chunk_size]
        sim = q @ gf.T
        if metric == "cosine":
            out[s:s + chunk_size] = 1 - sim
        else:
            out[s:s + chunk_size] = ((q * q).sum(1, keepdim=True) + g_sq[None] - 2 * sim).clamp_(min=0)
    return out
