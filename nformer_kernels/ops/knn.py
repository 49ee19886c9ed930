"""knn: fused cosine (or inner-product) top-k, the paper's query isolation, and affinity neighbours."""
from typing import Optional

import torch

from nformer_kernels import _checks, backends, torch_ops
from nformer_kernels.ops.attention import landmark_factors


def knn(x: torch.Tensor, k: int, *, metric: str = "cosine", query_mask: Optional[torch.Tensor] = None):
    """Top-k neighbours of every row of x: (N,d) -> (N,k), (B,N,d) -> (B,N,k) int64.

    Self first, then decreasing similarity (cosine, or raw inner product with metric="dot"),
    ties broken by the smaller index. O(N*k) memory on every backend but `reference`.
    query_mask (bool (N,) or (B,N)): rows flagged as queries never get another query as a
    neighbour (the paper's test-time query-query isolation); other rows are unaffected.
    """
    _checks.check_float(x, "x")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    x, squeezed = _checks.batched(x, "x", 1)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one row")
    k = _checks.check_k(k, x.shape[1])
    x = (_unit_rows(x) if metric == "cosine" else _power_of_two_scaled(x)).contiguous()
    idx = backends.kernel(backends.resolve("knn", x.device, k=k), "knn")(x, k)
    if query_mask is not None:
        idx = _isolate_queries(x, idx, k, query_mask)
    return idx[0] if squeezed else idx


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
