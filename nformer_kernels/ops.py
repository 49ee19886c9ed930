"""Public functional API: knn, reciprocal_mask, neighbor_attention (+ backend selection).

Each op validates its input (eagerly; checks that need a device sync are skipped while
torch.compile traces), adds the batch dimension the kernels expect, and dispatches to one
backend:
  cuda       hand-written CUDA kernels (csrc/cuda), torch.ops.nformer.*        CUDA tensors
  triton     Triton kernels (nformer_kernels/triton), torch.ops.nformer.*_triton CUDA tensors
  cpu        C++/OpenMP kernels (csrc/cpu), torch.ops.nformer.*                 CPU tensors
  reference  dense plain PyTorch (nformer_kernels/reference.py)                 any device
"""
import contextlib
import math
import os
from typing import Optional

import torch

from nformer_kernels import reference
from nformer_kernels._extension import extension_available, extension_has_cuda

BACKENDS = ("cuda", "triton", "cpu", "reference")
# The GPU kernels keep a row's k entries in registers; larger k uses the plain-PyTorch paths.
GPU_KNN_MAX_K = 64
GPU_ATTENTION_MAX_K = 128
_forced_backend: Optional[str] = None


def _triton_module():
    try:
        from nformer_kernels import triton as nf_triton
    except ImportError:
        return None
    return nf_triton if getattr(nf_triton, "available", False) else None


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op ("cuda", "triton", "cpu", "reference"); None = automatic."""
    global _forced_backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _forced_backend = name


def _backend_available(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu" and extension_available()
    if name == "cuda":
        return device.type == "cuda" and extension_has_cuda()
    if name == "triton":  # CPU tensors only under TRITON_INTERPRET=1 (how CI runs the Triton kernels)
        nf_triton = _triton_module()
        return nf_triton is not None and (device.type == "cuda" or nf_triton.interpreted)
    return False


def get_backend(device) -> str:
    """The backend used for tensors on `device` (after set_backend / NFORMER_BACKEND)."""
    device = torch.device(device)
    forced = _forced_backend or os.environ.get("NFORMER_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"NFORMER_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if not _backend_available(forced, device):
            raise RuntimeError(f"backend {forced!r} is not available for {device.type} tensors "
                               f"(compiled extension: {extension_available()}, with CUDA: {extension_has_cuda()})")
        return forced
    # Triton is the GPU default until the CUDA kernels have passed the GPU suite on a GPU (DESIGN.md).
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for name in order:
        if _backend_available(name, device):
            return name
    return "reference"


def _op(name: str, backend: str):
    return getattr(torch.ops.nformer, f"{name}_triton" if backend == "triton" else name)


# ----------------------------------------------------------------------------- validation
def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _batched(t: torch.Tensor, name: str, trailing: int):
    """(N, ...) -> (1, N, ...); returns the tensor and whether a batch dim was added."""
    if t.dim() == trailing + 1:
        return t.unsqueeze(0), True
    if t.dim() == trailing + 2:
        return t, False
    raise ValueError(f"{name} must have {trailing + 1} or {trailing + 2} dims, got shape {tuple(t.shape)}")


def _check_float(t, name, check_finite=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    # One reduction pass: NaN/Inf propagate into the fp32 sum (only values near 1e38 could overflow it).
    if check_finite and _eager() and t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_index(idx, name="idx", check_values=True):
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {idx.dtype}")
    idx, squeezed = _batched(idx, name, 1)
    n, k = idx.shape[1], idx.shape[2]
    if n == 0 or k == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")
    if k > n:
        raise ValueError(f"{name} has {k} neighbours per row but only {n} rows")
    if check_values and _eager():
        if bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValueError(f"{name} has entries outside [0, {n})")
        srt = idx.sort(dim=-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError(f"{name} repeats a neighbour within a row")
    return idx.contiguous(), squeezed


def _same_device(**tensors):
    """Non-tensors are skipped: each argument's own check names its type error."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


# ----------------------------------------------------------------------------- knn
def _check_k(k, n, name="k"):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1 or k > n:
        raise ValueError(f"{name} must be in [1, N={n}], got {k}")


def _topk_rows(queries, keys, k, force_self=False, chunk=4096):
    """Chunked top-k of queries @ keys^T (fp32, fp64 for fp64 input): O(chunk * M) memory.

    force_self: row r of queries and row r of keys are the same item, which is forced first in row r.
    Selected entries are ordered by (similarity desc, index asc); which of several exactly tied
    candidates at the k-th place gets selected is left to torch.topk.
    """
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    keys_a = keys.to(acc)
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk].to(acc) @ keys_a.T
        if force_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = float("inf")
        vals, ids = sim.topk(k, dim=1)
        by_id = torch.argsort(ids, dim=1)
        vals, ids = torch.gather(vals, 1, by_id), torch.gather(ids, 1, by_id)
        out.append(torch.gather(ids, 1, torch.sort(-vals, dim=1, stable=True).indices))
    return torch.cat(out)


def knn(x: torch.Tensor, k: int, *, metric: str = "cosine", query_mask: Optional[torch.Tensor] = None):
    """Top-k neighbours of every row of x: (N,d) -> (N,k), (B,N,d) -> (B,N,k) int64.

    Self first, then decreasing similarity (cosine, or raw inner product with metric="dot"),
    ties broken by the smaller index. O(N*k) memory on the cpu/cuda/triton backends.
    query_mask (bool (N,) or (B,N)): rows flagged as queries never get another query as a
    neighbour (the paper's test-time query-query isolation); other rows are unaffected.
    """
    _check_float(x, "x")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    x, squeezed = _batched(x, "x", 1)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one row")
    _check_k(k, x.shape[1])
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    x = x.detach().contiguous()
    backend = get_backend(x.device)
    if backend == "reference":
        idx = reference.knn(x, k)
    elif backend != "cpu" and k > GPU_KNN_MAX_K:
        idx = torch.stack([_topk_rows(xb, xb, k, force_self=True) for xb in x])
    else:
        idx = _op("knn", backend)(x, k)
    if query_mask is not None:
        idx = _isolate_queries(x, idx, k, query_mask)
    return idx[0] if squeezed else idx


def _isolate_queries(x, idx, k, query_mask):
    """Replace the rows of queries by self + top-(k-1) among non-queries."""
    if query_mask.dtype != torch.bool:
        raise TypeError(f"query_mask must be bool, got {query_mask.dtype}")
    query_mask = query_mask.to(x.device).expand(x.shape[:2]) if query_mask.dim() == 1 else query_mask.to(x.device)
    if query_mask.shape != x.shape[:2]:
        raise ValueError(f"query_mask must have shape (N,) or (B,N) matching x, got {tuple(query_mask.shape)}")
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
            rows[:, 1:] = others[_topk_rows(x[b, queries], x[b, others], k - 1)]
        idx[b, queries] = rows
    return idx


def landmark_affinity_knn(P, R, topk):
    """Top-`topk` of the landmark affinity sum_h P_h R_h^T (paper Eq. 6) per row, self first.

    P, R: (N,H,l)|(B,N,H,l) landmark factors (landmark_factors). Returns (N,topk)|(B,N,topk) int64.
    """
    P, squeezed = _batched(P, "P", 2)
    R, _ = _batched(R, "R", 2)
    if P.shape != R.shape:
        raise ValueError(f"P {tuple(P.shape)} and R {tuple(R.shape)} must have one shape")
    _check_k(topk, P.shape[1], "topk")
    b, n = P.shape[:2]
    P, R = P.detach().reshape(b, n, -1), R.detach().reshape(b, n, -1)
    idx = torch.stack([_topk_rows(P[i], R[i], topk, force_self=True) for i in range(b)])
    return idx[0] if squeezed else idx


def affinity_knn(q, k, landmarks, num_heads, topk):
    """Neighbours from the landmark affinity of q, k themselves (paper Eq. 6), self first."""
    q, squeezed = _batched(q, "q", 1)
    k, _ = _batched(k, "k", 1)
    P, R = _landmark_factors(q, k, q[:, landmarks], k[:, landmarks], num_heads)
    idx = landmark_affinity_knn(P, R, topk)
    return idx[0] if squeezed else idx


# ----------------------------------------------------------------------------- reciprocal
def reciprocal_mask(idx: torch.Tensor) -> torch.Tensor:
    """keep[i,t] = i in idx[idx[i,t]] (bool, idx's shape). O(N*k^2)."""
    idx, squeezed = _check_index(idx)
    backend = get_backend(idx.device)
    keep = reference.reciprocal_mask(idx) if backend == "reference" else _op("reciprocal_mask", backend)(idx)
    return keep[0] if squeezed else keep


def _reverse_index(idx, keep, backend):
    if backend == "reference":
        return reference.reverse_index(idx, keep)
    return _op("reverse_index", backend)(idx, keep)


# ----------------------------------------------------------------------------- attention
def _no_autocast(device_type):
    """Autocast switched off where it is on; otherwise no context at all (keeps export graphs flat)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_landmarks(landmarks, n: int, check_values: bool = True) -> None:
    """landmarks must be a 1-D int64 tensor of at least one distinct position in [0, n).

    check_values=False checks the type and shape only (no device sync)."""
    if not isinstance(landmarks, torch.Tensor) or landmarks.dtype != torch.int64 or landmarks.dim() != 1:
        raise TypeError("landmarks must be a 1-D int64 tensor")
    if landmarks.numel() < 1:
        raise ValueError("landmarks must hold at least one position")
    if check_values and _eager():
        if bool((landmarks < 0).any()) or bool((landmarks >= n).any()):
            raise ValueError(f"landmarks must lie in [0, N={n})")
        if landmarks.unique().numel() != landmarks.numel():
            raise ValueError("landmarks must be distinct")


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

    # Always fp32: the affinity is a product of two dot products and overflows fp16 (so autocast is off here).
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
    _check_heads(num_heads)
    named = {"q": q, "k": k, "q_landmarks": q_landmarks, "k_landmarks": k_landmarks}
    for name, t in named.items():
        _check_float(t, name, check_finite=False)
    _same_device(**named)
    q, squeezed = _batched(q, "q", 1)
    k, _ = _batched(k, "k", 1)
    q_land, _ = _batched(q_landmarks, "q_landmarks", 1)
    k_land, _ = _batched(k_landmarks, "k_landmarks", 1)
    if q.shape != k.shape or q_land.shape != k_land.shape or q_land.shape[::2] != q.shape[::2]:
        raise ValueError(f"q, k must share (B,N,d) and q_landmarks, k_landmarks (B,l,d): {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(q_land.shape)}, {tuple(k_land.shape)}")
    if q_land.shape[1] < 1:
        raise ValueError("q_landmarks must hold at least one row")
    if q.shape[-1] % num_heads:
        raise ValueError(f"feature dim {q.shape[-1]} must be divisible by num_heads={num_heads}")
    P, R = _landmark_factors(q, k, q_land, k_land, num_heads)
    return (P[0], R[0]) if squeezed else (P, R)


def _check_heads(num_heads):
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def _check_neighbors(idx, keep, n, check_values):
    """Validated (B,N,k) idx and keep for N=n rows."""
    idx, _ = _check_index(idx, check_values=check_values)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError("keep must be a bool tensor")
    keep, _ = _batched(keep, "keep", 1)
    if idx.shape[1] != n or keep.shape != idx.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and keep {tuple(keep.shape)} must be (B,N,k) for N={n}")
    return idx, keep.contiguous()


def _gathered_sparse_attention(P, R, v, idx, keep, scale):
    """Plain-PyTorch O(N*k*d) sparse attention; autograd scatters (used when keep is not
    within the reciprocal mask, where the kernels' gather-only backward does not apply)."""
    b, n, h, _ = P.shape
    dv = v.shape[-1] // h
    bidx = torch.arange(b, device=P.device).view(b, 1, 1)
    r_nb = R[bidx, idx]  # (B,N,k,H,l)
    s = scale * torch.einsum("bnhl,bnkhl->bnhk", P, r_nb)
    s = s.masked_fill(~keep.unsqueeze(2), float("-inf"))
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0)
    v_nb = v.to(P.dtype)[bidx, idx].view(b, n, -1, h, dv)
    out = torch.einsum("bnhk,bnkhc->bnhc", probs, v_nb).reshape(b, n, h * dv)
    return out.to(v.dtype)


def _sparse_attention(P, R, v, idx, keep, scale):
    """Dispatch of validated batched inputs: P, R (B,N,H,l) acc dtype, v (B,N,H*dv), idx/keep (B,N,k)."""
    v = v.contiguous()
    backend = get_backend(v.device)
    # Scores and softmax in fp32 on every backend: autocast must not lower the plain-PyTorch paths.
    with _no_autocast(v.device.type):
        if backend == "reference":
            return reference.sparse_attention(P, R, v, idx, keep, scale)[0]
        if (backend != "cpu" and idx.shape[-1] > GPU_ATTENTION_MAX_K) or (
                _eager() and torch.is_grad_enabled() and not _within_reciprocal(idx, keep, backend)):
            return _gathered_sparse_attention(P, R, v, idx, keep, scale)
        return _op("sparse_attention", backend)(P, R, v, idx, keep, scale)[0]


def sparse_attention(P, R, v, idx, keep, scale: float, *, check_inputs: bool = True):
    """Softmax over kept neighbours of the landmark affinity, then the weighted sum of their v rows.

    P, R: (N,H,l)|(B,N,H,l) landmark factors (landmark_factors); v: (N,H*dv)|(B,N,H*dv);
    idx, keep: (N,k)|(B,N,k). s[i,h,t] = scale * <P[i,h], R[idx[i,t],h]> where keep[i,t], else -inf;
    out[i,h] = sum_t softmax_t(s)[i,h,t] v[idx[i,t],h]. Returns v's shape and dtype, with autograd
    for P, R and v. check_inputs=False skips the O(N*k) value checks (finite inputs, idx range and
    uniqueness).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_float(v, "v", check_finite=check_inputs)
    _same_device(P=P, R=R, v=v, idx=idx, keep=keep)
    P, squeezed = _batched(P, "P", 2)
    R, _ = _batched(R, "R", 2)
    v, _ = _batched(v, "v", 1)
    acc = _acc_dtype(v.dtype)
    for name, t in (("P", P), ("R", R)):
        _check_float(t, name, check_finite=check_inputs)
    if P.shape != R.shape or P.shape[:2] != v.shape[:2] or v.shape[-1] % P.shape[2]:
        raise ValueError(f"P, R must be (B,N,H,l) and v (B,N,H*dv) for the same (B,N,H): {tuple(P.shape)}, "
                         f"{tuple(R.shape)}, {tuple(v.shape)}")
    idx, keep = _check_neighbors(idx, keep, v.shape[1], check_inputs)
    out = _sparse_attention(P.to(acc).contiguous(), R.to(acc).contiguous(), v, idx, keep, float(scale))
    return out[0] if squeezed else out


def neighbor_attention(q, k, v, idx, keep, landmarks, num_heads: int, *, check_inputs: bool = True):
    """Landmark low-rank attention restricted to kept neighbours (DESIGN.md), with autograd.

    q, k, v: (N,d) or (B,N,d); idx: (N,k)|(B,N,k) int64 neighbour lists; keep: bool mask of idx's
    shape; landmarks: int64 (l,) distinct token positions shared by heads and batch.
    Returns (N,d)|(B,N,d) in v's dtype. O(N*k*d) time, O(N*k*H) saved state.
    Equals sparse_attention(*landmark_factors(q, k, q[landmarks], k[landmarks], num_heads), v, idx,
    keep, 1/sqrt(d/num_heads)). check_inputs=False skips the O(N*k) value checks (finite features,
    idx range and uniqueness, landmarks) for callers that built idx/landmarks themselves; shapes and
    dtypes are always checked.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(t, name, check_finite=check_inputs)
    _check_heads(num_heads)
    _same_device(q=q, k=k, v=v, idx=idx, keep=keep, landmarks=landmarks)
    q, squeezed = _batched(q, "q", 1)
    k, _ = _batched(k, "k", 1)
    v, _ = _batched(v, "v", 1)
    if not (q.shape == k.shape and q.shape[:2] == v.shape[:2]):
        raise ValueError(f"q, k, v must share (B,N) and q, k their d: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d % num_heads or v.shape[-1] % num_heads:
        raise ValueError(f"feature dims ({d}, {v.shape[-1]}) must be divisible by num_heads={num_heads}")
    idx, keep = _check_neighbors(idx, keep, q.shape[1], check_inputs)
    check_landmarks(landmarks, q.shape[1], check_values=check_inputs)
    P, R = _landmark_factors(q, k, q[:, landmarks], k[:, landmarks], num_heads)
    out = _sparse_attention(P, R, v, idx, keep, 1.0 / math.sqrt(d // num_heads))
    return out[0] if squeezed else out


def _within_reciprocal(idx, keep, backend):
    """True when every kept (i,t) is also listed from the other side, so the backward can gather."""
    rev = _reverse_index(idx, keep, backend)
    return int((rev >= 0).sum()) == int(keep.sum())


# ----------------------------------------------------------------------------- registration
def _register_autograd(backend):
    fwd = f"nformer::{'sparse_attention_triton' if backend == 'triton' else 'sparse_attention'}"

    def setup_context(ctx, inputs, output):
        P, R, v, idx, keep, scale = inputs
        ctx.save_for_backward(P, R, v, idx, keep, output[1])
        ctx.scale = scale

    def backward(ctx, grad_out, _grad_probs):  # probs is returned for saving, not differentiable
        P, R, v, idx, keep, probs = ctx.saved_tensors
        rev = _reverse_index(idx, keep, backend)
        dP, dR, dv = _op("sparse_attention_backward", backend)(grad_out.contiguous(), P, R, v, idx, rev, probs,
                                                               ctx.scale)
        return dP, dR, dv, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _register_fakes():
    @torch.library.register_fake("nformer::knn")
    def _(x, k):
        return x.new_empty((*x.shape[:2], k), dtype=torch.int64)

    @torch.library.register_fake("nformer::reciprocal_mask")
    def _(idx):
        return torch.empty_like(idx, dtype=torch.bool)

    @torch.library.register_fake("nformer::reverse_index")
    def _(idx, keep):
        return torch.empty_like(idx)

    @torch.library.register_fake("nformer::sparse_attention")
    def _(P, R, v, idx, keep, scale):
        return torch.empty_like(v), P.new_empty((*P.shape[:3], idx.shape[-1]))

    @torch.library.register_fake("nformer::sparse_attention_backward")
    def _(grad_out, P, R, v, idx, rev, probs, scale):
        return torch.empty_like(P), torch.empty_like(R), torch.empty_like(v)


if extension_available():
    _register_fakes()
    _register_autograd("cpu")
if _triton_module() is not None:
    _register_autograd("triton")
