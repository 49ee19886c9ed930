"""Triton backend: launchers with the contract of the C++ `nformer::` ops, and their custom ops.

Launchers take batched tensors, like csrc/ops.cpp: knn, reciprocal_mask, reverse_index,
sparse_attention, sparse_attention_backward. They run on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 was set before triton was imported. fp32/fp16/bf16 only (float64 -> TypeError).

The same functions are registered as torch.library custom ops nformer::<name>_triton (with fake
kernels, so torch.compile/export see single nodes). Autograd for sparse_attention_triton is
registered by nformer_kernels/ops.py.

Importing this module never fails: `available` says whether the launchers can run here and
`reason` why not.
"""
import torch

try:
    import triton
except Exception as exc:  # not installed, or broken for this platform
    triton = None
    _IMPORT_ERROR = f"triton cannot be imported ({exc})"
else:
    _IMPORT_ERROR = None
    from nformer_kernels.triton import knn as _knn
    from nformer_kernels.triton import reciprocal as _reciprocal
    from nformer_kernels.triton import sparse_attention as _attention

if _IMPORT_ERROR:
    reason = _IMPORT_ERROR
elif not (triton.knobs.runtime.interpret or torch.cuda.is_available()):
    reason = "no CUDA GPU (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
else:
    reason = ""
available = not reason
interpreted = bool(triton is not None and triton.knobs.runtime.interpret)


def _require():
    if not available:
        raise RuntimeError(f"nformer_kernels triton backend unavailable: {reason}")


def knn(x: torch.Tensor, k: int, allow_tf32: bool = False) -> torch.Tensor:
    """(B,N,k) int64 inner-product top-k of x (B,N,d), self first; k <= 64 (ValueError above)."""
    _require()
    return _knn.knn(x, k, allow_tf32)


def reciprocal_mask(idx: torch.Tensor) -> torch.Tensor:
    """(B,N,k) bool: keep[b,i,t] = i in idx[b, idx[b,i,t], :]."""
    _require()
    return _reciprocal.reciprocal_mask(idx)


def reverse_index(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B,N,k) int64: for row j and i = idx[j,t'], the t with idx[i,t] == j and keep[i,t]; else -1."""
    _require()
    return _reciprocal.reverse_index(idx, keep)


def sparse_attention(P, R, v, idx, keep, scale):
    """(out (B,N,H*dv) v.dtype, probs (B,N,H,k) fp32); k <= 128 (ValueError above)."""
    _require()
    return _attention.sparse_attention(P, R, v, idx, keep, scale)


def sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale):
    """(dP, dR fp32, dv v.dtype), without atomics; rev = reverse_index(idx, keep)."""
    _require()
    return _attention.sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale)


# ---- torch.library custom ops (no device restriction: CPU tensors run under the interpreter) ----
Tensor = torch.Tensor


@torch.library.custom_op("nformer::knn_triton", mutates_args=())
def knn_triton(x: Tensor, k: int, allow_tf32: bool = False) -> Tensor:
    return knn(x, k, allow_tf32)


@knn_triton.register_fake
def _(x, k, allow_tf32=False):
    return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.int64)


@torch.library.custom_op("nformer::reciprocal_mask_triton", mutates_args=())
def reciprocal_mask_triton(idx: Tensor) -> Tensor:
    return reciprocal_mask(idx)


@reciprocal_mask_triton.register_fake
def _(idx):
    return torch.empty_like(idx, dtype=torch.bool)


@torch.library.custom_op("nformer::reverse_index_triton", mutates_args=())
def reverse_index_triton(idx: Tensor, keep: Tensor) -> Tensor:
    return reverse_index(idx, keep)


@reverse_index_triton.register_fake
def _(idx, keep):
    return torch.empty_like(idx)


@torch.library.custom_op("nformer::sparse_attention_triton", mutates_args=())
def sparse_attention_triton(P: Tensor, R: Tensor, v: Tensor, idx: Tensor, keep: Tensor,
                            scale: float) -> tuple[Tensor, Tensor]:
    return sparse_attention(P, R, v, idx, keep, scale)


@sparse_attention_triton.register_fake
def _(P, R, v, idx, keep, scale):
    b, n, h, _ = P.shape
    return torch.empty_like(v), P.new_empty((b, n, h, idx.shape[2]))


@torch.library.custom_op("nformer::sparse_attention_backward_triton", mutates_args=())
def sparse_attention_backward_triton(grad_out: Tensor, P: Tensor, R: Tensor, v: Tensor,
                                     idx: Tensor, rev: Tensor, probs: Tensor,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale)


@sparse_attention_backward_triton.register_fake
def _(grad_out, P, R, v, idx, rev, probs, scale):
    return torch.empty_like(P), torch.empty_like(R), torch.empty_like(v)


__all__ = [
    "available", "reason", "interpreted", "knn", "reciprocal_mask", "reverse_index",
    "sparse_attention", "sparse_attention_backward", "knn_triton", "reciprocal_mask_triton",
    "reverse_index_triton", "sparse_attention_triton", "sparse_attention_backward_triton",
]
