"""Loads the compiled extension (registers the `nformer::` C++/CUDA ops) if it was built."""
import importlib
import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

try:
    _C = importlib.import_module("nformer_kernels._C")  # importing registers torch.ops.nformer.*

    _ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _ERROR = exc
    warnings.warn(
        f"nformer_kernels: the compiled extension is not available ({exc}); the 'cpu' and 'cuda' "
        "backends are disabled and CPU tensors use the slow 'reference' backend. Build it with "
        "`pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    return _C is not None


def extension_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "has_cuda", False))
