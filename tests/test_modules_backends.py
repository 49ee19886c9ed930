"""NFormer on the kernel backends (tests/conftest.py's `backend` fixture; the reference and cpu
cases are tests/test_modules.py's): the eval forward and a training step's gradients equal the
reference backend's, and eval without autograd (row chunks) equals the one-pass forward.
The interpreted and emulated cases take small models."""
import time

import pytest
import torch

import nformer_kernels as nk
from tests.conftest import EMULATED, INTERPRETED
from tests.helpers import MODEL_TOL, TOL, assert_close, dtype_id, on_reference, randn

KERNEL_CASES = ("torch", INTERPRETED, EMULATED, "cuda", "triton")


def landmark_rows(n, depth, count=5):
    return torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:count] for i in range(depth)])


@pytest.mark.backends(*KERNEL_CASES)
def test_nformer_forward_and_backward(backend):
    """NFormer (eval features and a training step's gradients) equals the reference backend."""
    n, dim, topk = (40, 16, 5) if backend.slow else (300, 64, 10)
    depth = 2
    torch.manual_seed(0)
    model = nk.NFormer(dim=dim, depth=depth, num_heads=2, num_landmarks=5, topk=topk, dropout=0.0,
                       num_classes=7).to(backend.device)
    x = randn((n, dim), seed=1, device=backend.device)
    landmarks = landmark_rows(n, depth).to(backend.device)
    model.eval()
    feat = model(x, landmarks=landmarks)
    ref_feat = on_reference(model, x, landmarks=landmarks)
    assert feat.shape == x.shape
    assert_close(feat, ref_feat, TOL[torch.float32], "eval features")

    model.train()
    grads = []
    for run in (lambda f, *a, **kw: f(*a, **kw), on_reference):
        model.zero_grad()
        logits, _ = run(model, x, landmarks=landmarks)
        run(lambda: logits.logsumexp(-1).sum().backward())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert_close(a, b, TOL[torch.float32], "parameter gradient")


@pytest.mark.backends("torch", INTERPRETED, "cuda", "triton")  # the emulation: the two tests around this one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_nformer_inference_chunks(backend, dtype):
    """Eval without autograd (row chunks) equals the one-pass forward, fp32 and half."""
    n, dim, chunk = (100, 16, 8) if backend.slow else (1000, 64, 96)
    model = nk.NFormer(dim=dim, depth=2, topk=10, inference_chunk_rows=chunk).to(device=backend.device, dtype=dtype)
    model.eval()
    x = randn((n, dim), seed=2, dtype=dtype, device=backend.device)
    landmarks = torch.stack([torch.arange(5), torch.arange(n // 2, n // 2 + 5)]).to(backend.device)
    one_pass = model(x, landmarks=landmarks).detach()  # parameters require grad: one pass
    with torch.inference_mode():
        chunked = model(x, landmarks=landmarks)
    assert chunked.dtype == dtype
    assert_close(chunked, one_pass, MODEL_TOL[dtype], "chunked eval vs one pass")


@pytest.mark.backends(*KERNEL_CASES)
def test_nformer_chunked_eval_matches_reference_one_pass(backend):
    """Batched NFormer eval under no_grad (the backend's kernels, rows projected and finished 8 at
    a time) equals the one-pass forward on the reference backend."""
    x = randn((2, 33, 16), seed=3, device=backend.device)
    model = nk.NFormer(dim=16, depth=2, topk=5, inference_chunk_rows=8).to(backend.device).eval()
    lm = torch.tensor([[2, 9, 20], [0, 5, 32]], device=backend.device)
    with torch.no_grad():
        chunked = model(x, landmarks=lm)
    one_pass = on_reference(model, x, landmarks=lm).detach()
    assert_close(chunked, one_pass, TOL[torch.float32], "chunked on the backend vs one pass on the reference")


@pytest.mark.slow
@pytest.mark.backends("cuda", "triton")
def test_nformer_one_million_rows_bf16_memory(backend):
    """The 4-block eval forward at N = 1,000,000 (d = 256, bf16) peaks under 8 GiB."""
    n = 1_000_000
    model = nk.NFormer(dim=256, depth=4, topk=20).to(device="cuda", dtype=torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(n, 256, generator=g, device="cuda").to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    print(f"N={n} bf16 eval on {backend.name}: {seconds:.2f} s (first call, compiles included), "
          f"peak {peak / 2**30:.2f} GiB")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert peak < 8 * 2**30, f"peak {peak / 2**30:.2f} GiB"
