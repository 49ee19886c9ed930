import pytest
import torch

import nformer_kernels as nk
from nformer_kernels.ops import _backend_available


def cpu_backends():
    """CPU-tensor backends; the compiled one skips with a reason when the extension is missing."""
    return ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
        not nk.extension_available(), reason="compiled extension not built (pip install --no-build-isolation .)"))]


@pytest.fixture
def backend(request):
    name = request.param
    if not _backend_available(name, torch.device("cpu")):
        pytest.skip(f"backend {name!r} not available on CPU")
    nk.set_backend(name)
    yield name
    nk.set_backend(None)


def assert_close_fp32(actual, expected):
    """The project's fp32 tolerance: 1e-4 * max(1, max|ref|)."""
    tol = 1e-4 * max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


def ties_free(n, d, generator_seed=0, dtype=torch.float32, batch=None):
    g = torch.Generator().manual_seed(generator_seed)
    shape = (n, d) if batch is None else (batch, n, d)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
