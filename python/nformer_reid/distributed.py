"""Re-ID evaluation over queries and a gallery sharded across processes (torch.distributed).

Every rank holds a contiguous block of the query rows and one of the gallery rows, in rank order
(rank 0 the first ones, rank 1 the next, ...; shards may be uneven or empty), with their pids and
camids, and makes the same call:

    evaluate_features_distributed(qf_shard, gf_shard, q_pids, g_pids, q_camids, g_camids, ...)
        == metrics.evaluate_features(qf_all, gf_all, q_pids_all, g_pids_all, ...)   on every rank

the same cmc, mAP (and mINP), bit for bit, ties included (equal distances rank by global gallery
index). No rank holds a Q x G matrix or all of the gallery: gallery blocks travel round the ring
of ranks (nformer_kernels.distributed.ring_blocks: isend/irecv of the next block overlapped with
the work on the block in hand), twice:

1. Pass 1 (quantised features, pids, camids): each rank finds, per local query, the entries of the
   block with the query's pid (true matches: another camera; drops: the same camera) and their
   distances. After it every rank has its queries' full same-identity lists, as the single
   process has them, so its matches sort and its farthest-match bounds are the single process's.
2. Pass 2 (quantised features): each rank streams (query chunk x gallery chunk) distance tiles of
   the block and, per true match, counts the entries ranked before it (smaller distance, or equal
   distance and smaller global gallery index), exactly as evaluate_features does per tile.

The counts are integers, so the order in which blocks arrive does not matter, and a distance is a
function of its two rows alone: the features are quantised once onto evaluate_features' integer
grid (its Grid: one common scale from the largest |feature| of all ranks, or unit rows), where
every dot product is an exact float64 integer whatever the block. The rows travel as the grid's
int32 integers (4 bytes per feature, whatever the input dtype). Per-query AP / INP and the
first-match ranks are local; one all_reduce of a float64 vector (each rank's per-query values in
its own slots, zeros elsewhere: exact) and the CMC hit counts gives every rank the same vectors
as the single process, summed in the same order.

Every argument is checked on every rank and the checks are compared across ranks before any other
communication (nformer_kernels.distributed.gather_checked); an error inside a pass (squared
distances beyond float32) is agreed on after the pass. Either way a bad input on one rank raises
its TypeError/ValueError on every rank instead of leaving the others waiting.
"""
import warnings
from typing import Optional

import torch

from nformer_kernels import distributed as nkd
from nformer_reid.metrics import (NO_MATCH_MESSAGE, Grid, Matches, as_ids, check_metric, count_before_matches,
                                  evaluate_features, peak_abs, row_key, same_pid_entries, segment_cumsum,
                                  small_gallery)
from nformer_reid.utils.checks import as_bool, as_features, as_int

__all__ = ["evaluate_features_distributed"]

_CALLER = "evaluate_features_distributed"
_QUANTISE_ROWS = 1 << 16  # rows quantised at a time (float64 temporaries of 64k x d)
_PAIR_ROWS = 1 << 14  # same-pid pairs whose distances are computed at a time


def _same_on_every_rank(metas, key, what, error=ValueError):
    values = [m[key] for m in metas]
    if any(v != values[0] for v in values):
        raise error(f"{what} must be the same on every rank, got {values}")
    return values[0]


def _transport_dtype(grid: Grid) -> torch.dtype:
    """int32 holds the grid's integers exactly (|x| <= 2**grid.bits); float64 if it ever could not."""
    return torch.int32 if grid.bits <= 30 else torch.float64


def _quantised(grid: Grid, x: torch.Tensor, device) -> torch.Tensor:
    """The grid rows of x (integers, in the transport dtype) on device, a chunk of rows at a time."""
    out = torch.empty(x.shape, dtype=_transport_dtype(grid), device=device)
    for s in range(0, x.shape[0], _QUANTISE_ROWS):
        out[s:s + _QUANTISE_ROWS] = grid.rows(x[s:s + _QUANTISE_ROWS].to(device))[0].to(out.dtype)
    return out


def _grid_rows(rows: torch.Tensor):
    """(float64 rows, exact squared norms) of transported grid rows, as Grid.rows gives them: the
    norms are sums of integers below 2**53, exact in any order."""
    g = rows.double()
    return g, (g * g).sum(1)


def _agree(err: Optional[Exception], rows: int, device, meta: dict, group):
    """Raise a pass's TypeError/ValueError on every rank (gather_checked), else every rank's meta."""
    def check():
        if err is not None:
            raise err
        return rows, device, meta
    return nkd.gather_checked(check, group)[1]


def evaluate_features_distributed(qf_shard, gf_shard, q_pids, g_pids, q_camids, g_camids, metric: str = "euclidean",
                                  normalize: bool = False, max_rank: int = 50, return_mINP: bool = False,
                                  group=None, *, query_chunk: Optional[int] = None,
                                  gallery_chunk: Optional[int] = None):
    """CMC and mAP (and mINP) of queries and a gallery sharded across the ranks of a process group:
    on every rank, metrics.evaluate_features(qf_all, gf_all, q_pids_all, g_pids_all, q_camids_all,
    g_camids_all, metric, normalize, max_rank, return_mINP=return_mINP) of the rows of all ranks
    put together in rank order — the same cmc, mAP and mINP bit for bit (so also evaluate_rank of
    compute_distance_matrix on all rows), equal distances ranked by global gallery index.

    qf_shard (q_local, d) and gf_shard (g_local, d): this rank's contiguous blocks of the query and
    gallery features (finite real numbers, numpy or torch, one device; either may have 0 rows, not
    all ranks together), d the same on every rank. q_pids / q_camids: q_local integers, g_pids /
    g_camids: g_local integers (any integers: 0-based, negative, non-contiguous). metric, normalize,
    max_rank and return_mINP as for evaluate_features, the same on every rank. query_chunk and
    gallery_chunk (positive ints, may differ between ranks) size the distance tiles as in
    evaluate_features (default min(q_local, 4096) x ~4M / query_chunk).
    group: a torch.distributed process group (None: the default group). Without an initialised
    process group, or in a world of 1, this is evaluate_features on the shards as given. With NCCL
    the features must be CUDA tensors on every rank.

    Runs on the features' device. Per rank it holds its own rows quantised (4 bytes per feature),
    at most two gallery blocks in flight (g_r x (4 d + 16) bytes), its queries' same-pid pairs, one
    (query_chunk x gallery_chunk) float64 tile and O(Q) floats for the final sums; it sends and
    receives about (P-1)/P x G x (8 d + 16) bytes in two passes round the ring (counted in
    nformer_kernels.distributed.traffic() as "ring"; the final all_reduce as "scores").
    A bad argument on any rank raises its TypeError/ValueError on every rank (elsewhere prefixed
    "on rank r: "); no query with a valid match on any rank raises ValueError on every rank.
    Skipped queries, and a gallery smaller than max_rank, each give evaluate_features' RuntimeWarning
    on every rank, with the counts of all ranks. Returns (cmc, mAP) or (cmc, mAP, mINP) as
    evaluate_features does.
    """
    inputs = {}

    def check():
        normalize_ = check_metric(metric, normalize)
        max_rank_ = as_int(max_rank, "max_rank", minimum=1)
        return_mINP_ = as_bool(return_mINP, "return_mINP")
        qf, gf = as_features(qf_shard, "qf_shard"), as_features(gf_shard, "gf_shard")
        if qf.shape[1] != gf.shape[1]:
            raise ValueError(f"qf_shard and gf_shard must be (q_local, d) and (g_local, d), got {tuple(qf.shape)} "
                             f"and {tuple(gf.shape)}")
        if qf.device != gf.device:
            raise ValueError(f"qf_shard and gf_shard must be on one device, got {qf.device} and {gf.device}")
        device = qf.device
        chunks = [None if c is None else as_int(c, name, minimum=1)
                  for c, name in ((query_chunk, "query_chunk"), (gallery_chunk, "gallery_chunk"))]
        ids = {name: as_ids(arr, name, n, device) for name, arr, n in (
            ("q_pids", q_pids, qf.shape[0]), ("g_pids", g_pids, gf.shape[0]), ("q_camids", q_camids, qf.shape[0]),
            ("g_camids", g_camids, gf.shape[0]))}
        unit = normalize_ or metric == "cosine"
        inputs.update(qf=qf, gf=gf, ids=ids, chunks=chunks)
        return gf.shape[0], device, {
            "d": qf.shape[1], "metric": metric, "normalize": normalize_, "max_rank": max_rank_,
            "return_mINP": return_mINP_, "queries": qf.shape[0],
            "peak": 0.0 if unit else max(peak_abs(qf), peak_abs(gf))}

    world, metas = nkd.gather_checked(check, group)
    for key, what in (("d", "the feature dim (qf_shard.shape[1])"), ("metric", "metric"),
                      ("normalize", "normalize"), ("max_rank", "max_rank"), ("return_mINP", "return_mINP")):
        _same_on_every_rank(metas, key, what)
    meta = metas[world.rank]
    normalize_, max_rank_, with_mINP = meta["normalize"], meta["max_rank"], meta["return_mINP"]
    qf, gf, ids = inputs["qf"], inputs["gf"], inputs["ids"]
    if world.size == 1:
        return evaluate_features(qf, gf, ids["q_pids"], ids["g_pids"], ids["q_camids"], ids["g_camids"], metric,
                                 normalize_, max_rank_, return_mINP=with_mINP, query_chunk=inputs["chunks"][0],
                                 gallery_chunk=inputs["chunks"][1], device=world.device)
    q_counts = [m["queries"] for m in metas]
    num_q, num_g = sum(q_counts), world.total
    if num_q == 0 or num_g == 0:
        raise ValueError(f"qf_shard and gf_shard must be non-empty on some rank, got {num_q} query and {num_g} "
                         f"gallery rows over {world.size} ranks")
    device, nq = world.device, qf.shape[0]
    grid = Grid(meta["d"], metric, normalize_, max(m["peak"] for m in metas))  # as _grid_for on all rows
    q_rows = _quantised(grid, qf, device)  # made float64 a chunk at a time
    q_sq = torch.cat([_grid_rows(q_rows[s:s + _QUANTISE_ROWS])[1] for s in range(0, nq, _QUANTISE_ROWS)]
                     + [q_rows.new_empty(0, dtype=torch.float64)])
    g_rows = _quantised(grid, gf, device)  # this rank's gallery block, as it travels
    offsets = world.offsets

    # pass 1: every local query's same-pid entries of every block, with their distances
    pieces, err = [], None
    for owner, (rows_b, pids_b, cams_b) in nkd.ring_blocks(world, [g_rows, ids["g_pids"], ids["g_camids"]], "ring"):
        if err is not None or nq == 0 or rows_b.shape[0] == 0:
            continue
        try:
            r, c, is_match, dropped = same_pid_entries(ids["q_pids"], ids["q_camids"], pids_b, cams_b)
            dist = torch.empty(r.numel(), dtype=torch.float32, device=device)
            for s in range(0, r.numel(), _PAIR_ROWS):
                rr, cc = r[s:s + _PAIR_ROWS], c[s:s + _PAIR_ROWS]
                dist[s:s + _PAIR_ROWS] = grid.pairs(q_rows[rr].double(), q_sq[rr], *_grid_rows(rows_b[cc]))
            pieces.append((r, c + offsets[owner], is_match, dropped, dist))
        except (TypeError, ValueError) as exc:  # agreed on below, once every rank has passed its blocks on
            err = exc
    if pieces:  # in (query, global gallery index) order, as same_pid_entries lists all of them at once
        s_row, s_col, s_match, s_drop, s_dist = (torch.cat(t) for t in zip(*pieces))
        order = torch.argsort(s_row * num_g + s_col)
        s_row, s_col, s_match, s_drop, s_dist = (t[order] for t in (s_row, s_col, s_match, s_drop, s_dist))
    else:
        s_col = torch.empty(0, dtype=torch.int64, device=device)
        s_row, s_dist, s_match = s_col, s_col.float(), s_col.bool()
        s_drop = s_match
    valid_local = int(torch.unique(s_row[s_match]).numel())
    valid_counts = [m["valid"] for m in _agree(err, world.rows, device, {"valid": valid_local}, group)]
    num_valid = sum(valid_counts)
    if num_valid == 0:
        raise ValueError(NO_MATCH_MESSAGE)
    if num_valid < num_q:
        warnings.warn(f"{_CALLER}: {num_q - num_valid} of {num_q} queries have no valid gallery match and are "
                      "skipped", RuntimeWarning, stacklevel=2)

    matches = None
    if valid_local:
        with warnings.catch_warnings():  # the skipped queries are counted over all ranks above
            warnings.simplefilter("ignore", RuntimeWarning)
            matches = Matches(s_row, s_col, s_match, s_drop, s_dist, nq, torch.float32, _CALLER)
        m_row, m_col, m_dist = matches.row, matches.col, matches.dist
        m_keys = row_key(m_row, m_dist)  # sorted: (query, distance, gallery index) order
        # Runs of matches at one (query, distance), gallery index ascending: tie_keys orders (run
        # start, global gallery index), so an entry tied with a run finds its place by index.
        new_run = torch.ones_like(m_keys, dtype=torch.bool)
        new_run[1:] = m_keys[1:] != m_keys[:-1]
        run_start = torch.cummax(torch.where(new_run, torch.arange(m_keys.numel(), device=device),
                                             torch.zeros_like(m_keys)), 0).values
        tie_keys = run_start * (num_g + 1) + m_col
        m_end = matches.start + matches.num_pos
        hist = torch.zeros_like(m_row)  # hist[j]: entries whose first following match is j
        far = torch.where(matches.has_match, matches.far, torch.full_like(matches.far, float("-inf")))

    # pass 2: per tile, the entries ranked before each match (every tile is computed, also for
    # queries without a match: the same overflow errors as evaluate_features)
    query_chunk = min(max(nq, 1), 4096) if inputs["chunks"][0] is None else inputs["chunks"][0]
    gallery_chunk = inputs["chunks"][1] or max(1, (1 << 22) // min(query_chunk, max(nq, 1)))
    err = None
    for owner, (rows_b,) in nkd.ring_blocks(world, [g_rows], "ring"):
        if err is not None or nq == 0 or rows_b.shape[0] == 0:
            continue
        try:
            b_sq = torch.cat([_grid_rows(rows_b[s:s + _QUANTISE_ROWS])[1]
                              for s in range(0, rows_b.shape[0], _QUANTISE_ROWS)])
            for qs in range(0, nq, query_chunk):
                qe = min(qs + query_chunk, nq)
                q = q_rows[qs:qe].double()
                for gs in range(0, rows_b.shape[0], gallery_chunk):
                    ge = min(gs + gallery_chunk, rows_b.shape[0])
                    block = grid.block(q, q_sq[qs:qe], rows_b[gs:ge].double(), b_sq[gs:ge])
                    if matches is not None:
                        count_before_matches(block, far[qs:qe], qs, offsets[owner] + gs, m_keys, tie_keys, num_g,
                                              m_end, hist)
        except (TypeError, ValueError) as exc:
            err = exc
    _agree(err, world.rows, device, {}, group)
    max_rank_ = small_gallery(max_rank_, num_g, _CALLER)

    # Per-query AP (and INP) in their global slots, the CMC's first-match counts after them: one
    # all_reduce in which every slot gets one rank's value plus zeros (exact).
    q_off, v_off = sum(q_counts[:world.rank]), sum(valid_counts[:world.rank])
    inp_len = num_valid if with_mINP else 0
    sums = torch.zeros(num_q + inp_len + max_rank_, dtype=torch.float64, device=device)
    if matches is not None:
        before = segment_cumsum(hist, matches.start, m_row)
        rank = (before + 1 - matches.drops_before).double()  # 1-based rank within the kept list
        ap = torch.zeros(nq, dtype=torch.float64, device=device).index_add_(0, m_row, matches.kth.double() / rank)
        sums[q_off:q_off + nq] = ap / matches.num_pos.clamp(min=1)
        first = rank[matches.kth == 1].long() - 1  # 0-based rank of each valid query's first match
        hits = torch.bincount(first.clamp(max=max_rank_), minlength=max_rank_ + 1)[:max_rank_]
        sums[num_q + inp_len:] = hits.double()
        if with_mINP:  # INP = num_rel / rank of the last match, per valid query in query order
            last = matches.kth == matches.num_pos[m_row]
            sums[num_q + v_off:num_q + v_off + valid_local] = matches.num_pos[m_row[last]].double() / rank[last]
    world.all_reduce_sum(sums, "scores")
    cmc = (torch.cumsum(sums[num_q + inp_len:], 0) / num_valid).float().cpu().numpy()
    mAP = float(sums[:num_q].clone().sum() / num_valid)  # a fresh tensor: summed as evaluate_features sums
    if not with_mINP:
        return cmc, mAP
    return cmc, mAP, float(sums[num_q:num_q + num_valid].clone().sum() / num_valid)
