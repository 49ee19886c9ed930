"""Backend registry: which implementation runs an op for tensors on a device, and why.

  cuda       hand-written CUDA kernels (csrc/cuda), torch.ops.nformer.<op>           CUDA tensors
  triton     Triton kernels (nformer_kernels/triton), torch.ops.nformer.<op>_triton  CUDA tensors
             (CPU tensors too when TRITON_INTERPRET=1 was set before triton was imported)
  cpu        C++/OpenMP kernels (csrc/cpu), torch.ops.nformer.<op>                   CPU tensors
  torch      plain PyTorch at O(N*k) memory (nformer_kernels/torch_ops.py)          any device
  reference  dense plain PyTorch, O(N^2) (nformer_kernels/reference.py)             any device

Every backend implements the batched kernel contract (csrc/ops.cpp): knn, knn_rows, knn_rescore,
reciprocal_mask, reverse_index, sparse_attention, sparse_attention_backward. The knn of cpu, torch
and reference is the canonical answer itself (exact_knn); that of cuda and triton is stage 1 of the
two-stage knn (ops/knn.py). A backend that cannot take one call (k above its limit, a keep mask its
gather-only backward cannot differentiate, a kernel it lacks) hands that call to the `torch` backend; `resolve` says so and logs why on logging.getLogger("nformer_kernels").
"""
import contextlib
import dataclasses
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from nformer_kernels import reference, torch_ops
from nformer_kernels._extension import extension_available, extension_has_cuda

logger = logging.getLogger("nformer_kernels")

KERNELS = ("knn", "knn_rows", "knn_rescore", "reciprocal_mask", "reverse_index", "sparse_attention", "sparse_attention_backward")
# The path a call takes when the selected backend cannot take it.
FALLBACK = "torch"


@dataclasses.dataclass
class Backend:
    """One implementation of the kernel contract.

    available(device) returns "" when it can run tensors on that device, else the reason it cannot.
    kernels() maps each name of KERNELS to its batched function (looked up on use, so a backend
    whose library is missing never touches it). limits() maps an op family ("knn", "attention")
    to the largest k its kernels take; a family not listed has no fixed limit (the CUDA kernels'
    limit is the device's shared memory, and they raise a clear error past it). gather_backward:
    the attention backward gathers through reverse_index, so it needs keep within the reciprocal mask.
    exact_knn: its knn kernel returns the canonical top-k itself (not stage-1 candidates).
    missing: the kernels of KERNELS it does not have (resolve hands those calls to `torch`).
    """

    name: str
    available: Callable[[torch.device], str]
    kernels: Callable[[], Mapping[str, Callable]]
    limits: Callable[[], Dict[str, int]] = dict
    gather_backward: bool = False
    exact_knn: bool = False
    missing: Tuple[str, ...] = ()


def _triton_module():
    try:
        from nformer_kernels import triton as nf_triton
    except ImportError:
        return None
    return nf_triton


def _triton_available(device: torch.device) -> str:
    nf_triton = _triton_module()
    if nf_triton is None or not nf_triton.available:
        return nf_triton.reason if nf_triton is not None else "nformer_kernels.triton cannot be imported"
    if device.type == "cuda" or (device.type == "cpu" and nf_triton.interpreted):
        return ""
    return f"the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), not {device.type}"


def _triton_limits() -> Dict[str, int]:
    nf_triton = _triton_module()
    if nf_triton is None or not nf_triton.available:
        return {}
    return {"knn": nf_triton.knn.MAX_K, "attention": nf_triton.sparse_attention.MAX_K}


def _extension_available(device_type: str) -> Callable[[torch.device], str]:
    def available(device: torch.device) -> str:
        if device.type != device_type:
            return f"the {'cuda' if device_type == 'cuda' else 'cpu'} backend runs {device_type} tensors, not {device.type}"
        if not extension_available():
            return "the compiled extension nformer_kernels._C is not built (pip install --no-build-isolation .)"
        if device_type == "cuda" and not extension_has_cuda():
            return "the compiled extension was built without its CUDA kernels"
        return ""
    return available


class _Kernels:
    """name -> kernel, looked up when asked for: a kernel missing from an older build fails only when used."""

    def __init__(self, namespace, suffix: str = ""):
        self._namespace, self._suffix = namespace, suffix

    def __getitem__(self, name: str) -> Callable:
        try:
            return getattr(self._namespace, name + self._suffix)
        except AttributeError:
            raise KeyError(f"no kernel {name + self._suffix!r} in {self._namespace!r} "
                           "(an extension built from older sources? rebuild it)") from None


def _library_kernels(suffix: str = "") -> Callable[[], _Kernels]:
    return lambda: _Kernels(torch.ops.nformer, suffix)


def _module_kernels(module) -> Callable[[], _Kernels]:
    return lambda: _Kernels(module)


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend: e.g. a build of the kernels under test."""
    _REGISTRY[backend.name] = backend


register_backend(Backend("cuda", _extension_available("cuda"), _library_kernels(), gather_backward=True))
register_backend(Backend("triton", _triton_available, _library_kernels("_triton"), _triton_limits,
                         gather_backward=True))
register_backend(Backend("cpu", _extension_available("cpu"), _library_kernels(), gather_backward=True,
                         exact_knn=True))
register_backend(Backend("torch", lambda device: "", _module_kernels(torch_ops), exact_knn=True))
register_backend(Backend("reference", lambda device: "", _module_kernels(reference), exact_knn=True))
# The automatic choice per device type, first available wins. Triton leads on CUDA until the CUDA
# kernels have been verified on a GPU (docs/design.md, "Backends").
_AUTOMATIC = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "reference")}
# Automatic choices of single kernels, before the per-device order: (device type, kernel, dtype) ->
# backends, first available wins. Stage 1 of precision="exact" on CUDA scans fp32 rows on FMA units
# (no tensor cores), where the CUDA kernel is expected ahead of Triton's "ieee" dot: per step of d it
# issues 32 FMA per 12 shared-memory loads (a 4 x 8 register tile a thread) against Triton's ~2.4 FMA
# per load, without spills (127 registers on sm_90, 2 CTAs/SM; Triton's: 128 with 4-12 B spilled;
# bench/results/aot). Both run in the GPU check (`knn float32 exact`); a measurement may reorder it.
_AUTOMATIC_KERNEL = {("cuda", "knn", torch.float32): ("cuda", "triton")}

BACKENDS = tuple(_REGISTRY)
_forced: Optional[str] = None


def _names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op (one of BACKENDS); None = automatic (env NFORMER_BACKEND still applies)."""
    global _forced
    if name is not None and name not in _REGISTRY:
        raise ValueError(f"backend must be one of {_names()} or None, got {name!r}")
    _forced = name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager: set_backend(name) inside the block, the previous choice restored after."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def available_backends(device) -> List[str]:
    """Names of the backends that can run tensors on `device`."""
    device = torch.device(device)
    return [name for name, b in _REGISTRY.items() if not b.available(device)]


def unavailable_reason(name: str, device) -> str:
    """Why backend `name` cannot run tensors on `device` ("" when it can)."""
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {_names()}, got {name!r}")
    return _REGISTRY[name].available(torch.device(device))


def backend_max_k(name: str, family: str) -> Optional[int]:
    """The largest k backend `name` takes for op family "knn" or "attention" (None: no fixed limit)."""
    return _REGISTRY[name].limits().get(family)


def _forced_name() -> Optional[str]:
    return _forced or os.environ.get("NFORMER_BACKEND") or None


def get_backend(device) -> str:
    """The backend selected for tensors on `device` (set_backend / NFORMER_BACKEND, else automatic).

    A call the selected backend cannot take runs on the `torch` backend instead: `resolve` tells.
    """
    device = torch.device(device)
    forced = _forced_name()
    if forced is not None:
        if forced not in _REGISTRY:
            raise ValueError(f"NFORMER_BACKEND must be one of {_names()}, got {forced!r}")
        why_not = _REGISTRY[forced].available(device)
        if why_not:
            raise RuntimeError(f"backend {forced!r} is not available for {device.type} tensors: {why_not}")
        return forced
    for name in _AUTOMATIC.get(device.type, ()):
        if not _REGISTRY[name].available(device):
            return name
    return "reference"


def resolve(op: str, device, k: Optional[int] = None, reason: str = "", dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs this call of `op` ("knn" | "knn_rows" | "knn_rescore" | "reciprocal" |
    "attention") on tensors of `dtype` (when it matters).

    The selected backend (or, when the selection is automatic, the kernel's own automatic choice, see
    _AUTOMATIC_KERNEL), unless it lacks the kernel, k exceeds its limit for the op family or the
    caller gives a `reason` the kernels cannot take the call (then the `torch` backend, logged at
    debug level).
    """
    name = get_backend(device)
    device = torch.device(device)
    if _forced_name() is None:
        for candidate in _AUTOMATIC_KERNEL.get((device.type, op, dtype), ()):
            if not _REGISTRY[candidate].available(device):
                name = candidate
                break
    if name in (FALLBACK, "reference"):
        return name
    if not reason and op in _REGISTRY[name].missing:
        reason = f"the {name} backend has no {op} kernel"
    limit = backend_max_k(name, "knn" if op.startswith("knn") else op)
    if not reason and limit is not None and k is not None and k > limit:
        reason = f"k={k} exceeds the {name} backend's limit of {limit}"
    if reason:
        logger.debug("%s: %s; running on the %r backend", op, reason, FALLBACK)
        return FALLBACK
    return name


def library_ops(name: str) -> List[str]:
    """Qualified names of the torch.library ops that implement kernel `name` (C++ and Triton)."""
    ops = [f"nformer::{name}"] if extension_available() else []
    nf_triton = _triton_module()
    if nf_triton is not None and nf_triton.imported:
        ops.append(f"nformer::{name}_triton")
    return ops


def kernel(backend: str, name: str) -> Callable:
    """The batched function `name` (one of KERNELS) of `backend`."""
    return _REGISTRY[backend].kernels()[name]


def gathers_backward(backend: str) -> bool:
    return _REGISTRY[backend].gather_backward


def exact_knn(backend: str) -> bool:
    """Whether `backend`'s knn kernel returns the canonical top-k itself."""
    return _REGISTRY[backend].exact_knn
