"""Argument checks shared by the library functions of nformer_reid.

Each returns the value in its canonical Python / torch form and raises TypeError (wrong kind of
value) or ValueError (right kind, wrong value) with a message naming the argument. numpy integer
and float scalars (and 0-d integer arrays / tensors) are accepted wherever a Python int or float
is; bool is not an int here.
"""
import math
import numbers
from typing import Optional

import numpy as np
import torch


def as_int(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """value as a Python int (int, numpy integer, 0-d integer array/tensor); TypeError otherwise,
    ValueError outside [minimum, maximum]."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0 and not value.dtype == torch.bool \
            and not (isinstance(value, np.ndarray) and value.dtype == np.bool_):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def as_float(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
             open_min: bool = False) -> float:
    """value as a finite Python float (int, float, numpy scalar, 0-d array/tensor); TypeError for
    other kinds, ValueError for NaN/Inf or outside [minimum, maximum] ((minimum, maximum] with open_min)."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if open_min else value < minimum):
        raise ValueError(f"{name} must be {'>' if open_min else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def as_device(device, name: str = "device") -> torch.device:
    """None / "auto": cuda when available, else cpu; otherwise a device this machine has
    (ValueError naming `name` for a malformed string or a device that is not present)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a string or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: CUDA is not available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None \
                and torch.backends.mps.is_available():
            return dev
        raise ValueError(f"{name} {device!r}: only cpu and cuda devices are supported")
    return dev


def as_tensor(x, name: str) -> torch.Tensor:
    """A numpy array, torch tensor or (nested) sequence of numbers as a detached torch tensor
    (numpy views of any strides are copied contiguous); TypeError for anything else, sparse tensors
    included; ValueError for a meta tensor (a shape without values)."""
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise ValueError(f"{name} is a meta tensor (a shape without values)")
        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}")
        return x.detach()
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got numpy dtype {arr.dtype}")
    if arr.dtype == np.uint64:  # no torch arithmetic on uint64
        arr = arr.astype(np.float64)
    elif arr.dtype.kind == "u" and arr.dtype != np.uint8:
        arr = arr.astype(np.int64)
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.broadcast_to views: torch wants a writable buffer
        arr = arr.copy()
    return torch.from_numpy(arr)


def as_features(x, name: str) -> torch.Tensor:
    """A 2-D real feature matrix (N, d) as a tensor: TypeError unless floating point or integer,
    ValueError unless 2-D, finite."""
    t = as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def pow2_row_scale(x: torch.Tensor) -> torch.Tensor:
    """x (float32 / float64) with each row divided by a power of two near its largest magnitude
    (zero rows unchanged).

    Exact in floating point (barring subnormal results), so normalising the result gives the same
    bits as normalising x wherever that does not over/underflow, and the right answer where it would."""
    if x.numel() == 0:
        return x
    peak = x.abs().amax(dim=-1, keepdim=True)
    _, exponent = torch.frexp(torch.where(peak > 0, peak, torch.ones_like(peak)))
    shift = -exponent.to(x.dtype)
    half = torch.trunc(shift / 2)
    two = torch.tensor(2.0, dtype=x.dtype, device=x.device)
    return x * two.pow(half) * two.pow(shift - half)  # two factors: each stays inside the float range


def pow2_scale(x: torch.Tensor) -> int:
    """The exponent e of a power of two 2**e near x's largest magnitude (0 for an all-zero x)."""
    if x.numel() == 0:
        return 0
    peak = float(x.abs().max())
    return math.frexp(peak)[1] if peak > 0 else 0


def ldexp(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x * 2**exponent, in two factors so that neither over/underflows on its own."""
    half = int(exponent) // 2
    return x * 2.0 ** half * 2.0 ** (int(exponent) - half)


def as_bool(value, name: str) -> bool:
    """A Python or numpy bool (not an int: 0 and 1 are refused)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)
