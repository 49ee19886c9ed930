"""reciprocal_mask, and reverse_index (the attention backward's gather plan)."""
import torch

from nformer_kernels import _checks, backends


def reciprocal_mask(idx: torch.Tensor, *, check_inputs: bool = True) -> torch.Tensor:
    """keep[i,t] = i in idx[idx[i,t]] (bool, idx's shape). O(N*k^2). check_inputs=False skips the
    O(N*k log k) value checks (entries in range, no repeats) for lists the caller built with knn."""
    idx, squeezed = _checks.check_index(idx, check_values=check_inputs)
    keep = backends.kernel(backends.resolve("reciprocal", idx.device), "reciprocal_mask")(idx)
    return keep[0] if squeezed else keep


def reverse_index(idx: torch.Tensor, keep: torch.Tensor, backend: str) -> torch.Tensor:
    """rev[j,t'] = the t with idx[i,t] == j and keep[i,t] for i = idx[j,t'], else -1 (batched inputs)."""
    return backends.kernel(backend, "reverse_index")(idx, keep)


def reverse_if_within(idx, keep, backend):
    """reverse_index(idx, keep) when every kept (i,t) is also listed from the other side (the
    backward can gather through it), else None."""
    rev = reverse_index(idx, keep, backend)
    return rev if int((rev >= 0).sum()) == int(keep.sum()) else None


def _reciprocal_mask_fake(idx):
    return torch.empty_like(idx, dtype=torch.bool)


def _reverse_index_fake(idx, keep):
    return torch.empty_like(idx)


for _op in backends.library_ops("reciprocal_mask"):
    torch.library.register_fake(_op)(_reciprocal_mask_fake)
for _op in backends.library_ops("reverse_index"):
    torch.library.register_fake(_op)(_reverse_index_fake)
