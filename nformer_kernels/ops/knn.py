"""knn: fused cosine (or inner-product) top-k, its certified reduced-precision form, the paper's
query isolation, and affinity neighbours."""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from nformer_kernels import _checks, backends, canonical, torch_ops
from nformer_kernels.ops.attention import landmark_factors


PRECISIONS = ("auto", "exact", "certified")
# Extra stage-1 candidates per row: for k = 20, K' = 32 fills one 32-slot tile of the GPU kernels,
# and certified every row of Gaussian and Re-ID-like features at N = 19,281 (docs/design.md).
DEFAULT_MARGIN = 12
# Above this fraction of uncertified rows, a backend with an exact knn kernel rescans every row with
# it (one symmetric scan) rather than the rows alone (no symmetry: twice the work per row).
_FULL_RESCAN_FRACTION = 0.5


@dataclass(frozen=True)
class KnnStats:
    """What a knn call did: rows, and for a two-stage search (precision="certified", or "exact" on
    cuda/triton) the rows certified by stage 1, the candidates re-scored canonically and the rows
    recomputed by an exact rescan."""

    precision: str
    rows: int
    certified_rows: int = 0
    candidates_rescored: int = 0
    rows_recomputed: int = 0


def knn(x: torch.Tensor, k: int, *, metric: str = "cosine", query_mask: Optional[torch.Tensor] = None,
        precision: str = "auto", margin: Optional[int] = None, return_stats: bool = False):
    """Top-k neighbours of every row of x: (N,d) -> (N,k), (B,N,d) -> (B,N,k) int64.

    Self first, then decreasing canonical score (cosine, or raw inner product with metric="dot"),
    ties broken by the smaller index: the canonical score (nformer_kernels.canonical) has the same
    bits on every backend, device, precision, thread count and CPU, so the answer is the same tensor
    everywhere. O(N*k) memory on every backend but `reference`.
    query_mask (bool (N,) or (B,N)): rows flagged as queries never get another query as a
    neighbour (the paper's test-time query-query isolation); other rows are unaffected.
    precision: how stage 1 scans, never what it returns: "exact" scans fp32 rows, "certified"
    fp16-rounded rows (tensor cores) for k + margin candidates per row, re-scored canonically with a
    per-row proof that no other row can enter the top k; rows it cannot prove are rescanned.
    "auto" is "certified" on CUDA and "exact" on CPUs (fp16 matmul is no faster there).
    return_stats=True returns (idx, KnnStats).
    """
    _checks.check_float(x, "x")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if x.shape[-1:] == (0,):
        raise ValueError(f"x must have at least one feature column, got shape {tuple(x.shape)}")
    x, squeezed = _checks.batched(x, "x", 1)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one row")
    k = _checks.check_k(k, x.shape[1])
    margin = DEFAULT_MARGIN if margin is None else _checks.as_int(margin, "margin")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    rows = canonical.canonical_rows(x, metric)
    if precision == "auto":
        precision = "certified" if rows.device.type == "cuda" else "exact"
    with canonical.exact_fp32_matmul():  # a caller's TF32 / bf16 matmul settings never change an answer
        idx, stats = _search(rows, k, precision, margin)
        if query_mask is not None:
            idx = _isolate_queries(rows, idx, k, query_mask)
    idx = idx[0] if squeezed else idx
    return (idx, stats) if return_stats else idx


def _search(rows, k, precision, margin):
    """The canonical top-k of canonical rows (B,N,d) fp32: directly where the backend's knn kernel is
    exact and stage 1 is fp32, else two-stage (stage 1, knn_rescore, rescan of uncertified rows)."""
    b, n, _ = rows.shape
    # Where K' exceeds the selected backend's limit the whole call runs on the torch backend (logged).
    backend = backends.resolve("knn", rows.device, k=min(n, k + margin))
    if precision == "exact" and backends.exact_knn(backend):
        return backends.kernel(backend, "knn")(rows, k), KnnStats(precision, b * n)
    if min(n, k + margin) == k < n:  # K' = k: the last candidate is in the top k, no row can be certified
        idx = torch.empty((b, n, k), dtype=torch.int64, device=rows.device)
        rescan(rows, idx, torch.ones((b, n), dtype=torch.bool, device=rows.device), k)
        return idx, KnnStats(precision, b * n, 0, 0, b * n)
    stage_dtype = torch.float16 if precision == "certified" else torch.float32
    candidates = stage_candidates(rows, k, margin, stage_dtype)
    idx, certified = rescore(rows, candidates, k, stage_dtype)
    missed = ~certified
    recomputed = int(missed.sum())
    if recomputed:
        rescan(rows, idx, missed, k)
    return idx, KnnStats(precision, b * n, b * n - recomputed, candidates.numel(), recomputed)


def stage_candidates(rows, k, margin, stage_dtype=torch.float16):
    """Stage 1: the backend's knn kernel on the canonical rows rounded to stage_dtype, K' = k + margin
    candidates per row (B,N,K')."""
    kc = min(rows.shape[1], k + margin)
    backend = backends.resolve("knn", rows.device, k=kc, dtype=stage_dtype)
    return backends.kernel(backend, "knn")(rows.to(stage_dtype), kc)


def rescore(rows, candidates, k, stage_dtype=torch.float16):
    """Stage 2: (idx, certified) from the backend's knn_rescore with margin twice the stage-1 bound."""
    margin = 2 * canonical.score_error_bound(rows, stage_dtype)
    backend = backends.resolve("knn_rescore", rows.device, k=candidates.shape[-1])
    return backends.kernel(backend, "knn_rescore")(rows, candidates, k, margin)


def rescan(rows, idx, missed, k):
    """Replace in place the rows flagged in missed (B,N) of idx by an exact rescan: the backend's
    knn_rows (a streaming scan of those rows against every row), or its exact knn of all rows when
    most rows missed and it has one (one symmetric scan costs less than the rows alone)."""
    n = rows.shape[1]
    backend = backends.resolve("knn_rows", rows.device, k=k)
    for bi in missed.any(dim=1).nonzero().squeeze(1).tolist():
        which = missed[bi].nonzero().squeeze(1)
        item = rows[bi:bi + 1]
        if which.numel() > _FULL_RESCAN_FRACTION * n and backends.exact_knn(backend):
            idx[bi, which] = backends.kernel(backend, "knn")(item, k)[0, which]
        else:
            idx[bi, which] = backends.kernel(backend, "knn_rows")(item, which[None], k)[0]
    return idx


def _isolate_queries(x, idx, k, query_mask):
    """Replace the rows of queries by self + top-(k-1) among non-queries."""
    _checks.check_query_mask(query_mask, x.shape)
    query_mask = query_mask.to(x.device).expand(x.shape[:2])  # x: canonical rows
    idx = idx.clone()
    for b in range(x.shape[0]):
        queries = query_mask[b].nonzero().squeeze(1)
        others = (~query_mask[b]).nonzero().squeeze(1)
        if queries.numel() == 0:
            continue
        if others.numel() < k - 1:
            raise ValueError(f"query_mask leaves {others.numel()} non-query rows, fewer than k-1={k - 1}")
        rows = torch.empty(queries.numel(), k, dtype=torch.long, device=x.device)
        rows[:, 0] = queries
        if k > 1:
            rows[:, 1:] = others[torch_ops.topk_rows(x[b, queries], x[b, others], k - 1)]
        idx[b, queries] = rows
    return idx


def landmark_affinity_knn(P, R, topk):
    """Top-`topk` of the landmark affinity sum_h P_h R_h^T (paper Eq. 6) per row, self first.

    P, R: (N,H,l)|(B,N,H,l) landmark factors (landmark_factors). Returns (N,topk)|(B,N,topk) int64.
    """
    P, squeezed = _checks.batched(P, "P", 2)
    R, _ = _checks.batched(R, "R", 2)
    if P.shape != R.shape:
        raise ValueError(f"P {tuple(P.shape)} and R {tuple(R.shape)} must have one shape")
    topk = _checks.check_k(topk, P.shape[1], "topk")
    b, n = P.shape[:2]
    P, R = P.detach().reshape(b, n, -1), R.detach().reshape(b, n, -1)
    idx = torch.stack([torch_ops.topk_rows(P[i], R[i], topk, force_self=True) for i in range(b)])
    return idx[0] if squeezed else idx


def affinity_knn(q, k, landmarks, num_heads, topk):
    """Neighbours from the landmark affinity of q, k themselves (paper Eq. 6), self first."""
    q, squeezed = _checks.batched(q, "q", 1)
    k, _ = _checks.batched(k, "k", 1)
    P, R = landmark_factors(q, k, q[:, landmarks], k[:, landmarks], num_heads)
    idx = landmark_affinity_knn(P, R, topk)
    return idx[0] if squeezed else idx


def _knn_fake(x, k, allow_tf32=False):
    return x.new_empty((*x.shape[:2], k), dtype=torch.int64)


for _op in backends.library_ops("knn"):
    torch.library.register_fake(_op)(_knn_fake)


def _knn_rows_fake(x, rows, k):
    return rows.new_empty((*rows.shape, k))


for _op in backends.library_ops("knn_rows"):
    torch.library.register_fake(_op)(_knn_rows_fake)


def _knn_rescore_fake(x, candidates, k, margin):
    b, n = candidates.shape[:2]
    return candidates.new_empty((b, n, k)), x.new_empty((b, n), dtype=torch.bool)


for _op in backends.library_ops("knn_rescore"):
    torch.library.register_fake(_op)(_knn_rescore_fake)
