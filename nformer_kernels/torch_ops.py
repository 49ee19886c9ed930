"""The `torch` backend: the kernel contract (csrc/ops.cpp) in plain PyTorch at O(N*k) memory.

Runs on any device and any k, and its sparse_attention is differentiable through ordinary
autograd for any keep mask. It is the path of every call a kernel backend cannot take
(nformer_kernels.backends.resolve), and can be forced like any backend.
"""
import torch

_ROW_CHUNK = 4096  # query rows per similarity block: O(chunk * N) memory
_LOOKUP_CHUNK = 1 << 16  # rows per (chunk, k, k) neighbour-of-neighbour block


def topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int, force_self: bool = False) -> torch.Tensor:
    """(M,k) int64 top-k of queries (M,d) @ keys (N,d)^T, in fp32 (fp64 for fp64 input).

    force_self: row r of queries and row r of keys are the same item, which is forced first in row r.
    Selected entries are ordered by (similarity desc, index asc); which of several exactly tied
    candidates at the k-th place gets selected is left to torch.topk.
    """
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    keys_a = keys.to(acc)
    out = []
    for start in range(0, queries.shape[0], _ROW_CHUNK):
        sim = queries[start:start + _ROW_CHUNK].to(acc) @ keys_a.T
        if force_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = float("inf")
        vals, ids = sim.topk(k, dim=1)
        by_id = torch.argsort(ids, dim=1)
        vals, ids = torch.gather(vals, 1, by_id), torch.gather(ids, 1, by_id)
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
