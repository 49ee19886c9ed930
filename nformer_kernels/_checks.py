"""Argument checks of the public ops: each raises TypeError/ValueError naming the argument.

Checks that read tensor values (and so sync a GPU) are skipped while torch.compile traces.
"""
import math
import numbers

import torch


def eager() -> bool:
    return not torch.compiler.is_compiling()


def readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read for a check: eager, and not a meta tensor (no values)."""
    return eager() and t.device.type != "meta"


def batched(t: torch.Tensor, name: str, trailing: int):
    """(N, ...) -> (1, N, ...); returns the tensor and whether a batch dim was added."""
    if t.dim() == trailing + 1:
        return t.unsqueeze(0), True
    if t.dim() == trailing + 2:
        return t, False
    raise ValueError(f"{name} must have {trailing + 1} or {trailing + 2} dims, got shape {tuple(t.shape)}")


def check_float(t, name, check_finite=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    # One reduction pass, no copy: NaN propagates into both extremes, +-Inf into one of them.
    if check_finite and readable(t) and t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_index(idx, name="idx", check_values=True):
    """Validated (B,N,k) contiguous int64 neighbour lists, and whether a batch dim was added."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {idx.dtype}")
    idx, squeezed = batched(idx, name, 1)
    n, k = idx.shape[1], idx.shape[2]
    if n == 0 or k == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(idx.shape)}")
    if k > n:
        raise ValueError(f"{name} has {k} neighbours per row but only {n} rows")
    if check_values and eager():
        if bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValueError(f"{name} has entries outside [0, {n})")
        srt = idx.sort(dim=-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError(f"{name} repeats a neighbour within a row")
    return idx.contiguous(), squeezed


def check_neighbors(idx, keep, n, check_values):
    """Validated (B,N,k) idx and keep for N=n rows."""
    idx, _ = check_index(idx, check_values=check_values)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError("keep must be a bool tensor")
    keep, _ = batched(keep, "keep", 1)
    if idx.shape[1] != n or keep.shape != idx.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and keep {tuple(keep.shape)} must be (B,N,k) for N={n}")
    return idx, keep.contiguous()


def same_device(**tensors):
    """Non-tensors are skipped: each argument's own check names its type error."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def as_int(value, name) -> int:
    """value as a Python int: ints and numpy integer scalars, never bools or floats."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def positive_int(value, name) -> int:
    value = as_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_k(k, n, name="k") -> int:
    k = as_int(k, name)
    if k < 1 or k > n:
        raise ValueError(f"{name} must be in [1, N={n}], got {k}")
    return k


def check_heads(num_heads) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    return int(num_heads)


def check_query_mask(query_mask, x_shape, name: str = "query_mask") -> torch.Tensor:
    """query_mask must be a bool tensor (N,) or (B,N) for x of shape (..., N, d); returns it."""
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        found = query_mask.dtype if isinstance(query_mask, torch.Tensor) else type(query_mask).__name__
        raise TypeError(f"{name} must be a bool tensor, got {found}")
    n = x_shape[-2]
    if query_mask.dim() not in (1, 2) or query_mask.shape[-1] != n or \
            (query_mask.dim() == 2 and (len(x_shape) != 3 or query_mask.shape[0] != x_shape[0])):
        raise ValueError(f"{name} must have shape (N,) or (B,N) matching x {tuple(x_shape)}, "
                         f"got {tuple(query_mask.shape)}")
    return query_mask


def check_landmarks(landmarks, n: int, check_values: bool = True) -> None:
    """landmarks must be a 1-D int64 tensor of at least one distinct position in [0, n).

    check_values=False checks the type and shape only (no device sync)."""
    if not isinstance(landmarks, torch.Tensor) or landmarks.dtype != torch.int64 or landmarks.dim() != 1:
        raise TypeError("landmarks must be a 1-D int64 tensor")
    if landmarks.numel() < 1:
        raise ValueError("landmarks must hold at least one position")
    if check_values and eager():
        if bool((landmarks < 0).any()) or bool((landmarks >= n).any()):
            raise ValueError(f"landmarks must lie in [0, N={n})")
        if landmarks.unique().numel() != landmarks.numel():
            raise ValueError("landmarks must be distinct")


def check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
