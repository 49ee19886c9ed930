"""The `torch` backend: the kernel contract (csrc/ops.cpp) in plain PyTorch at O(N*k) memory.

Runs on any device and any k, and its sparse_attention is differentiable through ordinary
autograd for any keep mask. It is the path of every call a kernel backend cannot take
(nformer_kernels.backends.resolve), and can be forced like any backend.
"""
from typing import Optional

import torch

_ROW_CHUNK = 4096  # query rows per similarity block: O(chunk * N) memory
_LOOKUP_CHUNK = 1 << 16  # rows per (chunk, k, k) neighbour-of-neighbour block


def topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int, force_self: bool = False,
              self_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M,k) int64 top-k of queries (M,d) @ keys (N,d)^T, in fp32 (fp64 for fp64 input).

    Entries are ordered by (similarity desc, index asc), and of several candidates tied at the
    k-th place the smaller indices are kept, as every knn kernel does. force_self: row r of
    queries is item r of keys (self_ids: item self_ids[r]), forced first in row r.
    """
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    keys_a = keys.to(acc)
    if force_self and self_ids is None:
        self_ids = torch.arange(queries.shape[0], device=queries.device)
    out = []
    for start in range(0, queries.shape[0], _ROW_CHUNK):
        sim = queries[start:start + _ROW_CHUNK].to(acc) @ keys_a.T
        if self_ids is not None:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, self_ids[start:start + _ROW_CHUNK]] = float("inf")
        kth = sim.topk(k, dim=1).values[:, -1:]
        above = sim > kth
        tied = sim == kth
        # Keep the smaller indices among the candidates tied at the k-th place.
        chosen = above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
        ids = chosen.nonzero()[:, 1].view(-1, k)  # per row, in index order
        vals = torch.gather(sim, 1, ids)
        out.append(torch.gather(ids, 1, torch.sort(-vals, dim=1, stable=True).indices))
    return torch.cat(out)


def knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B,N,k) inner-product top-k of the rows of x (B,N,d), self first."""
    return torch.stack([topk_rows(xb, xb, k, force_self=True) for xb in x])


def _lookup(idx: torch.Tensor, keep=None) -> torch.Tensor:
    """For every (i,t), j = idx[i,t]: the first t2 with idx[j,t2] == i (and keep[j,t2]), else -1."""
    b, n, k = idx.shape
    out = torch.empty_like(idx)
    slots = torch.arange(k, device=idx.device)
    for bi in range(b):
        for start in range(0, n, _LOOKUP_CHUNK):
            nbr = idx[bi, start:start + _LOOKUP_CHUNK]  # (c,k)
            rows = torch.arange(start, start + nbr.shape[0], device=idx.device).view(-1, 1, 1)
            match = idx[bi][nbr] == rows  # (c,k,k): row j = nbr[r,t] lists r at t2
            if keep is not None:
                match &= keep[bi][nbr]
            first = torch.where(match, slots, k).amin(dim=-1)
            out[bi, start:start + nbr.shape[0]] = torch.where(first < k, first, -1)
    return out


def reciprocal_mask(idx: torch.Tensor) -> torch.Tensor:
    """keep (B,N,k) bool: keep[b,i,t] = i in idx[b, idx[b,i,t], :]."""
    return _lookup(idx) >= 0


def reverse_index(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """rev[b,j,t'] = t with idx[b,i,t] == j and keep[b,i,t], i = idx[b,j,t']; else -1."""
    return _lookup(idx, keep)


def sparse_attention(P, R, v, idx, keep, scale):
    """(out (B,N,H*dv) v.dtype, probs (B,N,H,k) P.dtype), gathered: O(N*k*(H*l + d)) memory."""
    b, n, h, _ = P.shape
    dv = v.shape[-1] // h
    bidx = torch.arange(b, device=P.device).view(b, 1, 1)
    s = scale * torch.einsum("bnhl,bnkhl->bnhk", P, R[bidx, idx])
    s = s.masked_fill(~keep.unsqueeze(2), float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with nothing kept -> 0
    v_nb = v.to(P.dtype)[bidx, idx].view(b, n, -1, h, dv)
    out = torch.einsum("bnhk,bnkhc->bnhc", probs, v_nb).reshape(b, n, h * dv)
    return out.to(v.dtype), probs


def sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale):
    """(dP, dR in P.dtype, dv in v.dtype) of sparse_attention from its probs (0 where not kept),
    scattering with index_add, so it needs neither rev nor keep within the reciprocal mask."""
    b, n, h, l = P.shape
    k = idx.shape[-1]
    dv_h = v.shape[-1] // h
    acc = P.dtype
    bidx = torch.arange(b, device=P.device).view(b, 1, 1)
    go = grad_out.to(acc).view(b, n, h, dv_h)
    v_nb = v.to(acc)[bidx, idx].view(b, n, k, h, dv_h)
    dprobs = torch.einsum("bnhc,bnkhc->bnhk", go, v_nb)
    ds = scale * probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dP = torch.einsum("bnhk,bnkhl->bnhl", ds, R[bidx, idx])
    flat = (idx + n * torch.arange(b, device=idx.device).view(b, 1, 1)).reshape(-1)  # rows of (B*N)
    dR = torch.zeros(b * n, h, l, dtype=acc, device=P.device)
    dR.index_add_(0, flat, torch.einsum("bnhk,bnhl->bnkhl", ds, P).reshape(-1, h, l))
    dv = torch.zeros(b * n, h, dv_h, dtype=acc, device=P.device)
    dv.index_add_(0, flat, torch.einsum("bnhk,bnhc->bnkhc", probs, go).reshape(-1, h, dv_h))
    return dP, dR.view(b, n, h, l), dv.view(b, n, h * dv_h).to(v.dtype)


def rescore_candidates(x: torch.Tensor, candidates: torch.Tensor, k: int, margin: torch.Tensor):
    """Stage 2 of the certified knn: exact re-scoring of each row's candidates, and its certificate.

    x (B,N,d) rows in the exact dtype; candidates (B,N,K') from the reduced-precision stage 1 in
    its order (self first, then decreasing approximate score); margin (B,N): twice the bound on
    |approximate - exact| score per row. Returns idx (B,N,k) (exact score desc, index asc among
    the candidates) and certified (B,N) bool: the exact score of the last candidate plus margin is
    below the k-th exact score, so no row outside the candidates can enter the top k
    (docs/design.md, "Certified knn").
    """
    b, n, kc = candidates.shape
    idx = torch.empty((b, n, k), dtype=torch.int64, device=x.device)
    certified = torch.empty((b, n), dtype=torch.bool, device=x.device)
    # Rows per gathered (chunk, K', d) block: cache-sized on a CPU, 256 MB of fp32 on a GPU.
    chunk = max(1, (1 << (26 if x.is_cuda else 22)) // max(1, kc * x.shape[-1]))
    for bi in range(b):
        for start in range(0, n, chunk):
            cand = candidates[bi, start:start + chunk]
            rows = torch.arange(start, start + cand.shape[0], device=x.device)
            s = torch.einsum("rd,rcd->rc", x[bi, start:start + chunk], x[bi][cand])
            last = s[:, -1].clone()
            s = torch.where(cand == rows[:, None], float("inf"), s)  # self first, as in the exact path
            by_id = torch.argsort(cand, dim=1)
            cand_sorted, s_sorted = torch.gather(cand, 1, by_id), torch.gather(s, 1, by_id)
            order = torch.sort(-s_sorted, dim=1, stable=True).indices[:, :k]
            idx[bi, start:start + chunk] = torch.gather(cand_sorted, 1, order)
            kth = torch.gather(s_sorted, 1, order[:, -1:]).squeeze(1)
            certified[bi, start:start + chunk] = (kc >= n) | (last + margin[bi, start:start + chunk] < kth)
    return idx, certified


knn_rescore = rescore_candidates  # the kernel contract's name (csrc/ops.cpp)
