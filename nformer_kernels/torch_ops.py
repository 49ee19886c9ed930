"""The `torch` backend: the kernel contract (csrc/ops.cpp) in plain PyTorch at O(N*k) memory.

Runs on any device and any k, and its sparse_attention is differentiable through ordinary
autograd for any keep mask. It is the path of every call a kernel backend cannot take
(nformer_kernels.backends.resolve), and can be forced like any backend.
"""
from typing import Optional

import torch

from nformer_kernels import canonical

_TILE = 1 << 22  # fp32 scores per (query rows x key rows) tile: 16 MB
_LOOKUP_CHUNK = 1 << 16  # rows per (chunk, k, k) neighbour-of-neighbour block
_NO_ID = torch.iinfo(torch.int64).max


def _round_down_f32(t: torch.Tensor) -> torch.Tensor:
    """fp64 -> the largest fp32 value <= t (a threshold that never rejects what fp64 would keep)."""
    f = t.to(torch.float32)
    return torch.where(f.double() > t, torch.nextafter(f, torch.full_like(f, float("-inf"))), f)


class RunningTopk:
    """Per query row, the top-k keys seen so far by (self first, canonical score desc, id asc),
    merged key block by key block: O(rows * k) state plus one score tile. The key blocks may come
    in any order and from anywhere (local tiles, a ring of ranks): the result is the canonical top-k
    of all of them (nformer_kernels.canonical).

    Each block is scored in fp32 (IEEE, exact_fp32_matmul); beta (rows,) bounds |fp32 - canonical|
    per row (canonical.score_error_bound). Only entries within 2*beta of the k-th fp32 score of the
    running list and the block together can be in the canonical top-k; those alone are scored
    canonically."""

    def __init__(self, queries: torch.Tensor, k: int, beta: torch.Tensor):
        r, dev = queries.shape[0], queries.device
        self.queries, self.k, self.beta = queries.to(torch.float32), k, beta.to(torch.float64)
        self.f = torch.full((r, k), float("-inf"), dtype=torch.float32, device=dev)
        self.c = torch.full((r, k), float("-inf"), dtype=torch.float64, device=dev)
        self.ids = torch.full((r, k), _NO_ID, dtype=torch.int64, device=dev)

    def add(self, block: torch.Tensor, offset: int, self_ids: Optional[torch.Tensor] = None,
            banned: Optional[torch.Tensor] = None, rows: slice = slice(None)) -> None:
        """Merge key rows block (m, d) with global ids offset + column into query rows `rows`.
        self_ids (r,): the global id of each query row's own key, forced first where the block holds it.
        banned (r, m) bool: pairs that may not be neighbours."""
        q = self.queries[rows]
        r, m = q.shape[0], block.shape[0]
        if r == 0 or m == 0:
            return
        block = block.to(torch.float32)
        f = q @ block.T
        if banned is not None:
            f.masked_fill_(banned, float("-inf"))
        if self_ids is not None:
            cols = self_ids - offset
            own = ((cols >= 0) & (cols < m)).nonzero().squeeze(1)
            f[own, cols[own]] = float("inf")
        run_f, run_c, run_ids = self.f[rows], self.c[rows], self.ids[rows]
        kk = min(self.k, run_f.shape[1] + m)
        kth = torch.cat([run_f, f], dim=1).topk(kk, dim=1).values[:, -1]
        gate = _round_down_f32(kth.double() - 2 * self.beta[rows])
        gate = torch.where(kth == float("-inf"), kth, gate)
        qi, cj = ((f >= gate[:, None]) & (f > float("-inf"))).nonzero(as_tuple=True)
        f_new = f[qi, cj]
        c_new = canonical.pair_scores(q, block, qi, cj)
        c_new = torch.where(f_new == float("inf"), float("inf"), c_new)  # self
        # Merge per row by (row, c desc, id asc) with three stable sorts, keep the first k per row.
        row_all = torch.cat([torch.arange(r, device=q.device).repeat_interleave(self.k), qi])
        c_all = torch.cat([run_c.reshape(-1), c_new])
        f_all = torch.cat([run_f.reshape(-1), f_new])
        id_all = torch.cat([run_ids.reshape(-1), cj + offset])
        order = torch.sort(id_all, stable=True).indices
        order = order[torch.sort(c_all[order], descending=True, stable=True).indices]
        order = order[torch.sort(row_all[order], stable=True).indices]
        counts = torch.bincount(row_all, minlength=r)
        rank = torch.arange(order.shape[0], device=q.device) - (torch.cumsum(counts, 0) - counts)[row_all[order]]
        take = order[rank < self.k]
        self.f[rows] = f_all[take].view(r, self.k)
        self.c[rows] = c_all[take].view(r, self.k)
        self.ids[rows] = id_all[take].view(r, self.k)


def topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int, force_self: bool = False,
              self_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M,k) int64 canonical top-k of queries (M,d) against keys (N,d) (values taken as fp32):
    ordered by (canonical score desc, index asc), self first where force_self (row r of queries is
    key r) or self_ids (row r is key self_ids[r]). Streams (query rows x key rows) tiles of at most
    _TILE scores: O(M*k + tile) memory on any device."""
    queries, keys = queries.detach().to(torch.float32), keys.detach().to(torch.float32)
    if force_self and self_ids is None:
        self_ids = torch.arange(queries.shape[0], device=queries.device)
    beta = canonical.score_error_bound(queries, torch.float32, canonical.row_norms(keys).amax()
                                       if keys.shape[0] else 0.0)
    running = RunningTopk(queries, k, beta)
    m, n = queries.shape[0], keys.shape[0]
    rows_per = max(1, min(m, _TILE // max(1, min(n, 1 << 16))))
    cols_per = max(1, _TILE // rows_per)
    with canonical.exact_fp32_matmul():
        for r0 in range(0, m, rows_per):
            rows = slice(r0, r0 + rows_per)
            for c0 in range(0, n, cols_per):
                running.add(keys[c0:c0 + cols_per], c0, None if self_ids is None else self_ids[rows], rows=rows)
    return running.ids


def knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B,N,k) canonical top-k of the rows of x (B,N,d) (values taken as fp32), self first."""
    return torch.stack([topk_rows(xb, xb, k, force_self=True) for xb in x])


def knn_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """(B,R,k): knn's rows `rows` (B,R) alone, against every row of x (B,N,d)."""
    if rows.numel() and bool(((rows < 0) | (rows >= x.shape[1])).any()):
        raise ValueError(f"rows must lie in [0, N={x.shape[1]})")
    return torch.stack([topk_rows(xb[rb], xb, k, self_ids=rb) for xb, rb in zip(x, rows)])


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
    """Stage 2 of a two-stage knn: the canonical scores of each row's candidates, and the certificate.

    x (B,N,d) rows (values taken as fp32: nk.knn passes the canonical rows); candidates (B,N,K')
    from stage 1 in its order (self first, then decreasing stage score); margin (B,N) fp64: twice
    the bound on |stage score - canonical score| per row. Returns idx (B,N,k) (canonical score desc,
    index asc, slot asc among the candidates; self first) and certified (B,N) bool: K' >= N, or the
    canonical score of the last candidate plus margin is below the k-th, so no row outside the
    candidates can enter the top k (docs/design.md, "Two-stage knn").
    """
    b, n, kc = candidates.shape
    x = x.detach().to(torch.float32)
    idx = torch.empty((b, n, k), dtype=torch.int64, device=x.device)
    certified = torch.empty((b, n), dtype=torch.bool, device=x.device)
    chunk = max(1, (1 << 22) // max(1, kc * x.shape[-1]))  # rows per gathered (chunk, K', d) block
    for bi in range(b):
        for start in range(0, n, chunk):
            cand = candidates[bi, start:start + chunk]
            rows = torch.arange(start, start + cand.shape[0], device=x.device)
            s = canonical.canonical_scores(x[bi, start:start + chunk, None], x[bi][cand])
            last = s[:, -1].clone()
            s = torch.where(cand == rows[:, None], float("inf"), s)  # self first
            by_id = torch.sort(cand, dim=1, stable=True).indices  # a repeated id keeps its slot order
            cand_sorted, s_sorted = torch.gather(cand, 1, by_id), torch.gather(s, 1, by_id)
            order = torch.sort(s_sorted, dim=1, descending=True, stable=True).indices[:, :k]
            idx[bi, start:start + chunk] = torch.gather(cand_sorted, 1, order)
            kth = torch.gather(s_sorted, 1, order[:, -1:]).squeeze(1)
            certified[bi, start:start + chunk] = (kc >= n) | (last + margin[bi, start:start + chunk].double() < kth)
    return idx, certified


knn_rescore = rescore_candidates  # the kernel contract's name (csrc/ops.cpp)
