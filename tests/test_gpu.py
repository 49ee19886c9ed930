"""GPU backends ("cuda": csrc/cuda via torch.ops.nformer.*, "triton": torch.ops.nformer.*_triton) against
the dense reference, plus the public API and NFormer on those backends.

Every test skips with a reason without a CUDA GPU, and per backend without the compiled CUDA
extension / a usable triton. Inputs are ties-free unless a test is about ties.
Tolerances (relative to s = max(1, max|ref|)):
  knn          similarities of the returned neighbours equal the true top-k similarities to 3e-5
               (fp64 from the input values; fp32 accumulation), self first, ids distinct; exact ids
               where ties are exact (smaller index first).
  attention    fp32/fp64 outputs 1e-4*s (fp64: 1e-10*s); fp16 outputs 2e-3*s, bf16 1.6e-2*s (one
               rounding of the output); probs, dP, dR are fp32 for every input dtype: 1e-4*s
               (1e-3*s when v is fp16/bf16, whose products are accumulated in another order).
"""
import math
import time

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import reference
from nformer_kernels._extension import extension_has_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the cuda/triton backends only run on one")]
DEV = "cuda"
HALF_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _triton_unavailable():
    try:
        from nformer_kernels import triton as nf_triton
    except ImportError as exc:
        return f"nformer_kernels.triton cannot be imported ({exc})"
    return None if nf_triton.available else f"triton backend unavailable: {nf_triton.reason}"


BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(
        not extension_has_cuda(), reason="extension built without CUDA (needs a CUDA toolkit at build time)")),
    pytest.param("triton", marks=pytest.mark.skipif(_triton_unavailable() is not None,
                                                    reason=str(_triton_unavailable()))),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def op(backend, name):
    """The batched op `name` of a backend (same contract: csrc/ops.cpp)."""
    return getattr(torch.ops.nformer, name if backend == "cuda" else f"{name}_triton")


def skip_fp64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend rejects float64 by design")


def tol(dtype, ref):
    return HALF_TOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)


def assert_close(actual, expected, rel):
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rel * scale)


def unit_rows(shape, dtype, seed=0):
    """Random L2-normalised rows (ties-free), made on the GPU, then cast."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


# ----------------------------------------------------------------------------- knn
def assert_knn(x, idx, k, atol=3e-5, rows=None, chunk=1 << 18):
    """Self first, distinct ids, and the similarities of idx[...,1:] equal the true top-(k-1)
    (fp64 from x's values) on `rows` (default all). O(|rows| * N) memory per chunk."""
    B, N, _ = x.shape
    assert idx.shape == (B, N, k) and idx.dtype == torch.int64 and idx.device == x.device
    assert torch.equal(idx[..., 0], torch.arange(N, device=DEV).expand(B, N)), "self must come first"
    assert bool(((idx >= 0) & (idx < N)).all())
    srt = idx.sort(dim=-1).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any()), "repeated neighbour"
    rows = torch.arange(N, device=DEV) if rows is None else rows
    for b in range(B):
        q = x[b, rows].double()
        sim = torch.cat([q @ x[b, c:c + chunk].double().T for c in range(0, N, chunk)], dim=1)
        sim[torch.arange(len(rows), device=DEV), rows] = float("inf")
        want = sim.topk(k, dim=1).values[:, 1:]
        got = torch.gather(sim, 1, idx[b, rows])[:, 1:]
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("B,N,d,k", [(1, 1, 4, 1), (1, 37, 16, 5), (3, 37, 16, 37), (2, 1031, 64, 20),
                                     (1, 300, 200, 64), (3, 517, 13, 7)])
def test_knn(backend, dtype, B, N, d, k):
    skip_fp64(backend, dtype)
    x = unit_rows((B, N, d), dtype)
    assert_knn(x, op(backend, "knn")(x, k), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N", [(1, 17003), (3, 6001)])
def test_knn_many_rows_per_block(backend, dtype, B, N):
    """Sizes where the CUDA fp16/bf16 kernel switches to its 128-row blocks (checked on sampled rows)."""
    x = unit_rows((B, N, 64), dtype, seed=1)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:300].to(DEV)
    assert_knn(x, op(backend, "knn")(x, 20), 20, rows=rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_exact_ties_smaller_index_first(backend, dtype):
    """Duplicate rows and zero rows: exact ties resolve to the smaller index, self stays first."""
    g = torch.Generator().manual_seed(3)
    base = torch.nn.functional.normalize(torch.randn(6, 32, generator=g, dtype=torch.float64), dim=1).to(dtype)
    group = torch.randint(0, 7, (203,), generator=g)  # group 6: zero rows
    x = torch.cat([base, torch.zeros(1, 32, dtype=dtype)])[group]
    # Similarities per pair of groups, so copies tie exactly here (a BLAS may round copies differently).
    base_sim = torch.zeros(7, 7, dtype=torch.float64)
    base_sim[:6, :6] = base.double() @ base.double().T
    sim = base_sim[group][:, group]
    for row in base_sim[:6]:
        distinct = row.unique()
        assert (distinct[1:] - distinct[:-1]).min() > 1e-3, "test data must only tie exactly"
    sim.fill_diagonal_(float("inf"))
    k = 40  # crosses the boundary between groups of duplicates
    want = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    got = op(backend, "knn")(x.to(DEV).unsqueeze(0), k)[0].cpu()
    assert torch.equal(got, want)


def test_knn_cuda_large_k_and_errors():
    if not extension_has_cuda():
        pytest.skip("extension built without CUDA")
    knn = torch.ops.nformer.knn
    x = unit_rows((1, 300, 24), torch.float32)
    assert_knn(x, knn(x, 100), 100)  # beyond the public API's GPU limit: the kernel itself supports it
    with pytest.raises(RuntimeError, match="largest k"):
        knn(unit_rows((1, 5000, 8), torch.float16), 5000)
    with pytest.raises(RuntimeError, match="contiguous"):
        knn(unit_rows((1, 40, 8), torch.float32).transpose(1, 2), 3)
    with pytest.raises(RuntimeError, match="k must be"):
        knn(x, 301)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_one_million_rows_bf16(backend):
    """N = 1,000,000, d = 256, k = 20 in bf16, against chunked fp64 mm + topk on 256 sampled rows."""
    x = unit_rows((1, 1_000_000, 256), torch.bfloat16, seed=2)
    idx = op(backend, "knn")(x, 20)
    torch.cuda.synchronize()
    rows = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(1))[:256].to(DEV)
    assert_knn(x, idx, 20, rows=rows, atol=1e-4)


def test_knn_cuda_uses_current_stream():
    if not extension_has_cuda():
        pytest.skip("extension built without CUDA")
    x = unit_rows((2, 700, 32), torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        idx = torch.ops.nformer.knn(x, 9)
        keep = torch.ops.nformer.reciprocal_mask(idx)
    stream.synchronize()
    assert_knn(x, idx, 9)
    assert torch.equal(keep, reference.reciprocal_mask(idx))


# ----------------------------------------------------------------------------- reciprocal
def random_neighbours(B, N, k, seed=0):
    """Distinct neighbours per row, self first, otherwise random (few reciprocal pairs)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.stack([torch.randperm(N - 1, generator=g)[:k - 1] + 1 for _ in range(B * N)]).view(B, N, k - 1)
    rows = torch.arange(N).view(1, N, 1)
    return torch.cat([rows.expand(B, N, 1), (rows + offsets) % N], dim=2).to(DEV)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,k,source", [(1, 1, 1, "knn"), (3, 37, 5, "knn"), (2, 1031, 20, "knn"),
                                          (3, 37, 37, "knn"), (2, 200, 9, "random"), (1, 64, 64, "random")])
def test_reciprocal_mask_and_reverse_index(backend, B, N, k, source):
    if source == "knn":
        idx = reference.knn(unit_rows((B, N, 16), torch.float32), k)
    else:
        idx = random_neighbours(B, N, k)
    keep = op(backend, "reciprocal_mask")(idx)
    assert keep.dtype == torch.bool and torch.equal(keep, reference.reciprocal_mask(idx))
    sub = keep & (torch.rand(keep.shape, generator=torch.Generator(device=DEV).manual_seed(0), device=DEV) < 0.7)
    for kp in (keep, sub):
        rev = op(backend, "reverse_index")(idx, kp)
        assert rev.dtype == torch.int64 and torch.equal(rev, reference.reverse_index(idx, kp))


# ----------------------------------------------------------------------------- attention
def attention_case(B, N, H, l, k, dv, dtype, keep_mode="reciprocal", seed=0):
    """P, R (acc dtype), v, idx from knn of random features, keep (reciprocal, a subset of it, or all)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator(device=DEV).manual_seed(seed)
    P = torch.randn(B, N, H, l, generator=g, device=DEV, dtype=acc)
    R = torch.randn(B, N, H, l, generator=g, device=DEV, dtype=acc)
    v = torch.randn(B, N, H * dv, generator=g, device=DEV).to(dtype)
    idx = reference.knn(torch.randn(B, N, 8, generator=g, device=DEV), k)
    keep = reference.reciprocal_mask(idx)
    if keep_mode == "subset":
        keep &= torch.rand(keep.shape, generator=g, device=DEV) < 0.7
        keep[:, : N // 4] = False  # rows with nothing kept: zeros, never NaN
    elif keep_mode == "all":
        keep = torch.ones_like(keep)
    return P, R, v, idx, keep, 1.0 / math.sqrt(8)


ATTN_SHAPES = [  # B, N, H, l, k, dv
    (1, 1, 1, 1, 1, 8), (3, 37, 2, 5, 7, 16), (1, 1031, 2, 5, 20, 128), (2, 129, 1, 3, 37, 5), (1, 100, 4, 2, 64, 24)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}N{}H{}l{}k{}dv{}".format(*s))
@pytest.mark.parametrize("keep_mode", ["reciprocal", "subset", "all"])
def test_sparse_attention_forward(backend, dtype, shape, keep_mode):
    skip_fp64(backend, dtype)
    P, R, v, idx, keep, scale = attention_case(*shape, dtype, keep_mode)
    out, probs = op(backend, "sparse_attention")(P, R, v, idx, keep, scale)
    ref_out, ref_probs = reference.sparse_attention(P, R, v, idx, keep, scale)
    assert out.dtype == v.dtype and probs.dtype == P.dtype and probs.shape == idx.shape[:2] + (shape[2], shape[4])
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert_close(out, ref_out, HALF_TOL[dtype])
    assert_close(probs, ref_probs, 1e-10 if dtype == torch.float64 else 1e-4)
    assert bool((probs[~keep.unsqueeze(2).expand_as(probs)] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}N{}H{}l{}k{}dv{}".format(*s))
@pytest.mark.parametrize("keep_mode", ["reciprocal", "subset"])
def test_sparse_attention_backward(backend, dtype, shape, keep_mode):
    """Against autograd through reference.sparse_attention (keep within the reciprocal mask)."""
    skip_fp64(backend, dtype)
    P, R, v, idx, keep, scale = attention_case(*shape, dtype, keep_mode, seed=1)
    grad_out = torch.randn(v.shape, generator=torch.Generator(device=DEV).manual_seed(5), device=DEV).to(dtype)
    Pr, Rr, vr = (t.clone().requires_grad_() for t in (P, R, v))
    ref_out = reference.sparse_attention(Pr, Rr, vr, idx, keep, scale)[0]
    ref_dP, ref_dR, ref_dv = torch.autograd.grad(ref_out, (Pr, Rr, vr), grad_out)

    _, probs = op(backend, "sparse_attention")(P, R, v, idx, keep, scale)
    rev = op(backend, "reverse_index")(idx, keep)
    dP, dR, dv = op(backend, "sparse_attention_backward")(grad_out, P, R, v, idx, rev, probs, scale)
    assert dP.dtype == P.dtype and dR.dtype == R.dtype and dv.dtype == v.dtype
    acc_rel = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-3)
    assert_close(dP, ref_dP, acc_rel)
    assert_close(dR, ref_dR, acc_rel)
    assert_close(dv, ref_dv, HALF_TOL[dtype])


def test_sparse_attention_cuda_errors():
    if not extension_has_cuda():
        pytest.skip("extension built without CUDA")
    P, R, v, idx, keep, scale = attention_case(1, 20, 2, 3, 4, 8, torch.float32)
    fwd = torch.ops.nformer.sparse_attention
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        fwd(P, R, v, idx.cpu(), keep, scale)
    with pytest.raises(RuntimeError, match="P must be"):
        fwd(P.double(), R, v, idx, keep, scale)
    with pytest.raises(RuntimeError, match="v must be"):
        fwd(P, R, v[..., :7].contiguous(), idx, keep, scale)
    with pytest.raises(RuntimeError, match="keep"):
        fwd(P, R, v, idx, keep[..., :3].contiguous(), scale)


def gathered_attention(P, R, v, idx, keep, scale):
    """O(N*k*d) plain-PyTorch sparse attention (autograd scatters): the reference at sizes where the
    dense one cannot run; itself checked against reference.sparse_attention below."""
    B, N, H, _ = P.shape
    dv = v.shape[-1] // H
    bidx = torch.arange(B, device=P.device).view(B, 1, 1)
    s = scale * torch.einsum("bnhl,bnkhl->bnhk", P, R[bidx, idx])
    probs = torch.softmax(s.masked_fill(~keep.unsqueeze(2), float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bnhk,bnkhc->bnhc", probs, v.to(P.dtype)[bidx, idx].view(B, N, -1, H, dv))
    return out.reshape(B, N, H * dv).to(v.dtype), probs


def test_gathered_attention_matches_dense_reference():
    P, R, v, idx, keep, scale = attention_case(2, 50, 2, 5, 9, 16, torch.float64, "subset")
    args = [t.clone().requires_grad_() for t in (P, R, v)]
    ref_args = [t.clone().requires_grad_() for t in (P, R, v)]
    out = gathered_attention(*args, idx, keep, scale)[0]
    ref = reference.sparse_attention(*ref_args, idx, keep, scale)[0]
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, ref_args, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_pipeline_bf16(backend):
    """B*N = 2 x 65,536, d = 256 (H=2, dv=128), k = 20, bf16: knn -> reciprocal -> reverse -> attention
    forward and backward, against the gathered reference (forward checked on every row)."""
    B, N, H, l, k, dv = 2, 65_536, 2, 5, 20, 128
    x = unit_rows((B, N, 64), torch.bfloat16, seed=4)
    idx = op(backend, "knn")(x, k)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:200].to(DEV)
    assert_knn(x, idx, k, rows=rows)
    keep = op(backend, "reciprocal_mask")(idx)
    sample = idx[:, rows]  # keep[b,i,t] = i in idx[b, idx[b,i,t]] on the sampled rows
    want = (idx[torch.arange(B, device=DEV).view(B, 1, 1), sample] == rows.view(1, -1, 1, 1)).any(-1)
    assert torch.equal(keep[:, rows], want)
    rev = op(backend, "reverse_index")(idx, keep)
    assert int((rev >= 0).sum()) == int(keep.sum())

    g = torch.Generator(device=DEV).manual_seed(3)
    P, R = (torch.randn(B, N, H, l, generator=g, device=DEV) for _ in range(2))
    v = torch.randn(B, N, H * dv, generator=g, device=DEV).to(torch.bfloat16)
    grad_out = torch.randn(v.shape, generator=g, device=DEV).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(128)
    out, probs = op(backend, "sparse_attention")(P, R, v, idx, keep, scale)
    dP, dR, dv_ = op(backend, "sparse_attention_backward")(grad_out, P, R, v, idx, rev, probs, scale)
    Pr, Rr, vr = (t.clone().requires_grad_() for t in (P, R, v))
    ref_out, ref_probs = gathered_attention(Pr, Rr, vr, idx, keep, scale)
    ref_dP, ref_dR, ref_dv = torch.autograd.grad(ref_out, (Pr, Rr, vr), grad_out)
    assert_close(out, ref_out, HALF_TOL[torch.bfloat16])
    assert_close(probs, ref_probs, 1e-4)
    assert_close(dP, ref_dP, 1e-3)
    assert_close(dR, ref_dR, 1e-3)
    assert_close(dv_, ref_dv, HALF_TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- public API
@pytest.fixture
def api_backend(request):
    """Forces the backend under test for nformer_kernels' public API; compare via `on_reference`."""
    nk.set_backend(request.param)
    yield request.param
    nk.set_backend(None)


def on_reference(fn, *args, **kwargs):
    """Runs fn with the dense reference backend, then restores the backend under test."""
    with nk.use_backend("reference"):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape,k", [((1031, 64), 20), ((3, 37, 16), 37), ((1, 8), 1)])
def test_api_knn_and_reciprocal(api_backend, shape, k):
    x = torch.randn(shape, generator=torch.Generator(device=DEV).manual_seed(0), device=DEV)
    assert nk.get_backend(x.device) == api_backend
    idx = nk.knn(x, k)
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert_knn(xn if xn.dim() == 3 else xn[None], idx if idx.dim() == 3 else idx[None], k)
    keep = nk.reciprocal_mask(idx)
    assert torch.equal(keep, on_reference(nk.reciprocal_mask, idx))


@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [None, 3])
def test_api_neighbor_attention(api_backend, dtype, batch):
    n, d, heads = 257, 64, 2
    g = torch.Generator(device=DEV).manual_seed(1)
    shape = (n, d) if batch is None else (batch, n, d)
    q, k, v = (torch.randn(shape, generator=g, device=DEV).to(dtype) for _ in range(3))
    idx = on_reference(nk.knn, q.float(), 20)
    keep = nk.reciprocal_mask(idx)
    landmarks = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:5].to(DEV)
    grad = torch.randn(shape, generator=g, device=DEV).to(dtype)
    results = []
    for run in (lambda f, *a: f(*a), on_reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = run(nk.neighbor_attention, *leaves, idx, keep, landmarks, heads)
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == dtype
    assert_close(out, ref, HALF_TOL[dtype])
    for a, b in zip(grads, ref_grads):  # q, k grads go through P, R (fp32) and the cast back to dtype
        assert_close(a, b, HALF_TOL[dtype])


@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
def test_api_nformer_forward_and_backward(api_backend):
    """NFormer (eval features and a training step's gradients) equals the reference backend."""
    n, dim, depth = 300, 64, 2
    torch.manual_seed(0)
    model = nk.NFormer(dim=dim, depth=depth, num_heads=2, num_landmarks=5, topk=10, dropout=0.0,
                       num_classes=7).to(DEV)
    x = torch.randn(n, dim, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    landmarks = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:5]
                             for i in range(depth)]).to(DEV)
    model.eval()
    feat = model(x, landmarks=landmarks)
    ref_feat = on_reference(model, x, landmarks=landmarks)
    assert feat.shape == x.shape
    assert_close(feat, ref_feat, 1e-4)

    model.train()
    grads = []
    for run in (lambda f, *a, **kw: f(*a, **kw), on_reference):
        model.zero_grad()
        logits, _ = run(model, x, landmarks=landmarks)
        run(lambda: logits.logsumexp(-1).sum().backward())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        assert_close(a, b, 1e-4)


@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_api_nformer_inference_chunks(api_backend, dtype):
    """Eval without autograd (row chunks) equals the one-pass forward, fp32 and half."""
    n, dim = 1000, 64
    model = nk.NFormer(dim=dim, depth=2, topk=10, inference_chunk_rows=96).to(device=DEV, dtype=dtype).eval()
    x = torch.randn(n, dim, generator=torch.Generator(device=DEV).manual_seed(2), device=DEV).to(dtype)
    landmarks = torch.stack([torch.arange(5), torch.arange(500, 505)]).to(DEV)
    one_pass = model(x, landmarks=landmarks).detach()  # parameters require grad: one pass
    with torch.inference_mode():
        chunked = model(x, landmarks=landmarks)
    assert chunked.dtype == dtype
    assert_close(chunked, one_pass, HALF_TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
def test_api_nformer_one_million_rows_bf16_memory(api_backend):
    """Issue goal: the 4-block eval forward at N = 1,000,000 (d = 256, bf16) peaks under 8 GiB."""
    n = 1_000_000
    model = nk.NFormer(dim=256, depth=4, topk=20).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(n, 256, generator=torch.Generator(device=DEV).manual_seed(3), device=DEV).to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    print(f"N={n} bf16 eval on {api_backend}: {seconds:.2f} s (first call, compiles included), "
          f"peak {peak / 2**30:.2f} GiB")
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert peak < 8 * 2**30, f"peak {peak / 2**30:.2f} GiB"


@pytest.mark.parametrize("api_backend", BACKENDS, indirect=True)
def test_api_attention_under_autocast(api_backend):
    """fp16 autocast: landmark factors stay fp32 and the attention equals its fp32 value."""
    n, d, heads = 257, 64, 2
    g = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = (torch.randn(n, d, generator=g, device=DEV) for _ in range(3))
    idx = on_reference(nk.knn, q, 20)
    keep = nk.reciprocal_mask(idx)
    landmarks = torch.arange(5, device=DEV)
    ref = nk.neighbor_attention(q, k, v, idx, keep, landmarks, heads)
    with torch.autocast("cuda", dtype=torch.float16):
        P, R = nk.landmark_factors(q, k, q[landmarks], k[landmarks], heads)
        out = nk.neighbor_attention(q, k, v, idx, keep, landmarks, heads)
    assert P.dtype == R.dtype == torch.float32
    assert_close(out, ref, HALF_TOL[torch.float32])
