"""Dense plain-PyTorch reference of every op: readable, O(N^2), the ground truth in tests.

All functions take batched tensors (B, N, ...) and follow the semantics in docs/design.md and
csrc/ops.cpp. They are differentiable where the op is, through ordinary autograd.
"""
import torch

from nformer_kernels import canonical


def knn(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of the rows of x (B,N,d) by the canonical score of their values taken as fp32
    (nformer_kernels.canonical; callers normalise for cosine): the dense N x N score matrix,
    self first, then decreasing score, ties broken by the smaller index (a stable sort)."""
    xf = x.detach().to(torch.float32)
    b, n, _ = xf.shape
    sim = torch.empty((b, n, n), dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(1, n * canonical.LANES))
    for r0 in range(0, n, step):
        sim[:, r0:r0 + step] = canonical.canonical_scores(xf[:, r0:r0 + step, None], xf[:, None])
    sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices
    return order[..., :k].contiguous() if k < n else order.contiguous()


def knn_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """knn's rows `rows` (B,R) alone: the dense answer, gathered."""
    return torch.gather(knn(x, k), 1, rows[..., None].expand(*rows.shape, k))


def knn_rescore(x: torch.Tensor, candidates: torch.Tensor, k: int, margin: torch.Tensor):
    """Stage 2 of the two-stage knn (the spec: torch_ops.rescore_candidates), by ranks.

    Candidate c of row i ranks after every candidate with a higher canonical score (self: +inf), a
    smaller id at an equal score, or the same id in an earlier slot; the k ranked first are the
    answer. certified: K' >= N, or the last candidate's canonical score + margin < the k-th score.
    """
    b, n, kc = candidates.shape
    xf = x.detach().to(torch.float32)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1)
    s = canonical.canonical_scores(xf[:, :, None], xf[bidx, candidates])
    last = s[..., -1]
    s = s.masked_fill(candidates == torch.arange(n, device=x.device).view(1, n, 1), float("inf"))
    sa, sb = s[..., :, None], s[..., None, :]  # a: the candidate ranked, b: every other
    ia, ib = candidates[..., :, None], candidates[..., None, :]
    slot = torch.arange(kc, device=x.device)
    before = (sb > sa) | ((sb == sa) & ((ib < ia) | ((ib == ia) & (slot[None, :] < slot[:, None]))))
    rank = before.sum(-1)  # (B,N,K'): a permutation of 0..K'-1 per row
    order = rank.argsort(dim=-1)[..., :k]
    idx = torch.gather(candidates, 2, order)
    kth = torch.gather(s, 2, order[..., -1:]).squeeze(-1)
    return idx, (kc >= n) | (last + margin.double() < kth)


def reciprocal_mask(idx: torch.Tensor) -> torch.Tensor:
    """keep[b,i,t] = i in idx[b, idx[b,i,t], :]."""
    b, n, k = idx.shape
    adj = torch.zeros(b, n, n, dtype=torch.bool, device=idx.device)
    adj.scatter_(2, idx, True)
    mutual = adj & adj.transpose(1, 2)
    return torch.gather(mutual, 2, idx)


def reverse_index(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """rev[b,j,t'] = t with idx[b,i,t] == j and keep[b,i,t], i = idx[b,j,t']; else -1."""
    b, n, k = idx.shape
    pos = torch.full((b, n, n), -1, dtype=torch.long, device=idx.device)
    t = torch.arange(k, device=idx.device).expand(b, n, k)
    pos.scatter_(2, idx, torch.where(keep, t, -1))  # pos[i, j] = t of j in row i if kept
    return torch.gather(pos.transpose(1, 2), 2, idx)  # pos[idx[j,t'], j]


def sparse_attention(P, R, v, idx, keep, scale):
    """Dense masked softmax attention with the landmark affinity s = scale * P R^T.

    P, R: (B,N,H,l); v: (B,N,H*dv); idx, keep: (B,N,k). Returns (out, probs).
    """
    b, n, h, _ = P.shape
    k = idx.shape[-1]
    dv = v.shape[-1] // h
    s = scale * torch.einsum("bihm,bjhm->bhij", P, R)  # (B,H,N,N) in P's (accumulation) dtype
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=P.device)
    allowed.scatter_(2, idx, keep)
    s = s.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    vh = v.to(P.dtype).view(b, n, h, dv).transpose(1, 2)  # (B,H,N,dv)
    out = (probs @ vh).transpose(1, 2).reshape(b, n, h * dv).to(v.dtype)
    probs_k = torch.gather(probs, 3, idx.unsqueeze(1).expand(b, h, n, k)).permute(0, 2, 1, 3)
    return out, probs_k.contiguous()


def sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale):
    """(dP, dR, dv) of sparse_attention by autograd through the dense forward (rev is not needed).

    keep is recovered as the entries with probability mass in some head: an entry kept with
    probability exactly 0 in every head changes neither the forward nor any gradient.
    """
    keep = probs.detach().sum(dim=2) > 0
    with torch.enable_grad():
        P_, R_, v_ = (t.detach().requires_grad_() for t in (P, R, v))
        out, _ = sparse_attention(P_, R_, v_, idx, keep, scale)
        return torch.autograd.grad(out, (P_, R_, v_), grad_out.to(out.dtype))


def landmark_factors(q, k, landmarks, num_heads):
    """P = Q K_L^T and R = K Q_L^T per head, (B,N,H,l) each, fp32 (fp64 for fp64 input)."""
    b, n, d = q.shape
    dh = d // num_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(acc).view(b, n, num_heads, dh)
    kh = k.to(acc).view(b, n, num_heads, dh)
    P = torch.einsum("bnhd,blhd->bnhl", qh, kh[:, landmarks])
    R = torch.einsum("bnhd,blhd->bnhl", kh, qh[:, landmarks])
    return P, R


def neighbor_attention(q, k, v, idx, keep, landmarks, num_heads):
    """Full op on batched inputs, dense: the official computation restricted to kept pairs."""
    P, R = landmark_factors(q, k, landmarks, num_heads)
    scale = (q.shape[-1] // num_heads) ** -0.5
    return sparse_attention(P, R, v, idx, keep, scale)[0]
