"""Landmark attention: every backend's batched sparse_attention / sparse_attention_backward kernels
(contract: csrc/ops.cpp) against the dense reference, and landmark_factors, sparse_attention,
neighbor_attention, landmark_affinity_knn / affinity_knn and autocast through the public API
under the active backend; bad input.

Tolerances (tests/helpers.py): outputs TOL[dtype]; probs ACC_TOL of the accumulation dtype; dP, dR
ACC_TOL[v's dtype]; dv TOL[dtype].
"""
import math

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import reference, torch_ops
from tests.conftest import EMULATED, INTERPRETED, VS_REFERENCE, fast_and, fast_only
from tests.helpers import (ACC_TOL, DTYPES, HALF_DTYPES, KernelAttention, TOL, assert_close, assert_close_fp32,
                           assert_knn, attention_case, dtype_id, grad_like, kernel_grads, neighbor_attention_case,
                           on_reference, probs_tol, randn, reference_attention, reference_grads, ties_free, unit_rows)


EMU, INTERP = EMULATED, INTERPRETED
SHAPES = {  # B, N, H, l, k, dv -> the slow cases that take it: one row, odd sizes, dv below/above a
    # vector, H=1, l=1, k=N, k=64, k=70
    (1, 1, 1, 1, 1, 8): (EMU, INTERP), (1, 1, 1, 1, 1, 1): (),
    (3, 37, 2, 5, 7, 16): (EMU,), (2, 37, 2, 5, 5, 16): (INTERP,), (3, 37, 2, 5, 5, 7): (),
    (1, 67, 2, 5, 20, 128): (EMU,), (2, 29, 1, 3, 17, 5): (EMU,), (1, 70, 4, 2, 64, 24): (EMU,),
    (1, 70, 2, 5, 16, 8): (INTERP,), (2, 37, 1, 1, 37, 16): (INTERP,), (1, 70, 1, 5, 70, 8): (INTERP,),
    (1, 37, 2, 5, 20, 80): (INTERP,), (1, 37, 1, 1, 37, 3): (), (3, 64, 2, 5, 20, 128): (),
    (1, 1031, 2, 5, 20, 128): (), (2, 129, 1, 3, 37, 5): (), (1, 100, 4, 2, 64, 24): ()}


def shapes(interpreted=None):
    """SHAPES as parameters, each for the fast cases and its slow ones (the interpreted case only
    on those of `interpreted`, when given)."""
    params = []
    for s, slow in SHAPES.items():
        if interpreted is not None and s not in interpreted:
            slow = tuple(c for c in slow if c != INTERP)
        params.append(pytest.param(s, marks=fast_and(*slow), id="B{}N{}H{}l{}k{}dv{}".format(*s)))
    return params


# ----------------------------------------------------------------------------- batched kernels
@pytest.mark.backends(*VS_REFERENCE)
@pytest.mark.parametrize("keep_mode", ["reciprocal", pytest.param("subset", marks=fast_and(EMU))])
@pytest.mark.parametrize("shape", shapes())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_attention_kernels(backend, dtype, shape, keep_mode):
    """Forward (out, probs: 0 where not kept) and backward (dP, dR, dv by reverse_index and the
    backward kernel) against the reference and autograd through it. keep within the reciprocal
    mask ("subset": 70% of it, a quarter of the rows with nothing kept), which the gather-only
    backward kernels need."""
    backend.skip_dtype(dtype)
    P, R, v, idx, keep, scale = attention_case(*shape, dtype, keep_mode, seed=1, device=backend.device)
    grad_out = grad_like(v)
    out, probs, dP, dR, dv = kernel_grads(backend.name, grad_out, P, R, v, idx, keep, scale)
    ref_out, ref_probs, ref_dP, ref_dR, ref_dv = reference_grads(grad_out, P, R, v, idx, keep, scale)
    assert out.dtype == v.dtype and probs.dtype == P.dtype and probs.shape == idx.shape[:2] + (shape[2], shape[4])
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(probs, ref_probs, probs_tol(dtype), "probs")
    assert bool((probs[~keep.unsqueeze(2).expand_as(probs)] == 0).all())
    assert dP.dtype == P.dtype and dR.dtype == R.dtype and dv.dtype == v.dtype
    assert_close(dP, ref_dP, ACC_TOL[dtype], "dP")
    assert_close(dR, ref_dR, ACC_TOL[dtype], "dR")
    assert_close(dv, ref_dv, TOL[dtype], "dv")


@pytest.mark.backends(*VS_REFERENCE)
@pytest.mark.parametrize("shape", shapes(interpreted=[(1, 1, 1, 1, 1, 8), (2, 37, 2, 5, 5, 16)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_attention_kernel_keep_all(backend, dtype, shape):
    """Every listed neighbour kept (beyond the reciprocal mask): the forward kernels take any keep."""
    backend.skip_dtype(dtype)
    P, R, v, idx, keep, scale = attention_case(*shape, dtype, "all", device=backend.device)
    out, probs = backend.kernel("sparse_attention")(P, R, v, idx, keep, scale)
    ref_out, ref_probs = reference.sparse_attention(P, R, v, idx, keep, scale)
    assert out.dtype == v.dtype and probs.dtype == P.dtype and probs.shape == idx.shape[:2] + (shape[2], shape[4])
    assert_close(out, ref_out, TOL[dtype], "out")
    assert_close(probs, ref_probs, probs_tol(dtype), "probs")


@pytest.mark.backends("torch")
@pytest.mark.parametrize("shape", shapes())
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sparse_attention_backward_kernel_any_keep(backend, dtype, shape):
    """The torch backend's backward scatters (no reverse_index): exact for keep beyond the reciprocal mask."""
    P, R, v, idx, keep, scale = attention_case(*shape, dtype, "all", seed=2, device=backend.device)
    grad_out = grad_like(v)
    _, _, dP, dR, dv = kernel_grads(backend.name, grad_out, P, R, v, idx, keep, scale)
    _, _, ref_dP, ref_dR, ref_dv = reference_grads(grad_out, P, R, v, idx, keep, scale)
    assert_close(dP, ref_dP, ACC_TOL[dtype], "dP")
    assert_close(dR, ref_dR, ACC_TOL[dtype], "dR")
    assert_close(dv, ref_dv, TOL[dtype], "dv")


@pytest.mark.backends("reference", "torch", "cpu", "cuda-emulated", "cuda")
@pytest.mark.parametrize("size", [pytest.param((2, 12, 2, 3, 4, 3), marks=pytest.mark.backends("torch", "cpu", "cuda")),
                                  (1, 7, 2, 2, 3, 2)],
                         ids=lambda s: "B{}N{}H{}l{}k{}dv{}".format(*s))
@pytest.mark.parametrize("keep_mode", ["reciprocal", "subset"])
def test_sparse_attention_kernels_gradcheck_fp64(backend, size, keep_mode):
    """fp64 gradcheck of the op built from the backend's forward, reverse_index and backward kernels."""
    P, R, v, idx, keep, _ = attention_case(*size, torch.float64, keep_mode, seed=3, device=backend.device)
    inputs = tuple(t.requires_grad_() for t in (P, R, v))
    assert torch.autograd.gradcheck(lambda P_, R_, v_: KernelAttention.apply(backend.name, P_, R_, v_, idx, keep, 0.6),
                                    inputs)


@pytest.mark.backends(*VS_REFERENCE)
def test_sparse_attention_kernel_large_affinity_and_empty_rows(backend):
    """Scores far beyond the fp16 range stay fp32; rows with nothing kept give zeros, not NaN."""
    P, R, v, idx, keep, _ = attention_case(2, 37, 2, 5, 8, 16, torch.float16, seed=5, device=backend.device,
                                           magnitude=300.0)
    keep[:, ::3] = False
    out, probs = backend.kernel("sparse_attention")(P, R, v, idx, keep, 1.0)
    ref_out, ref_probs = reference.sparse_attention(P, R, v, idx, keep, 1.0)
    assert_close(out, ref_out, TOL[torch.float16], "out")
    assert_close(probs, ref_probs, probs_tol(torch.float16), "probs")
    assert (probs[:, ::3] == 0).all() and (out[:, ::3] == 0).all()


@pytest.mark.slow
@pytest.mark.backends("cuda", "triton")
def test_sparse_attention_kernels_large_pipeline_bf16(backend):
    """B*N = 2 x 65,536, d = 256 (H=2, dv=128), k = 20, bf16: knn -> reciprocal -> reverse -> attention
    forward and backward, against the gathered O(N*k) torch backend (itself checked against the dense
    reference by this file's torch cases), forward checked on every row."""
    dev = backend.device
    B, N, H, l, k, dv = 2, 65_536, 2, 5, 20, 128
    x = unit_rows((B, N, 64), torch.bfloat16, seed=4, device=dev)
    idx = backend.kernel("knn")(x, k)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:200].to(dev)
    assert_knn(x, idx, k, rows=rows)
    keep = backend.kernel("reciprocal_mask")(idx)
    sample = idx[:, rows]  # keep[b,i,t] = i in idx[b, idx[b,i,t]] on the sampled rows
    want = (idx[torch.arange(B, device=dev).view(B, 1, 1), sample] == rows.view(1, -1, 1, 1)).any(-1)
    assert torch.equal(keep[:, rows], want)
    rev = backend.kernel("reverse_index")(idx, keep)
    assert int((rev >= 0).sum()) == int(keep.sum())

    g = torch.Generator(device=dev).manual_seed(3)
    P, R = (torch.randn(B, N, H, l, generator=g, device=dev) for _ in range(2))
    v = torch.randn(B, N, H * dv, generator=g, device=dev).to(torch.bfloat16)
    grad_out = torch.randn(v.shape, generator=g, device=dev).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    out, probs = backend.kernel("sparse_attention")(P, R, v, idx, keep, scale)
    dP, dR, dv_ = backend.kernel("sparse_attention_backward")(grad_out, P, R, v, idx, rev, probs, scale)
    Pr, Rr, vr = (t.clone().requires_grad_() for t in (P, R, v))
    ref_out, ref_probs = torch_ops.sparse_attention(Pr, Rr, vr, idx, keep, scale)
    ref_dP, ref_dR, ref_dv = torch.autograd.grad(ref_out, (Pr, Rr, vr), grad_out)
    assert_close(out, ref_out, TOL[torch.bfloat16], "out")
    assert_close(probs, ref_probs, probs_tol(torch.bfloat16), "probs")
    assert_close(dP, ref_dP, ACC_TOL[torch.bfloat16], "dP")
    assert_close(dR, ref_dR, ACC_TOL[torch.bfloat16], "dR")
    assert_close(dv_, ref_dv, TOL[torch.bfloat16], "dv")


# ----------------------------------------------------------------------------- one backend's kernels
@pytest.mark.backends("cpu")
def test_sparse_attention_cpu_rejects_bad_calls(backend):
    fwd, bwd = backend.kernel("sparse_attention"), backend.kernel("sparse_attention_backward")
    P, R, v, idx, keep, _ = attention_case(1, 10, 2, 3, 3, 4, torch.float32)
    with pytest.raises(RuntimeError, match="P and R"):
        fwd(P.double(), R, v, idx, keep, 1.0)
    with pytest.raises(RuntimeError, match="v must be"):
        fwd(P, R, v[..., :7].contiguous(), idx, keep, 1.0)
    with pytest.raises(RuntimeError, match="keep"):
        fwd(P, R, v, idx, keep.int(), 1.0)
    bad = idx.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(RuntimeError, match=r"\[0, N\)"):
        fwd(P, R, v, bad, keep, 1.0)
    out, probs = fwd(P, R, v, idx, keep, 1.0)
    rev = backend.kernel("reverse_index")(idx, keep)
    with pytest.raises(RuntimeError, match="rev"):
        bwd(out, P, R, v, idx, rev + 5, probs, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(out.double(), P, R, v, idx, rev, probs, 1.0)


@pytest.mark.backends("cuda")
def test_sparse_attention_cuda_errors(backend):
    P, R, v, idx, keep, scale = attention_case(1, 20, 2, 3, 4, 8, torch.float32, device="cuda")
    fwd = backend.kernel("sparse_attention")
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        fwd(P, R, v, idx.cpu(), keep, scale)
    with pytest.raises(RuntimeError, match="P must be"):
        fwd(P.double(), R, v, idx, keep, scale)
    with pytest.raises(RuntimeError, match="v must be"):
        fwd(P, R, v[..., :7].contiguous(), idx, keep, scale)
    with pytest.raises(RuntimeError, match="keep"):
        fwd(P, R, v, idx, keep[..., :3].contiguous(), scale)


@pytest.mark.backends("triton-interpreted", "triton")
def test_sparse_attention_triton_launcher_rejects_bad_input(backend):
    from nformer_kernels.triton import sparse_attention as triton_attention

    fwd = triton_attention.sparse_attention
    P, R, v, idx, keep, _ = attention_case(1, 37, 2, 5, 5, 8, torch.float32, device=backend.device)
    with pytest.raises(TypeError):
        fwd(P, R, v.double(), idx, keep, 1.0)
    with pytest.raises(TypeError):
        fwd(P.half(), R, v, idx, keep, 1.0)
    with pytest.raises(ValueError):
        fwd(P, R, v[..., :-1], idx, keep, 1.0)
    with pytest.raises(ValueError):
        fwd(P, R, v, idx[..., :4], keep, 1.0)


# ----------------------------------------------------------------------------- public API
# The interpreted case's attention is its slow op: it takes the public-API tests' smaller inputs.
@pytest.mark.parametrize("n,d,k,heads,batch,n_land", [
    pytest.param(37, 16, 5, 1, None, 5, marks=fast_and(EMU, INTERP)), pytest.param(37, 16, 5, 2, None, 1),
    pytest.param(64, 12, 20, 3, 3, 5, marks=fast_and(EMU)), pytest.param(1, 8, 1, 2, None, 1),
    pytest.param(50, 32, 50, 2, 2, 4, marks=fast_and(EMU))])
def test_neighbor_attention_values_and_grads(backend, n, d, k, heads, batch, n_land):
    inputs = neighbor_attention_case(n, d, k, heads, batch, n_land=n_land, device=backend.device)
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    out = nk.neighbor_attention(q, kk, v, *inputs[3:])
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = reference_attention(qr, kr, vr, *inputs[3:])
    assert_close_fp32(out, ref)
    g = grad_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    for a, b in zip(grads, ref_grads):
        assert_close_fp32(a, b)


def test_the_backward_reuses_the_forwards_reverse_index(backend, monkeypatch):
    """A gather backward's reverse index is the one the forward computed for its reciprocity check
    (kept in the autograd context), not a second reverse_index call; under no_grad none is computed;
    the gradients are the reference's either way."""
    from nformer_kernels.ops import attention as attention_ops
    from nformer_kernels.ops import reciprocal as reciprocal_ops

    calls = []
    for module in (attention_ops, reciprocal_ops):
        original = module.reverse_index
        monkeypatch.setattr(module, "reverse_index",
                            lambda *a, original=original, module=module: calls.append(module.__name__) or original(*a))
    inputs = neighbor_attention_case(37, 16, 5, 2, None, n_land=5, device=backend.device)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    out = nk.neighbor_attention(*leaves, *inputs[3:])
    forward_calls = list(calls)
    grads = torch.autograd.grad(out, leaves, grad_like(out))
    gathers = nk.backends.gathers_backward(backend.name)
    assert forward_calls == (["nformer_kernels.ops.reciprocal"] if gathers else [])
    assert calls == forward_calls  # the backward computed none
    refs = [t.clone().requires_grad_() for t in inputs[:3]]
    ref = reference_attention(*refs, *inputs[3:])
    for a, b in zip(grads, torch.autograd.grad(ref, refs, grad_like(out))):
        assert_close_fp32(a, b)
    calls.clear()
    with torch.no_grad():
        nk.neighbor_attention(*[t.detach() for t in leaves], *inputs[3:])
    assert calls == []


@fast_and(EMU)
@pytest.mark.parametrize("batch", [None, pytest.param(3, marks=fast_only)])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=dtype_id)
def test_neighbor_attention_dtypes(backend, dtype, batch):
    """n = 257, d = 64 in each dtype: values and q, k, v grads equal the reference backend's in that
    dtype (q, k grads go through P, R in fp32 and the cast back to the dtype)."""
    n, d, heads = 257, 64, 2
    shape = (n, d) if batch is None else (batch, n, d)
    q, k, v = (randn(shape, seed=s, dtype=dtype, device=backend.device) for s in (1, 2, 3))
    idx = on_reference(nk.knn, q.float(), 20)
    keep = nk.reciprocal_mask(idx)
    landmarks = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:5].to(backend.device)
    grad = randn(shape, seed=4, dtype=dtype, device=backend.device)
    results = []
    for run in (lambda f, *a: f(*a), on_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run(nk.neighbor_attention, *leaves, idx, keep, landmarks, heads)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, TOL[dtype], f"d{name}")


@pytest.mark.backends("reference", "torch", "cpu", EMU, "cuda")  # fp64: not triton
@pytest.mark.parametrize("n,d,k,n_land", [
    pytest.param(13, 6, 4, 3, marks=pytest.mark.backends("reference", "torch", "cpu", "cuda")),
    pytest.param(6, 4, 3, 2, marks=pytest.mark.backends(EMU))])
def test_neighbor_attention_gradcheck_fp64(backend, n, d, k, n_land):
    q, kk, v, idx, keep, landmarks, heads = neighbor_attention_case(n, d, k, 2, dtype=torch.float64, n_land=n_land,
                                                                    device=backend.device)
    fn = lambda a, b, c: nk.neighbor_attention(a, b, c, idx, keep, landmarks, heads)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, kk, v)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_neighbor_attention_non_reciprocal_keep(backend, dtype):
    """keep beyond the reciprocal mask (plain top-k attention) is still exact, values and grads
    (the gather-only backends hand such calls under autograd to the torch backend)."""
    backend.skip_dtype(dtype)
    inputs = neighbor_attention_case(30, 8, 6, 2, keep_all=True, dtype=dtype, device=backend.device)
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    out = nk.neighbor_attention(q, kk, v, *inputs[3:])
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = reference_attention(qr, kr, vr, *inputs[3:])
    check = torch.testing.assert_close if dtype == torch.float64 else assert_close_fp32
    check(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, kk, v)), torch.autograd.grad(ref.sum(), (qr, kr, vr))):
        check(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, TOL[torch.float16]), (torch.bfloat16, TOL[torch.bfloat16])],
                         ids=["float16", "bfloat16"])
def test_neighbor_attention_half(backend, dtype, tol):
    """Half inputs: scores and softmax in fp32; error is the rounding of the output (tol relative)."""
    inputs = neighbor_attention_case(40, 16, 8, 2, dtype=dtype, device=backend.device)
    out = nk.neighbor_attention(*inputs)
    assert out.dtype == dtype
    ref = reference_attention(*[t.double() if t.is_floating_point() else t for t in inputs[:5]], *inputs[5:])
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_neighbor_attention_duplicates_no_nan(backend):
    base = ties_free(8, 8)
    x = backend.tensor(torch.cat([base] * 4)).requires_grad_()
    idx = nk.knn(x, 5)
    keep = nk.reciprocal_mask(idx)
    out = nk.neighbor_attention(x, x, x, idx, keep, backend.tensor(torch.tensor([0, 9, 17])), 2)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@fast_and(EMU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("batch", [None, 2])
def test_factored_attention_composes_neighbor_attention(backend, batch, dtype):
    """landmark_factors + sparse_attention is neighbor_attention, values and grads; P, R by definition."""
    backend.skip_dtype(dtype)
    check = torch.testing.assert_close if dtype == torch.float64 else assert_close_fp32
    inputs = neighbor_attention_case(33, 12, 6, 3, batch, dtype=dtype, device=backend.device)
    idx, keep, lm, heads = inputs[3:]
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    P, R = nk.landmark_factors(q, kk, q[..., lm, :], kk[..., lm, :], heads)
    qh, kh = q.unflatten(-1, (heads, 4)), kk.unflatten(-1, (heads, 4))
    check(P, torch.einsum("...nhc,...mhc->...nhm", qh, kh[..., lm, :, :]))
    check(R, torch.einsum("...nhc,...mhc->...nhm", kh, qh[..., lm, :, :]))
    out = nk.sparse_attention(P, R, v, idx, keep, 0.5)
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = nk.neighbor_attention(qr, kr, vr, idx, keep, lm, heads)
    check(out, ref)
    g = grad_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, kk, v), g), torch.autograd.grad(ref, (qr, kr, vr), g)):
        check(a, b)


@pytest.mark.parametrize("keep_mode", ["reciprocal", "subset", "all"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_sparse_attention_values_and_grads(backend, dtype, keep_mode):
    """nk.sparse_attention on (B,N,H,l) factors equals the dense reference, values and P, R, v grads,
    for any keep (outside the reciprocal mask the gather-only backends hand the call to the torch backend)."""
    backend.skip_dtype(dtype)
    check = torch.testing.assert_close if dtype == torch.float64 else assert_close_fp32
    P, R, v, idx, keep, scale = attention_case(2, 50, 2, 5, 9, 16, dtype, keep_mode, device=backend.device)
    args = [t.clone().requires_grad_() for t in (P, R, v)]
    ref_args = [t.clone().requires_grad_() for t in (P, R, v)]
    out = nk.sparse_attention(*args, idx, keep, scale)
    ref = reference.sparse_attention(*ref_args, idx, keep, scale)[0]
    check(out, ref)
    grad = grad_like(out)
    for a, b in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, ref_args, grad)):
        check(a, b)


@pytest.mark.parametrize("n,d,k", [(40, 16, 6), pytest.param(257, 64, 20, marks=fast_only)])
def test_attention_under_autocast(backend, n, d, k):
    """Autocast (bf16 on the CPU, fp16 on CUDA): the landmark factors stay fp32 (the affinity
    overflows half precision) and neighbor_attention equals its fp32 value (v stays fp32)."""
    q, kk, v, idx, keep, lm, heads = neighbor_attention_case(n, d, k, 2, device=backend.device)
    ref = nk.neighbor_attention(q, kk, v, idx, keep, lm, heads)
    with torch.autocast(backend.device, dtype=torch.bfloat16 if backend.device == "cpu" else torch.float16):
        P, R = nk.landmark_factors(q, kk, q[lm], kk[lm], heads)
        out = nk.neighbor_attention(q, kk, v, idx, keep, lm, heads)
    assert P.dtype == R.dtype == torch.float32
    assert_close_fp32(out, ref)


@pytest.mark.backends("reference", "cpu", "cuda")  # plain PyTorch on every backend: per device
def test_landmark_affinity_knn(backend):
    q, kk, _, _, _, lm, heads = neighbor_attention_case(30, 8, 4, 2, batch=2, dtype=torch.float64,
                                                        device=backend.device)
    P, R = nk.landmark_factors(q, kk, q[:, lm], kk[:, lm], heads)
    idx = nk.landmark_affinity_knn(P, R, 7)
    assert torch.equal(idx, nk.affinity_knn(q, kk, lm, heads, 7))
    affinity = torch.einsum("bnhm,bjhm->bnj", P, R)
    affinity.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    assert torch.equal(idx, affinity.topk(7, dim=-1).indices)
    assert torch.equal(nk.landmark_affinity_knn(P[0], R[0], 7), idx[0])


# ----------------------------------------------------------------------------- bad input
def _bad_attention_cases():
    q, kk, v, idx, keep, lm, h = neighbor_attention_case(20, 8, 4, 2)
    return [
        ("num_heads", lambda: nk.neighbor_attention(q, kk, v, idx, keep, lm, 3), ValueError),
        ("landmarks", lambda: nk.neighbor_attention(q, kk, v, idx, keep, torch.tensor([0, 0]), h), ValueError),
        ("landmarks", lambda: nk.neighbor_attention(q, kk, v, idx, keep, torch.tensor([25]), h), ValueError),
        ("landmarks", lambda: nk.neighbor_attention(q, kk, v, idx, keep, lm.float(), h), TypeError),
        ("idx", lambda: nk.neighbor_attention(q, kk, v, idx.int(), keep, lm, h), TypeError),
        ("idx", lambda: nk.neighbor_attention(q, kk, v, idx.clamp(max=0) + 30, keep, lm, h), ValueError),
        ("keep", lambda: nk.neighbor_attention(q, kk, v, idx, keep.int(), lm, h), TypeError),
        ("q", lambda: nk.neighbor_attention(q.long(), kk, v, idx, keep, lm, h), TypeError),
        ("v", lambda: nk.neighbor_attention(q, kk, v.double(), idx, keep, lm, h), TypeError),
        ("q, k, v", lambda: nk.neighbor_attention(q, kk[:10], v, idx, keep, lm, h), ValueError),
        ("k", lambda: nk.neighbor_attention(q, kk * float("nan"), v, idx, keep, lm, h), ValueError),
        ("q", lambda: nk.neighbor_attention(q[None, None], kk, v, idx, keep, lm, h), ValueError),
        ("device", lambda: nk.neighbor_attention(q, kk, v, idx, keep, lm.to("meta"), h), ValueError),
    ]


@pytest.mark.parametrize("case", range(13))
def test_neighbor_attention_bad_input(case):
    name, call, exc = _bad_attention_cases()[case]
    with pytest.raises(exc, match=name.split(",")[0]):
        call()


def _bad_factored_cases():
    q, kk, v, idx, keep, lm, h = neighbor_attention_case(20, 8, 4, 2)
    P, R = nk.landmark_factors(q, kk, q[lm], kk[lm], h)
    return [
        ("num_heads", lambda: nk.landmark_factors(q, kk, q[lm], kk[lm], 0), ValueError),
        ("num_heads", lambda: nk.landmark_factors(q, kk, q[lm], kk[lm], 3), ValueError),
        ("q_landmarks", lambda: nk.landmark_factors(q, kk, q[lm, :4], kk[lm], h), ValueError),
        ("k_landmarks", lambda: nk.landmark_factors(q, kk, q[lm], kk[lm].long(), h), TypeError),
        ("q_landmarks", lambda: nk.landmark_factors(q, kk, q[:0], kk[:0], h), ValueError),
        ("P", lambda: nk.sparse_attention(P[:10], R, v, idx, keep, 0.5), ValueError),
        ("P", lambda: nk.sparse_attention(P[..., 0], R, v, idx, keep, 0.5), ValueError),
        ("R", lambda: nk.sparse_attention(P, R * float("nan"), v, idx, keep, 0.5), ValueError),
        ("scale", lambda: nk.sparse_attention(P, R, v, idx, keep, "0.5"), TypeError),
        ("scale", lambda: nk.sparse_attention(P, R, v, idx, keep, float("inf")), ValueError),
        ("keep", lambda: nk.sparse_attention(P, R, v, idx, keep[:, :3], 0.5), ValueError),
        ("idx", lambda: nk.sparse_attention(P, R, v, idx + 20, keep, 0.5), ValueError),
        ("landmarks", lambda: nk.ops.check_landmarks(torch.tensor([], dtype=torch.long), 20), ValueError),
        ("topk", lambda: nk.landmark_affinity_knn(P, R, 21), ValueError),
    ]


@pytest.mark.parametrize("case", range(14))
def test_factored_attention_bad_input(case):
    name, call, exc = _bad_factored_cases()[case]
    with pytest.raises(exc, match=name):
        call()
