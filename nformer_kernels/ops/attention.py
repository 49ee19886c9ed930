"""Landmark attention over kept neighbours: landmark_factors, sparse_attention, neighbor_attention.

Scores and softmax are fp32 (fp64 for fp64 input) on every backend: the landmark affinity is a
product of two dot products and overflows fp16, so autocast is switched off around them.
"""
import contextlib
import math
import threading

import torch

from nformer_kernels import _checks, backends
from nformer_kernels.ops.reciprocal import reverse_if_within, reverse_index


def _no_autocast(device_type):
    """Autocast switched off where it is on; otherwise no context at all (keeps export graphs flat).
    Devices without autocast (meta: shape-only calls) get no context either."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _landmark_factors(q, k, q_land, k_land, num_heads):
    """(B,N,d) q, k and (B,l,d) landmark rows -> P = Q_h K_{L,h}^T, R = K_h Q_{L,h}^T, (B,N,H,l) fp32/fp64.

    Each is one (N,d) x (d,H*l) GEMM against a block-diagonal matrix of the landmark rows, so the
    strided q/k views of a fused QKV projection are read in place.
    """
    acc = _acc_dtype(q.dtype)
    b, n, d = q.shape
    dh, n_land = d // num_heads, q_land.shape[1]
    eye = torch.eye(num_heads, dtype=acc, device=q.device)

    def block_diag(rows):  # (B,l,d) -> (B,d,H*l) with W[h*dh+c, h*l+m] = rows[m, h*dh+c]
        return torch.einsum("bmhc,hg->bhcgm", rows.to(acc).view(b, n_land, num_heads, dh), eye).reshape(
            b, d, num_heads * n_land)

    with _no_autocast(q.device.type):
        P = torch.matmul(q.to(acc), block_diag(k_land)).view(b, n, num_heads, n_land)
        R = torch.matmul(k.to(acc), block_diag(q_land)).view(b, n, num_heads, n_land)
    return P, R


def landmark_factors(q, k, q_landmarks, k_landmarks, num_heads: int):
    """Low-rank factors of the landmark affinity: s[i,j] = sum over landmarks m of P[i,h,m] R[j,h,m].

    q, k: (N,d)|(B,N,d); q_landmarks, k_landmarks: the landmark rows of q and k, (l,d)|(B,l,d).
    Returns P = Q_h K_{L,h}^T and R = K_h Q_{L,h}^T per head, (N,H,l)|(B,N,H,l) in fp32 (fp64 for
    fp64 input), with autograd. Lets a caller project q/k in row chunks and never hold all of them.
    """
    num_heads = _checks.check_heads(num_heads)
    named = {"q": q, "k": k, "q_landmarks": q_landmarks, "k_landmarks": k_landmarks}
    for name, t in named.items():
        _checks.check_float(t, name)
    _checks.same_device(**named)
    q, squeezed = _checks.batched(q, "q", 1)
    k, _ = _checks.batched(k, "k", 1)
    q_land, _ = _checks.batched(q_landmarks, "q_landmarks", 1)
    k_land, _ = _checks.batched(k_landmarks, "k_landmarks", 1)
    if q.shape != k.shape or q_land.shape != k_land.shape or q_land.shape[::2] != q.shape[::2]:
        raise ValueError(f"q, k must share (B,N,d) and q_landmarks, k_landmarks (B,l,d): {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(q_land.shape)}, {tuple(k_land.shape)}")
    if q_land.shape[1] < 1:
        raise ValueError("q_landmarks must hold at least one row")
    if q.shape[-1] % num_heads:
        raise ValueError(f"feature dim {q.shape[-1]} must be divisible by num_heads={num_heads}")
    P, R = _landmark_factors(q, k, q_land, k_land, num_heads)
    return (P[0], R[0]) if squeezed else (P, R)


def _check_scores_bounded(P, R, scale, what):
    """ValueError unless every score scale * <P_i, R_j> is finite in P's dtype, for any i, j.

    |s| <= scale * max_i |P_i| * max_j |R_j| per head (Cauchy-Schwarz), an O(N*H*l) bound; the
    kernels subtract each row's maximum before exponentiating, so finite scores give finite
    probabilities."""
    if not _checks.eager() or P.numel() == 0:
        return
    norms = [t.detach().double().norm(dim=-1).amax(dim=1) for t in (P, R)]  # (B,H) each
    bound = float((abs(scale) * norms[0] * norms[1]).max())
    limit = torch.finfo(P.dtype).max
    if not bound <= limit:  # also catches NaN/Inf factors
        raise ValueError(f"{what} are too large: the attention scores could reach {bound:.3g}, beyond "
                         f"{P.dtype}'s range ({limit:.3g}); scale them down")


class _ForwardReverse(threading.local):
    """The reverse index _sparse_attention computed for its reciprocity check, handed to the autograd
    context of the kernel call it precedes (setup_context runs inside that call, on this thread), so
    the backward gathers through it instead of computing it again. `entry`: (idx, keep, rev) or None."""

    entry = None


_FORWARD_REVERSE = _ForwardReverse()


def _sparse_attention(P, R, v, idx, keep, scale, what="P and R (the landmark factors of q and k)"):
    """Dispatch of validated batched inputs: P, R (B,N,H,l) acc dtype, v (B,N,H*dv), idx/keep (B,N,k)."""
    _check_scores_bounded(P, R, scale, what)
    v = v.contiguous()
    backend = backends.resolve("attention", v.device, k=idx.shape[-1])
    rev = None
    if backends.gathers_backward(backend) and _checks.eager() and torch.is_grad_enabled():
        rev = reverse_if_within(idx, keep, backend)
        if rev is None:
            backend = backends.resolve("attention", v.device, reason="keep is not within the reciprocal mask, "
                                       "which the kernels' gather-only backward needs")
    with _no_autocast(v.device.type):
        _FORWARD_REVERSE.entry = None if rev is None else (idx, keep, rev)
        try:
            return backends.kernel(backend, "sparse_attention")(P, R, v, idx, keep, scale)[0]
        finally:
            _FORWARD_REVERSE.entry = None


def sparse_attention(P, R, v, idx, keep, scale: float, *, check_inputs: bool = True):
    """Softmax over kept neighbours of the landmark affinity, then the weighted sum of their v rows.

    P, R: (N,H,l)|(B,N,H,l) landmark factors (landmark_factors); v: (N,H*dv)|(B,N,H*dv);
    idx, keep: (N,k)|(B,N,k). s[i,h,t] = scale * <P[i,h], R[idx[i,t],h]> where keep[i,t], else -inf;
    out[i,h] = sum_t softmax_t(s)[i,h,t] v[idx[i,t],h]. Returns v's shape and dtype, with autograd
    for P, R and v. check_inputs=False skips the O(N*k) value checks (finite inputs, idx range and
    uniqueness).
    """
    _checks.check_scale(scale)
    _checks.check_float(v, "v", check_finite=check_inputs)
    _checks.same_device(P=P, R=R, v=v, idx=idx, keep=keep)
    P, squeezed = _checks.batched(P, "P", 2)
    R, _ = _checks.batched(R, "R", 2)
    v, _ = _checks.batched(v, "v", 1)
    acc = _acc_dtype(v.dtype)
    for name, t in (("P", P), ("R", R)):
        _checks.check_float(t, name, check_finite=check_inputs)
    if P.shape != R.shape or P.shape[:2] != v.shape[:2] or v.shape[-1] % P.shape[2]:
        raise ValueError(f"P, R must be (B,N,H,l) and v (B,N,H*dv) for the same (B,N,H): {tuple(P.shape)}, "
                         f"{tuple(R.shape)}, {tuple(v.shape)}")
    idx, keep = _checks.check_neighbors(idx, keep, v.shape[1], check_inputs)
    out = _sparse_attention(P.to(acc).contiguous(), R.to(acc).contiguous(), v, idx, keep, float(scale))
    return out[0] if squeezed else out


def neighbor_attention(q, k, v, idx, keep, landmarks, num_heads: int, *, check_inputs: bool = True):
    """Landmark low-rank attention restricted to kept neighbours (docs/design.md), with autograd.

    q, k, v: (N,d) or (B,N,d); idx: (N,k)|(B,N,k) int64 neighbour lists; keep: bool mask of idx's
    shape; landmarks: int64 (l,) distinct token positions shared by heads and batch.
    Returns (N,d)|(B,N,d) in v's dtype. O(N*k*d) time, O(N*k*H) saved state.
    Equals sparse_attention(*landmark_factors(q, k, q[landmarks], k[landmarks], num_heads), v, idx,
    keep, 1/sqrt(d/num_heads)). check_inputs=False skips the O(N*k) value checks (finite features,
    idx range and uniqueness, landmarks) for callers that built idx/landmarks themselves; shapes and
    dtypes are always checked.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_float(t, name, check_finite=check_inputs)
    num_heads = _checks.check_heads(num_heads)
    _checks.same_device(q=q, k=k, v=v, idx=idx, keep=keep, landmarks=landmarks)
    q, squeezed = _checks.batched(q, "q", 1)
    k, _ = _checks.batched(k, "k", 1)
    v, _ = _checks.batched(v, "v", 1)
    if not (q.shape == k.shape and q.shape[:2] == v.shape[:2]):
        raise ValueError(f"q, k, v must share (B,N) and q, k their d: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d % num_heads or v.shape[-1] % num_heads:
        raise ValueError(f"feature dims ({d}, {v.shape[-1]}) must be divisible by num_heads={num_heads}")
    idx, keep = _checks.check_neighbors(idx, keep, q.shape[1], check_inputs)
    _checks.check_landmarks(landmarks, q.shape[1], check_values=check_inputs)
    P, R = _landmark_factors(q, k, q[:, landmarks], k[:, landmarks], num_heads)
    out = _sparse_attention(P, R, v, idx, keep, 1.0 / math.sqrt(d // num_heads), what="q and k")
    return out[0] if squeezed else out


def register_autograd(backend: str) -> None:
    """Autograd of `backend`'s sparse_attention library op: its own gather-only backward kernel."""
    forward = backends.kernel(backend, "sparse_attention")
    backward_kernel = backends.kernel(backend, "sparse_attention_backward")

    def setup_context(ctx, inputs, output):
        P, R, v, idx, keep, scale = inputs
        cached = _FORWARD_REVERSE.entry
        # the forward's own reverse index, when it was computed for these very idx and keep
        rev = cached[2] if cached is not None and cached[0] is idx and cached[1] is keep else None
        ctx.has_rev = rev is not None
        ctx.save_for_backward(P, R, v, idx, keep, output[1], *([rev] if ctx.has_rev else []))
        ctx.scale = scale

    def backward(ctx, grad_out, _grad_probs):  # probs is returned for saving, not differentiable
        P, R, v, idx, keep, probs, *cached = ctx.saved_tensors
        rev = cached[0] if ctx.has_rev else reverse_index(idx, keep, backend)
        dP, dR, dv = backward_kernel(grad_out.contiguous(), P, R, v, idx, rev, probs, ctx.scale)
        return dP, dR, dv, None, None, None

    torch.library.register_autograd(forward._qualified_op_name, backward, setup_context=setup_context)


def _sparse_attention_fake(P, R, v, idx, keep, scale):
    return torch.empty_like(v), P.new_empty((*P.shape[:3], idx.shape[-1]))


def _sparse_attention_backward_fake(grad_out, P, R, v, idx, rev, probs, scale):
    return torch.empty_like(P), torch.empty_like(R), torch.empty_like(v)


for _op in backends.library_ops("sparse_attention"):
    torch.library.register_fake(_op)(_sparse_attention_fake)
for _op in backends.library_ops("sparse_attention_backward"):
    torch.library.register_fake(_op)(_sparse_attention_backward_fake)
# One autograd per library op: the cpu and cuda kernels are one op, dispatched by device.
for _backend, _suffix in (("cpu", ""), ("triton", "_triton")):
    if f"nformer::sparse_attention{_suffix}" in backends.library_ops("sparse_attention"):
        register_autograd(_backend)
