"""knn: fused cosine (or inner-product) top-k, its certified reduced-precision form, the paper's
query isolation, and affinity neighbours."""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from nformer_kernels import _checks, backends, torch_ops
from nformer_kernels.ops.attention import landmark_factors


PRECISIONS = ("auto", "exact", "certified")
# Extra stage-1 candidates per row: for k = 20, K' = 32 fills one 32-slot tile of the GPU kernels,
# and certified every row of Gaussian and Re-ID-like features at N = 19,281 (docs/design.md).
DEFAULT_MARGIN = 12


@dataclass(frozen=True)
class KnnStats:
    """What a knn call did: rows, and for precision="certified" the rows certified by stage 1, the
    candidates re-scored exactly and the rows recomputed by an exact scan."""

    precision: str
    rows: int
    certified_rows: int = 0
    candidates_rescored: int = 0
    rows_recomputed: int = 0


def knn(x: torch.Tensor, k: int, *, metric: str = "cosine", query_mask: Optional[torch.Tensor] = None,
        precision: str = "auto", margin: Optional[int] = None, return_stats: bool = False):
    """Top-k neighbours of every row of x: (N,d) -> (N,k), (B,N,d) -> (B,N,k) int64.

    Self first, then decreasing similarity (cosine, or raw inner product with metric="dot"),
    ties broken by the smaller index. O(N*k) memory on every backend but `reference`.
    query_mask (bool (N,) or (B,N)): rows flagged as queries never get another query as a
    neighbour (the paper's test-time query-query isolation); other rows are unaffected.
    precision: "exact" scans in x's precision; "certified" (fp32/fp64 input) scans fp16-rounded
    rows for k + margin candidates, re-scores them exactly and proves per row that no other row
    can enter the top k, recomputing exactly the rows it cannot prove: the exact answer, faster
    where reduced-precision matmul is (GPU tensor cores); "auto" is "certified" for fp32 on CUDA
    and "exact" otherwise. return_stats=True returns (idx, KnnStats).
    """
    _checks.check_float(x, "x")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x, squeezed = _checks.batched(x, "x", 1)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one row")
    k = _checks.check_k(k, x.shape[1])
    margin = DEFAULT_MARGIN if margin is None else _checks.as_int(margin, "margin")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x = (_unit_rows(x) if metric == "cosine" else _power_of_two_scaled(x)).contiguous()
    if precision == "auto":
        precision = "certified" if x.dtype == torch.float32 and x.device.type == "cuda" else "exact"
    if precision == "certified" and x.dtype in (torch.float32, torch.float64):
        idx, stats = _certified_knn(x, k, margin)
    else:  # fp16/bf16 input: already the reduced precision, the exact scan is the answer
        idx = backends.kernel(backends.resolve("knn", x.device, k=k), "knn")(x, k)
        stats = KnnStats(precision, x.shape[0] * x.shape[1])
    if query_mask is not None:
        idx = _isolate_queries(x, idx, k, query_mask)
    idx = idx[0] if squeezed else idx
    return (idx, stats) if return_stats else idx


def _score_error_bound(x: torch.Tensor) -> torch.Tensor:
    """(B,N): per row i, a bound on |approximate - exact| score against any row j (fp16 operands,
    fp32 accumulation, both sides' rounding), from ||x_i|| and max_j ||x_j||.

    fp16 rounding: |x~ - x| <= u|x| + 2^-25 per component (u = 2^-11; 2^-25 covers the subnormal
    range), so |<x~_i,x~_j> - <x_i,x_j>| <= (2u+u^2)|x_i||x_j| + 2^-25(1+u)sqrt(d)(|x_i|+|x_j|)
    + d*2^-50. Accumulating d products: gamma_d = d*v/(1-d*v) times sum|p| <= (1+u)^2|x_i||x_j|,
    with v = 2^-24 (fp32; counted twice for tensor-core accumulation) plus the exact dtype's own
    gamma_d for stage 2. docs/design.md derives it.
    """
    d = x.shape[-1]
    u = 2.0 ** -11
    sub = 2.0 ** -25

    def gamma(v):
        return d * v / (1 - d * v)

    exact_v = 2.0 ** -53 if x.dtype == torch.float64 else 2.0 ** -24
    norms = x.double().norm(dim=-1)  # (B,N)
    top = norms.amax(dim=-1, keepdim=True)
    product = norms * top
    bound = ((2 * u + u * u) + (2 * gamma(2.0 ** -24) + gamma(exact_v)) * (1 + u) ** 2) * product \
        + sub * (1 + u) * math.sqrt(d) * (norms + top) + d * sub * sub
    return (bound * 1.01).to(x.dtype)  # 1% headroom for the rounding of the bound itself


def _certified_knn(x, k, margin):
    b, n, _ = x.shape
    kc = min(n, k + margin)
    backend = backends.resolve("knn", x.device, k=kc)
    candidates = backends.kernel(backend, "knn")(x.to(torch.float16), kc)
    if backend == "triton" and x.dtype == torch.float64:
        backend = backends.resolve("knn", x.device, k=kc,
                                   reason="the triton backend re-scores float32 rows only, not float64")
    idx, certified = backends.kernel(backend, "knn_rescore")(x, candidates, k, 2 * _score_error_bound(x))
    misses = (~certified).nonzero()
    for bi in misses[:, 0].unique().tolist():  # exact scans of the rows stage 1 could not prove
        rows = misses[misses[:, 0] == bi, 1]
        idx[bi, rows] = torch_ops.topk_rows(x[bi, rows], x[bi], k, self_ids=rows)
    stats = KnnStats("certified", b * n, int(certified.sum()), b * n * kc, int(misses.shape[0]))
    return idx, stats


def _unit_rows(x):
    """Rows at unit L2 norm for any finite input: divided by their max-abs first, so the norm can
    neither overflow nor underflow (in fp32 for fp16/bf16 input); zero rows stay zero."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.detach().to(acc)
    peak = xa.abs().amax(dim=-1, keepdim=True)
    xa = xa / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.nn.functional.normalize(xa, dim=-1).to(x.dtype)


def _power_of_two_scaled(x):
    """x times the power of two that brings each batch item's max-abs into [0.5, 1) (in fp32 for
    fp16/bf16 input): inner products keep their order and cannot overflow (|<x_i, x_j>| <= d)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.detach().to(acc)
    peak = xa.abs().amax(dim=(-2, -1), keepdim=True)
    _, exponent = torch.frexp(torch.where(peak > 0, peak, torch.ones_like(peak)))
    first = torch.div(-exponent, 2, rounding_mode="floor")  # two factors: 2^-exponent alone may overflow
    return (xa * torch.exp2(first.to(acc)) * torch.exp2((-exponent - first).to(acc))).to(x.dtype)


def _isolate_queries(x, idx, k, query_mask):
    """Replace the rows of queries by self + top-(k-1) among non-queries."""
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        raise TypeError(f"query_mask must be a bool tensor, got {getattr(query_mask, 'dtype', type(query_mask).__name__)}")
    if tuple(query_mask.shape) not in (tuple(x.shape[1:2]), tuple(x.shape[:2])):
        raise ValueError(f"query_mask must have shape (N,) or (B,N) matching x, got {tuple(query_mask.shape)}")
    query_mask = query_mask.to(x.device).expand(x.shape[:2])
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


def _knn_rescore_fake(x, candidates, k, margin):
    b, n = candidates.shape[:2]
    return candidates.new_empty((b, n, k)), x.new_empty((b, n), dtype=torch.bool)


for _op in backends.library_ops("knn_rescore"):
    torch.library.register_fake(_op)(_knn_rescore_fake)
