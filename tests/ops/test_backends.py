"""The backend registry (nformer_kernels/backends.py): selection, use_backend, available_backends,
errors for unavailable or unknown backends, the logged hand-over of calls a backend cannot take to
the `torch` backend, register_backend, and the library ops' schemas and fake kernels."""
import logging

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import backends, reference
from tests.helpers import (assert_close_fp32, assert_knn, attention_case, neighbor_attention_case, reference_attention,
                           register_counting_backend,
                           ties_free, unit_rows)

LOGGER = "nformer_kernels"


# ----------------------------------------------------------------------------- selection
def test_automatic_backend_on_cpu():
    assert nk.get_backend("cpu") == ("cpu" if nk.extension_available() else "reference")


def test_backend_fixture_selects_the_backend(backend):
    assert nk.get_backend(backend.device) == backend.name
    assert backend.name in nk.available_backends(backend.device)


def test_available_backends_on_cpu():
    names = nk.available_backends("cpu")
    assert {"reference", "torch"} <= set(names)
    assert ("cpu" in names) == nk.extension_available()
    assert "cuda" not in names
    from nformer_kernels import triton as nf_triton
    assert ("triton" in names) == (nf_triton.available and nf_triton.interpreted)


def test_exact_fp32_stage_one_on_cuda_runs_the_cuda_fma_kernel(monkeypatch):
    """The documented kernel rule (backends._AUTOMATIC_KERNEL): with automatic selection on a CUDA
    device, the fp32 knn (stage 1 of precision="exact") runs on `cuda` while every other call stays on
    the selected `triton`; a forced backend is honoured; without the CUDA kernels it stays on triton."""
    gpu = torch.device("cuda")
    for name in ("cuda", "triton"):  # pretend both can run CUDA tensors (nothing is launched)
        monkeypatch.setattr(backends._REGISTRY[name], "available", lambda device: "" if device.type == "cuda" else "no")
    monkeypatch.delenv("NFORMER_BACKEND", raising=False)
    assert backends.get_backend(gpu) == "triton"
    assert backends.resolve("knn", gpu, k=32, dtype=torch.float32) == "cuda"
    assert backends.resolve("knn", gpu, k=32, dtype=torch.float16) == "triton"
    assert backends.resolve("knn", gpu, k=32) == "triton"
    assert backends.resolve("knn_rows", gpu, k=20, dtype=torch.float32) == "triton"
    with nk.use_backend("triton"):
        assert backends.resolve("knn", gpu, k=32, dtype=torch.float32) == "triton"
    monkeypatch.setattr(backends._REGISTRY["cuda"], "available", lambda device: "not built")
    assert backends.resolve("knn", gpu, k=32, dtype=torch.float32) == "triton"
    assert backends.resolve("knn", torch.device("cpu"), k=32, dtype=torch.float32) == nk.get_backend("cpu")


def test_unavailable_reason_says_why():
    assert "cuda" in backends.unavailable_reason("cuda", "cpu") and backends.unavailable_reason("torch", "cpu") == ""
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.unavailable_reason("tpu", "cpu")


def test_use_backend_restores_the_previous_choice():
    before = nk.get_backend("cpu")
    with nk.use_backend("torch"):
        assert nk.get_backend("cpu") == "torch"
        with nk.use_backend("reference"):
            assert nk.get_backend("cpu") == "reference"
        assert nk.get_backend("cpu") == "torch"
        with pytest.raises(ZeroDivisionError), nk.use_backend("reference"):
            1 / 0
        assert nk.get_backend("cpu") == "torch"
    assert nk.get_backend("cpu") == before


def test_set_backend_and_environment(monkeypatch):
    monkeypatch.setenv("NFORMER_BACKEND", "torch")
    assert nk.get_backend("cpu") == "torch"
    with nk.use_backend("reference"):  # a forced backend wins over the environment
        assert nk.get_backend("cpu") == "reference"
    monkeypatch.setenv("NFORMER_BACKEND", "gpu")
    with pytest.raises(ValueError, match="NFORMER_BACKEND"):
        nk.get_backend("cpu")


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        nk.set_backend("gpu")


def test_forced_backend_unavailable_is_an_error():
    with nk.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available for cpu tensors"):
        nk.knn(ties_free(10, 4), 2)


# ----------------------------------------------------------------------------- hand-over to `torch`
@pytest.mark.backends("triton-interpreted", "triton")
def test_knn_k_above_the_limit_runs_on_torch(backend, caplog):
    """Stage 1 keeps k + margin candidates: past the triton kernel's 64 the call runs on torch."""
    from nformer_kernels.ops.knn import DEFAULT_MARGIN

    x = unit_rows((1, 90, 8), device=backend.device)
    k = 64 - DEFAULT_MARGIN + 1
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        idx = nk.knn(x, k)
    assert "k=65 exceeds the triton backend's limit of 64; running on the 'torch' backend" in caplog.text
    assert_knn(x, idx, k)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert_knn(x, nk.knn(x, k - 1), k - 1)
        assert_knn(x, nk.knn(x, 64, margin=0), 64)
    assert "exceeds" not in caplog.text


@pytest.mark.backends("triton-interpreted", "triton")
def test_attention_k_above_the_limit_runs_on_torch(backend, caplog):
    P, R, v, idx, keep, scale = attention_case(1, 140, 2, 3, 129, 4, torch.float32, device=backend.device)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = nk.sparse_attention(P, R, v, idx, keep, scale)
    assert "k=129 exceeds the triton backend's limit of 128; running on the 'torch' backend" in caplog.text
    assert_close_fp32(out, reference.sparse_attention(P, R, v, idx, keep, scale)[0])


@pytest.mark.backends("cpu", "triton-interpreted", "cuda-emulated", "cuda", "triton")
def test_non_reciprocal_keep_under_grad_runs_on_torch(backend, caplog):
    """The gather-only backward kernels need keep within the reciprocal mask: under autograd such a
    call runs on the torch backend (logged); without autograd, or within the mask, on the backend."""
    inputs = neighbor_attention_case(30, 8, 6, 2, keep_all=True, device=backend.device)
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = nk.neighbor_attention(q, kk, v, *inputs[3:])
    assert "keep is not within the reciprocal mask" in caplog.text and "running on the 'torch' backend" in caplog.text
    assert_close_fp32(out, reference_attention(*inputs))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=LOGGER), torch.no_grad():
        assert_close_fp32(nk.neighbor_attention(*inputs), reference_attention(*inputs))
    assert "running on the 'torch' backend" not in caplog.text
    reciprocal = neighbor_attention_case(30, 8, 6, 2, device=backend.device)
    q, kk, v = (t.clone().requires_grad_() for t in reciprocal[:3])
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        nk.neighbor_attention(q, kk, v, *reciprocal[3:]).sum().backward()
    assert "running on the 'torch' backend" not in caplog.text


def test_resolve_on_the_torch_and_reference_backends():
    for name in ("torch", "reference"):
        with nk.use_backend(name):
            assert backends.resolve("knn", "cpu", k=10_000) == name
            assert backends.resolve("attention", "cpu", reason="any") == name


# ----------------------------------------------------------------------------- register_backend
def test_register_backend(monkeypatch):
    """A registered backend serves the public ops once selected, and is listed where available."""
    calls = register_counting_backend(monkeypatch)
    assert "counting" in nk.available_backends("cpu") and "counting" not in nk.available_backends("meta")
    x = ties_free(30, 8)
    with nk.use_backend("counting"):
        idx = nk.knn(x, 5)
        keep = nk.reciprocal_mask(idx)
        out = nk.neighbor_attention(x, x, x, idx, keep, torch.tensor([0, 7]), 2)
    assert calls == ["knn", "reciprocal_mask", "sparse_attention"]
    assert torch.equal(idx, reference.knn(torch.nn.functional.normalize(x, dim=-1)[None], 5)[0])
    assert_close_fp32(out, reference_attention(x, x, x, idx, keep, torch.tensor([0, 7]), 2))
    with pytest.raises(ValueError, match="backend"):
        nk.set_backend("counting-typo")


# ----------------------------------------------------------------------------- library ops
@pytest.mark.backends("cpu", "triton-interpreted", "cuda", "triton")
def test_library_ops_schemas_and_fake_kernels(backend):
    """torch.library.opcheck (schema, fake tensor) of each of the backend's five library ops."""
    P, R, v, idx, keep, scale = attention_case(2, 37, 2, 5, 5, 8, torch.float32, seed=1, device=backend.device)
    x = unit_rows((2, 37, 12), seed=1, device=backend.device)
    rev = backend.kernel("reverse_index")(idx, keep)
    out, probs = backend.kernel("sparse_attention")(P, R, v, idx, keep, scale)
    grad_out = torch.randn_like(out)
    checks = ("test_schema", "test_faketensor")
    for name, args in (("knn", (x, 5)), ("reciprocal_mask", (idx,)), ("reverse_index", (idx, keep)),
                       ("sparse_attention", (P, R, v, idx, keep, scale)),
                       ("sparse_attention_backward", (grad_out, P, R, v, idx, rev, probs, scale))):
        torch.library.opcheck(backend.kernel(name).default, args, test_utils=checks)


@pytest.mark.backends("triton-interpreted", "triton")
def test_triton_library_ops_match_the_launchers(backend):
    from nformer_kernels.triton import knn as triton_knn, sparse_attention as triton_attention

    P, R, v, idx, keep, _ = attention_case(2, 37, 2, 5, 5, 8, torch.float32, seed=1, device=backend.device)
    x = unit_rows((2, 37, 12), seed=1, device=backend.device)
    assert torch.equal(backend.kernel("knn")(x, 5), triton_knn.knn(x, 5))
    assert torch.equal(backend.kernel("reciprocal_mask")(idx), keep)
    rev = backend.kernel("reverse_index")(idx, keep)
    assert torch.equal(rev, reference.reverse_index(idx, keep))
    out, probs = backend.kernel("sparse_attention")(P, R, v, idx, keep, 0.5)
    assert torch.equal(out, triton_attention.sparse_attention(P, R, v, idx, keep, 0.5)[0])
    grads = backend.kernel("sparse_attention_backward")(torch.randn_like(out), P, R, v, idx, rev, probs, 0.5)
    assert [g.shape for g in grads] == [P.shape, R.shape, v.shape]
