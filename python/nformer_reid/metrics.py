"""Re-ID retrieval metrics with torchreid's protocol (eval_market1501 / eval_cuhk03, plus fast-reid's
mINP): CMC, mAP and mINP, from a distance matrix or straight from features; distances
(plot_cmc, from nformer_reid.plotting, is importable from here too).

Protocol: per query, the gallery entries with the same pid AND the same camera are removed, nothing
else; no id is special (0-based, negative and non-contiguous ids are ordinary ids). A query left
without a match is skipped.

evaluate_rank never argsorts a gallery row. A true match's rank is 1 + the number of kept gallery
entries before it, and only entries no farther than a query's farthest true match can precede
one. Per chunk of queries it selects those entries (one compare + one compaction pass), sorts
their (query, distance) keys, and locates every true match in that sorted list by binary search;
the few same-identity entries (matches and same-camera drops) are handled sparsely.
Cost: two passes over Q x G plus O(K log K) for the K entries before the last match (a few % of
Q x G for a trained model; up to all of it for random distances).

evaluate_features computes the same numbers from the features without a Q x G matrix: it streams
(query chunk x gallery chunk) distance blocks and, per true match, counts the block entries ranked
before it by binary search among the query's sorted match keys. Its distances are bitwise those of
compute_distance_matrix: both quantise the features onto an integer grid fine enough for float32
results, so every dot product is an exact float64 integer whatever the block shape, the BLAS
library or the device.

nformer_reid.distributed evaluates the same way over ranks and shares the building blocks by their
public names here: Grid (the integer grid), Matches (same-pid pairs), row_key, as_ids,
check_metric, count_before_matches, peak_abs, same_pid_entries, segment_cumsum, small_gallery.
"""
import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nformer_reid.plotting import plot_cmc  # noqa: F401  (public name of this module)
from nformer_reid.utils.checks import as_bool, as_device, as_int, as_tensor, ldexp

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]

NO_MATCH_MESSAGE = "no query has a valid match in the gallery (same pid in another camera): check the pids/camids"


def _default_device(x):
    if isinstance(x, torch.Tensor):
        return x.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def row_key(rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (row, value) for int64 rows >= 0 and float32 values (-0.0 == +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # sign-magnitude -> ordered
    return bits.add_(rows << 32)


def _row_keys(rows_a, values_a, rows_b, values_b):
    """row_key of two lists at once, for float32 values or (any other dtype) their dense ranks
    among both lists: equal values get equal keys, order is exact in the values' own dtype."""
    if values_a.dtype == torch.float32:
        return row_key(rows_a, values_a), row_key(rows_b, values_b)
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


def as_ids(arr, name: str, expected: Optional[int], device, distmat: bool = False) -> torch.Tensor:
    t = as_tensor(arr, name).reshape(-1)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if expected is not None and t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} entries, the {'query' if name[0] == 'q' else 'gallery'} "
                         f"side has {expected}{' (distmat implies it)' if distmat else ''}")
    return t.to(device=device, dtype=torch.int64)


def same_pid_entries(q_pids, q_cams, g_pids, g_cams):
    """Sparse (query, gallery) pairs with the same pid, grouped by query, gallery index ascending.

    Returns rows, cols, is_match (other camera), dropped (same camera: removed from the ranking).
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
    return rows, cols, ~dropped, dropped


def count_valid_queries(q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike) -> int:
    """How many queries have a valid match in the gallery (the same pid in another camera; any
    integer ids): the queries evaluate_rank scores (it raises ValueError when there are none)."""
    q_p, g_p = as_ids(q_pids, "q_pids", None, "cpu"), as_ids(g_pids, "g_pids", None, "cpu")
    q_c, g_c = as_ids(q_camids, "q_camids", q_p.numel(), "cpu"), as_ids(g_camids, "g_camids", g_p.numel(), "cpu")
    if q_p.numel() == 0 or g_p.numel() == 0:
        return 0
    rows, _, is_match, _ = same_pid_entries(q_p, q_c, g_p, g_c)
    return int(torch.unique(rows[is_match]).numel())


def segment_cumsum(flags: torch.Tensor, seg_start: torch.Tensor, seg_id: torch.Tensor) -> torch.Tensor:
    """Inclusive running count of flags within segments of a grouped 1-D list."""
    total = torch.cumsum(flags, 0)
    before = torch.cat([total.new_zeros(1), total])[seg_start]
    return total - before[seg_id]


class Matches:
    """The true matches of every query, sorted by (query, distance, gallery index), with what the
    ranking needs of the same-identity entries: kth (1-based order of the match among its query's
    matches) and drops_before (same-camera entries of the query's pid ranked before it)."""

    def __init__(self, s_row, s_col, s_match, s_drop, s_dist, num_q: int, work: torch.dtype, caller: str):
        if work == torch.float32:
            order = torch.sort(row_key(s_row, s_dist), stable=True).indices
        else:  # by distance, then (stable) by query
            order = torch.sort(s_dist, stable=True).indices
            order = order[torch.sort(s_row[order], stable=True).indices]
        s_row, s_col, s_match, s_drop, s_dist = (t[order] for t in (s_row, s_col, s_match, s_drop, s_dist))
        s_count = torch.bincount(s_row, minlength=num_q)
        s_start = torch.cumsum(s_count, 0) - s_count
        kth = segment_cumsum(s_match, s_start, s_row)
        drops_before = segment_cumsum(s_drop, s_start, s_row)
        keep = s_match.nonzero().squeeze(1)
        self.row, self.col, self.dist, self.kth, self.drops_before = (
            t[keep] for t in (s_row, s_col, s_dist, kth, drops_before))
        self.num_pos = torch.bincount(self.row, minlength=num_q)
        self.start = torch.cumsum(self.num_pos, 0) - self.num_pos  # matches are grouped by query
        self.has_match = self.num_pos > 0
        lowest = torch.finfo(work).min if work.is_floating_point else torch.iinfo(work).min
        self.far = torch.full((num_q,), lowest, dtype=work, device=s_row.device).scatter_reduce_(
            0, self.row, self.dist, reduce="amax")  # farthest match per query
        self.num_valid = int(self.has_match.sum())
        if self.num_valid == 0:
            raise ValueError(NO_MATCH_MESSAGE)
        if self.num_valid < num_q:
            warnings.warn(f"{caller}: {num_q - self.num_valid} of {num_q} queries have no valid gallery match "
                          "and are skipped", RuntimeWarning, stacklevel=3)

    def span(self, start: int, stop: int) -> Tuple[int, int]:
        """The slice of the match lists that belongs to queries start..stop-1."""
        return int(self.start[start]), int(self.start[stop - 1] + self.num_pos[stop - 1])


def small_gallery(max_rank: int, num_g: int, caller: str) -> int:
    if num_g < max_rank:  # torchreid prints the same note and cuts max_rank
        warnings.warn(f"{caller}: number of gallery samples is quite small, got {num_g}: CMC cut to {num_g} ranks",
                      RuntimeWarning, stacklevel=3)
        return num_g
    return max_rank


def _scores(matches: Matches, before: torch.Tensor, num_g: int, max_rank: int, cmc: Optional[torch.Tensor],
            return_mINP: bool):
    """cmc, mAP (and mINP) from before[j] = gallery entries (any identity) ranked before match j."""
    rank = (before + 1 - matches.drops_before).double()  # 1-based rank within the kept list
    num_q = matches.num_pos.numel()
    ap = torch.zeros(num_q, dtype=torch.float64, device=rank.device).index_add_(
        0, matches.row, matches.kth.double() / rank)
    mAP = float((ap / matches.num_pos.clamp(min=1)).sum() / matches.num_valid)
    if cmc is None:  # first-match CMC
        first = rank[matches.kth == 1].long()
        hits = torch.bincount(first - 1, minlength=num_g).double()
        cmc = torch.cumsum(hits, 0)[:max_rank] / matches.num_valid
    cmc = cmc.float().cpu().numpy()
    if not return_mINP:
        return cmc, mAP
    # INP = num_rel / (rank of the last match): the last match is the one with kth == num_pos
    last = matches.kth == matches.num_pos[matches.row]
    inp = matches.num_pos[matches.row[last]].double() / rank[last]
    return cmc, mAP, float(inp.sum() / matches.num_valid)


def _cuhk03_cmc(dist, ids, work, device, matches: Matches, g_match_cols, max_rank: int, seed: int,
                num_repeats: int) -> torch.Tensor:
    """Single-shot CMC: per query and repeat, one random kept gallery entry per gallery pid.
    g_match_cols: each query's match columns in gallery-index order (grouped like matches.start)."""
    g_pids = ids["g_pids"]
    uniq, g_slot = torch.unique(g_pids, return_inverse=True)  # pid slots, ascending pids
    num_pids = uniq.numel()
    members = torch.argsort(g_slot, stable=True)  # gallery indices grouped by pid, ascending
    counts = torch.bincount(g_slot, minlength=num_pids)
    starts = torch.cumsum(counts, 0) - counts
    valid = matches.has_match.nonzero().squeeze(1)
    own = torch.searchsorted(uniq, ids["q_pids"][valid])  # a valid query's pid is in the gallery
    rng = np.random.default_rng(seed)
    hits = torch.zeros(num_pids, dtype=torch.float64, device=device)
    step = max(1, (1 << 22) // (num_repeats * num_pids))  # draws per pass
    for s in range(0, valid.numel(), step):
        q = valid[s:s + step]
        n = q.numel()
        u = torch.from_numpy(rng.random((n, num_repeats, num_pids))).to(device)
        cnt = counts.expand(n, num_pids).clone()
        cnt[torch.arange(n, device=device), own[s:s + step]] = matches.num_pos[q]  # own pid: other cameras only
        pick = torch.minimum((u * cnt[:, None, :]).long(), cnt[:, None, :] - 1)  # floor(u * count)
        cols = members[(starts[None, None, :] + pick).clamp_(max=g_pids.numel() - 1)]
        own_pick = pick[torch.arange(n, device=device), :, own[s:s + step]]  # (n, repeats)
        own_cols = g_match_cols[matches.start[q][:, None] + own_pick]
        cols[torch.arange(n, device=device), :, own[s:s + step]] = own_cols
        rows = dist[q.to(dist.device)].to(device=device, dtype=work)
        sampled = torch.gather(rows, 1, cols.reshape(n, -1)).reshape(n, num_repeats, num_pids)
        m_dist = torch.gather(rows, 1, own_cols)[:, :, None]
        # 0-based position of the match among the sampled entries (equal distances: gallery index)
        pos = ((sampled < m_dist) | ((sampled == m_dist) & (cols < own_cols[:, :, None]))).sum(-1)
        hits += torch.bincount(pos.reshape(-1), minlength=num_pids).double()
    return torch.cumsum(hits, 0)[:min(max_rank, num_pids)] / (num_repeats * matches.num_valid)


def evaluate_rank(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                  g_camids: ArrayLike, max_rank: int = 50, use_metric_cuhk03: bool = False,
                  return_mINP: bool = False, *, chunk_size: Optional[int] = None, device=None,
                  seed: int = 0, num_repeats: int = 10):
    """CMC and mAP (and mINP) of a query x gallery distance matrix (smaller = more similar), as
    torchreid's evaluate_rank (eval_market1501 / eval_cuhk03) and fast-reid's mINP compute them.

    Protocol: per query, gallery entries with the same pid AND the same camera are removed, nothing
    else: pids and camids are any integers (0-based, negative, non-contiguous), none is special.
    Queries left with no match are skipped (one RuntimeWarning; ValueError if no query has one).
    CMC is first-match (cmc[r] = fraction of scored queries whose first match is within the top r+1
    of the kept list); AP is averaged over the kept list; INP = (number of matches) / (rank of the
    last match), averaged over the scored queries (fast-reid's mINP). max_rank larger than the
    gallery is cut to it (with torchreid's "number of gallery samples is quite small" note, as a
    RuntimeWarning).

    use_metric_cuhk03: CUHK03's single-shot CMC: per query and for each of num_repeats repeats, one
    kept gallery entry per gallery pid is drawn at random and the CMC of that list is averaged over
    the repeats; the cmc has min(max_rank, number of gallery pids) entries. mAP and mINP use the
    full kept list (as torchreid's eval_cuhk03 does for AP). The draws are reproducible from seed:
    u = numpy.random.default_rng(seed).random((V, num_repeats, P)) for the V scored queries (in
    query order) and the P gallery pids (ascending); pid p's sample is entry min(floor(u * n), n - 1)
    of its n kept entries in gallery-index order. torchreid draws from numpy's global generator
    instead, so only the deterministic parts (mAP, mINP; the CMC when every pid has one kept entry)
    equal torchreid's exactly.

    Distances are compared exactly in their own precision (float16 / bfloat16 / float32 as float32,
    float64 as float64, integers as int64); equal distances rank by gallery index (as a stable
    argsort would). Any strides (transposed, sliced, broadcast) are accepted.

    distmat: (Q, G) numpy array or torch tensor of real numbers, all finite (else ValueError);
    pids/camids: integer arrays of length Q and G. max_rank, chunk_size (queries per pass, default
    ~16M distances), num_repeats (>= 1) and seed (>= 0) are ints (numpy integers accepted).
    Runs on distmat's device for tensors, else on CUDA when available (or on `device`).
    Returns (cmc, mAP), or (cmc, mAP, mINP) with return_mINP: cmc a float32 numpy array, mAP and
    mINP floats, all in [0, 1].
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
    use_metric_cuhk03 = as_bool(use_metric_cuhk03, "use_metric_cuhk03")
    return_mINP = as_bool(return_mINP, "return_mINP")
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    seed = as_int(seed, "seed", minimum=0)
    num_repeats = as_int(num_repeats, "num_repeats", minimum=1)
    ids = {name: as_ids(arr, name, n, device, distmat=True) for name, arr, n in (
        ("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g), ("q_camids", q_camids, num_q),
        ("g_camids", g_camids, num_g))}
    work = _working_dtype(dist.dtype)

    # Same-identity entries, sorted by (query, distance, gallery index): k-th match and drops before it.
    s_row, s_col, s_match, s_drop = same_pid_entries(ids["q_pids"], ids["q_camids"], ids["g_pids"],
                                                      ids["g_camids"])
    s_dist = dist[s_row.to(dist.device), s_col.to(dist.device)].to(device=device, dtype=work)
    if s_dist.is_floating_point() and not bool(torch.isfinite(s_dist).all()):
        raise ValueError("distmat contains NaN or Inf")
    g_match_cols = s_col[s_match]  # grouped by query, gallery index ascending (CUHK03 sampling)
    matches = Matches(s_row, s_col, s_match, s_drop, s_dist, num_q, work, "evaluate_rank")
    if chunk_size is None:  # ~16M distances per chunk
        chunk_size = max(1, (1 << 24) // num_g)

    # before[j] = number of gallery entries (any identity) ranked before match j.
    m_row, m_col, m_dist, far = matches.row, matches.col, matches.dist, matches.far
    before = torch.zeros_like(m_row)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        d = dist[start:stop].to(device=device, dtype=work).contiguous()
        if d.is_floating_point() and not bool(torch.isfinite(d.sum())) and not bool(torch.isfinite(d).all()):
            raise ValueError("distmat contains NaN or Inf")
        if not bool(matches.has_match[start:stop].any()):
            continue
        # entries no farther than the query's farthest match (queries without a match: none)
        sel = (d <= far[start:stop, None]) & matches.has_match[start:stop, None]
        flat = sel.view(-1).nonzero().squeeze(1)
        lo, hi = matches.span(start, stop)
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

    max_rank = small_gallery(max_rank, num_g, "evaluate_rank")
    cmc = None
    if use_metric_cuhk03:
        cmc = _cuhk03_cmc(dist, ids, work, device, matches, g_match_cols, max_rank, seed, num_repeats)
    return _scores(matches, before, num_g, max_rank, cmc, return_mINP)


# ------------------------------------------------------------------------------------------ distances
def _ceil_log2(n: int) -> int:
    return max(0, int(n) - 1).bit_length()


def _scale(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x * 2**exponent (exact barring over/underflow): one multiply where 2**exponent is a float64."""
    return x * 2.0 ** exponent if abs(exponent) <= 1000 else ldexp(x, exponent)


class Grid:
    """Distances on an integer grid: rows are quantised to integers of at most `bits` bits (exact
    in float64), so a dot product of two rows, by BLAS or elementwise, is an exact float64 integer
    in any summation order (d * 4**bits * 4 < 2**53), and one distance is a function of its two
    rows alone, bit for bit, whatever the block it is computed in.

    Unnormalised "euclidean": one common power-of-two scale 2**exponent >= every |x| (the distances
    are exact squared distances of the quantised rows, then rounded once to float32).
    normalize / "cosine": each row is first quantised on its own power-of-two scale, L2-normalised
    from its exact squared norm, then quantised on the unit grid (zero rows stay zero).
    """

    def __init__(self, dim: int, metric: str, normalize: bool, peak: float):
        self.metric, self.unit = metric, bool(normalize or metric == "cosine")
        self.bits = max(1, min(26, (51 - _ceil_log2(dim)) // 2))
        self.norm_bits = max(1, min(26, (53 - _ceil_log2(dim)) // 2))
        self.exponent = 0 if self.unit or peak == 0 else math.frexp(peak)[1]
        self.scale = 2 * (self.exponent - self.bits)  # squared distance = integer * 2**scale
        # whether a squared distance can exceed float32 (then every block is checked)
        self.may_overflow = not self.unit and self.scale + 2 + _ceil_log2(dim) + 2 * self.bits >= 127

    def rows(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued float64 rows, their exact squared norms) of a chunk of feature rows
        (never modifies x; in-place work on one float64 copy)."""
        x = x.to(dtype=torch.float64, copy=True)
        if not self.unit:
            half = (self.bits - self.exponent) // 2  # in two factors: each is a finite float64
            x.mul_(2.0 ** half).mul_(2.0 ** (self.bits - self.exponent - half)).round_()
        else:
            peak = x.abs().amax(1) if x.shape[1] else x.new_zeros(x.shape[0])
            exp = self.norm_bits - torch.frexp(peak).exponent.to(torch.int64)
            half = torch.div(exp, 2, rounding_mode="floor")
            one = torch.ones(exp.shape, dtype=x.dtype, device=x.device)
            x.mul_(torch.ldexp(one, half)[:, None]).mul_(torch.ldexp(one, exp - half)[:, None]).round_()
            norm = torch.sqrt((x * x).sum(1))  # exact sum of integer squares, one rounding
            x.div_(torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]).mul_(2.0 ** self.bits).round_()
        return x, (x * x).sum(1)

    def _to_float32(self, squared: torch.Tensor) -> torch.Tensor:
        """float32 of the exact integer squared distances times 2**scale (one rounding)."""
        if abs(self.scale) <= 1000:  # scale and round to float32 in one pass (computed in float64)
            out = torch.mul(squared, 2.0 ** self.scale, out=torch.empty(squared.shape, dtype=torch.float32,
                                                                        device=squared.device))
        else:
            out = _scale(squared, self.scale).float()
        if self.may_overflow and out.numel() and not bool(torch.isfinite(out).all()):
            raise ValueError("squared distances between qf and gf exceed the float32 range; rescale the features "
                             "or use normalize=True")
        return out

    def block(self, q, q_sq, g, g_sq) -> torch.Tensor:
        """float32 distances of every q row to every g row (rows and norms from `rows`)."""
        if self.metric == "cosine":
            return (1 - _scale(q @ g.T, -2 * self.bits)).float().clamp_(0, 2)
        # q_sq + g_sq - 2 q.g: every partial sum is an integer below 2**53, so addmm is exact in any order
        return self._to_float32(torch.addmm(q_sq[:, None] + g_sq[None, :], q, g.T, alpha=-2))

    def pairs(self, q, q_sq, g, g_sq) -> torch.Tensor:
        """Distances of matched rows q[i] - g[i]: the same bits as the block entries."""
        dot = (q * g).sum(1)
        if self.metric == "cosine":
            return (1 - _scale(dot, -2 * self.bits)).float().clamp_(0, 2)
        return self._to_float32((q_sq + g_sq) - 2 * dot)


def check_metric(metric, normalize):
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return as_bool(normalize, "normalize")


def _row_chunk(x: torch.Tensor) -> int:
    return max(1, (1 << 22) // max(1, x.shape[1]))  # ~4M elements per temporary


def peak_abs(x: torch.Tensor) -> float:
    """max |x| without a full-size temporary."""
    peak, step = 0.0, _row_chunk(x)
    for s in range(0, x.shape[0], step):
        if x.shape[1]:
            peak = max(peak, float(x[s:s + step].abs().max()))
    return peak


def _features(x, name: str) -> torch.Tensor:
    """A 2-D real feature matrix as a tensor (as utils.checks.as_features, but the finite check runs
    in row chunks and integers stay integers: no temporary of the features' size)."""
    t = as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if t.is_floating_point():
        step = _row_chunk(t)
        for s in range(0, t.shape[0], step):
            if not bool(torch.isfinite(t[s:s + step]).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    return t


def _check_features(qf, gf):
    qf, gf = _features(qf, "qf"), _features(gf, "gf")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be (Q,d) and (G,d), got {tuple(qf.shape)} and {tuple(gf.shape)}")
    return qf, gf


def _grid_for(qf, gf, metric, normalize) -> Grid:
    unit = normalize or metric == "cosine"
    return Grid(qf.shape[1], metric, normalize, 0.0 if unit else max(peak_abs(qf), peak_abs(gf)))


def compute_distance_matrix(qf: ArrayLike, gf: ArrayLike, metric: str = "euclidean",
                            normalize: bool = False, chunk_size: int = 4096) -> torch.Tensor:
    """Query x gallery distances as a float32 tensor, as torchreid's compute_distance_matrix:
    "euclidean" = squared Euclidean distance of the features as given, "cosine" = 1 - cosine
    similarity (rows L2-normalised). normalize=True L2-normalises both sides first for either
    metric (the usual Re-ID choice; evaluate features that way by asking for it).

    qf (Q, d) and gf (G, d): finite real numbers (numpy or torch, any dtype and strides; ValueError
    for NaN/Inf), on one device. Features are quantised to a grid of about 21 bits (d = 256; 24 for
    small d) relative to their largest magnitude (per row when normalised), which keeps the result
    float32-accurate and makes every entry independent of chunking (evaluate_features gives the same
    bits). Scale-free: 1e-30 and 1e30 features give the same distances up to the scale; a zero row
    normalises to the zero vector (cosine distance 1, squared Euclidean distance 1 to every unit
    vector). Without normalize, ValueError if a squared distance exceeds the float32 range.
    Results are >= 0 ("euclidean") and within [0, 2] ("cosine"); Q or G may be 0. chunk_size:
    query rows per pass (a positive int).
    """
    normalize = check_metric(metric, normalize)
    chunk_size = as_int(chunk_size, "chunk_size", minimum=1)
    qf, gf = _check_features(qf, gf)
    if qf.device != gf.device:
        raise ValueError(f"qf and gf must be on one device, got {qf.device} and {gf.device}")
    grid = _grid_for(qf, gf, metric, normalize)
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    g, g_sq = grid.rows(gf)
    g_step = max(1, (1 << 24) // max(1, min(chunk_size, qf.shape[0])))  # float64 temporaries of ~128 MB
    for s in range(0, qf.shape[0], chunk_size):
        q, q_sq = grid.rows(qf[s:s + chunk_size])
        for t in range(0, gf.shape[0], g_step):
            out[s:s + chunk_size, t:t + g_step] = grid.block(q, q_sq, g[t:t + g_step], g_sq[t:t + g_step])
    return out


def count_before_matches(block, far, first_row, first_col, m_keys, tie_keys, num_g, m_end, hist) -> None:
    """Adds to hist[j] the entries of one distance block (global query rows from first_row, gallery
    columns from first_col) whose first following match, in (query, distance, gallery index)
    order, is match j: only entries no farther than their query's farthest match (`far`) count."""
    flat = (block <= far[:, None]).view(-1).nonzero().squeeze(1)
    if flat.numel() == 0:
        return
    width = block.shape[1]
    rows = flat // width + first_row
    keys = row_key(rows, block.view(-1)[flat])
    pos = torch.searchsorted(m_keys, keys)  # matches with a smaller (query, distance) key
    tied = torch.searchsorted(m_keys, keys, right=True) > pos
    if bool(tied.any()):  # equal distance: the entry precedes the tied matches of larger index
        t = tied.nonzero().squeeze(1)
        pos[t] = torch.searchsorted(tie_keys, pos[t] * (num_g + 1) + (flat[t] % width + first_col), right=True)
    pos = pos[pos < m_end[rows]]
    hist += torch.bincount(pos, minlength=hist.numel())


def evaluate_features(qf: ArrayLike, gf: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                      g_camids: ArrayLike, metric: str = "euclidean", normalize: bool = False, max_rank: int = 50,
                      use_metric_cuhk03: bool = False, return_mINP: bool = False, *,
                      query_chunk: Optional[int] = None, gallery_chunk: Optional[int] = None, device=None):
    """evaluate_rank(compute_distance_matrix(qf, gf, metric, normalize), q_pids, g_pids, q_camids,
    g_camids, max_rank, return_mINP=return_mINP) — the same cmc, mAP and mINP, bit for bit — without
    ever holding a Q x G matrix: memory is the features plus O(query_chunk x gallery_chunk) plus
    O(number of same-pid pairs).

    First the distances of every same-pid pair (true matches and same-camera drops) are computed;
    then (query chunk x gallery chunk) distance blocks are streamed, and for each true match the
    block entries ranked before it (smaller distance, or equal distance and smaller gallery index)
    are counted by binary search among the query's sorted match keys. Only entries no farther than
    the query's farthest match are searched.

    qf (Q, d), gf (G, d): finite real features (numpy or torch); ids as for evaluate_rank.
    use_metric_cuhk03=True is refused (ValueError): CUHK03 is small, use evaluate_rank on
    compute_distance_matrix. query_chunk (default min(Q, 4096)) and gallery_chunk (default ~2M
    distances per block) are positive ints. Runs on `device`, else on qf's device for a tensor,
    else on CUDA when available; the features are moved there chunk by chunk.
    Returns (cmc, mAP) or (cmc, mAP, mINP), as evaluate_rank.
    """
    normalize = check_metric(metric, normalize)
    max_rank = as_int(max_rank, "max_rank", minimum=1)
    if as_bool(use_metric_cuhk03, "use_metric_cuhk03"):
        raise ValueError("use_metric_cuhk03 is not supported by evaluate_features (CUHK03 is small): use "
                         "evaluate_rank(compute_distance_matrix(qf, gf, ...), ..., use_metric_cuhk03=True)")
    return_mINP = as_bool(return_mINP, "return_mINP")
    device = as_device(device) if device is not None else _default_device(qf)
    qf, gf = _check_features(qf, gf)
    num_q, num_g = qf.shape[0], gf.shape[0]
    if num_q == 0 or num_g == 0:
        raise ValueError(f"qf and gf must be non-empty, got shapes {tuple(qf.shape)} and {tuple(gf.shape)}")
    query_chunk = min(num_q, 4096) if query_chunk is None else as_int(query_chunk, "query_chunk", minimum=1)
    if gallery_chunk is None:
        gallery_chunk = max(1, (1 << 21) // min(query_chunk, num_q))
    gallery_chunk = as_int(gallery_chunk, "gallery_chunk", minimum=1)
    ids = {name: as_ids(arr, name, n, device) for name, arr, n in (
        ("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g), ("q_camids", q_camids, num_q),
        ("g_camids", g_camids, num_g))}
    grid = _grid_for(qf, gf, metric, normalize)

    # distances of the same-pid pairs, with the arithmetic of the blocks
    s_row, s_col, s_match, s_drop = same_pid_entries(ids["q_pids"], ids["q_camids"], ids["g_pids"],
                                                      ids["g_camids"])
    s_dist = torch.empty(s_row.numel(), dtype=torch.float32, device=device)
    s_end = torch.cumsum(torch.bincount(s_row, minlength=num_q), 0).tolist()  # pairs are grouped by query
    for qs in range(0, num_q, query_chunk):
        qe = min(qs + query_chunk, num_q)
        lo, hi = (s_end[qs - 1] if qs else 0), s_end[qe - 1]
        if lo == hi:
            continue
        q, q_sq = grid.rows(qf[qs:qe].to(device))
        by_col = torch.argsort(s_col[lo:hi], stable=True) + lo  # a gallery row is prepared ~once per chunk
        for s in range(0, hi - lo, 1 << 14):
            idx = by_col[s:s + (1 << 14)]
            r = s_row[idx] - qs
            cols, at = torch.unique(s_col[idx], return_inverse=True)
            g, g_sq = grid.rows(gf[cols.to(gf.device)].to(device))
            s_dist[idx] = grid.pairs(q[r], q_sq[r], g[at], g_sq[at])
    matches = Matches(s_row, s_col, s_match, s_drop, s_dist, num_q, torch.float32, "evaluate_features")
    m_row, m_col, m_dist = matches.row, matches.col, matches.dist
    m_keys = row_key(m_row, m_dist)  # sorted: matches are in (query, distance, gallery index) order
    # Matches with equal (query, distance) form runs, gallery index ascending within: tie_keys orders
    # (run start, gallery index), so an entry tied with a run finds its place by gallery index.
    new_run = torch.ones_like(m_keys, dtype=torch.bool)
    new_run[1:] = m_keys[1:] != m_keys[:-1]
    run_start = torch.cummax(torch.where(new_run, torch.arange(m_keys.numel(), device=device),
                                         torch.zeros_like(m_keys)), 0).values
    tie_keys = run_start * (num_g + 1) + m_col
    m_end = matches.start + matches.num_pos  # per query: one past its last match

    hist = torch.zeros_like(m_row)  # hist[j]: entries whose first following match is j
    for qs in range(0, num_q, query_chunk):
        qe = min(qs + query_chunk, num_q)
        has = matches.has_match[qs:qe]  # (chunks without a match are computed too: the same overflow errors)
        q, q_sq = grid.rows(qf[qs:qe].to(device))
        far = torch.where(has, matches.far[qs:qe], torch.full_like(matches.far[qs:qe], -math.inf))
        for gs in range(0, num_g, gallery_chunk):
            g, g_sq = grid.rows(gf[gs:gs + gallery_chunk].to(device))
            count_before_matches(grid.block(q, q_sq, g, g_sq), far, qs, gs, m_keys, tie_keys, num_g, m_end, hist)
    before = segment_cumsum(hist, matches.start, m_row)
    max_rank = small_gallery(max_rank, num_g, "evaluate_features")
    return _scores(matches, before, num_g, max_rank, None, return_mINP)
