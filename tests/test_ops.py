"""Public ops (nk.knn, nk.reciprocal_mask, nk.neighbor_attention) on every CPU backend vs
independent brute-force definitions and the dense reference."""
import numpy as np
import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import reference
from tests.conftest import assert_close_fp32, cpu_backends, ties_free

BACKENDS = cpu_backends()


def brute_knn(x, k):
    """Cosine top-k by numpy loops: self first, then (similarity desc, index asc)."""
    xn = x.double().numpy()
    xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    out = []
    for i in range(len(xn)):
        sims = xn @ xn[i]
        order = sorted((j for j in range(len(xn)) if j != i), key=lambda j: (-sims[j], j))
        out.append([i] + order[: k - 1])
    return torch.tensor(out)


def brute_reciprocal(idx):
    rows = idx.tolist()
    return torch.tensor([[i in rows[j] for j in row] for i, row in enumerate(rows)])


# ----------------------------------------------------------------------------- knn
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,d,k", [(1, 4, 1), (37, 16, 5), (64, 8, 64), (129, 32, 20)])
def test_knn_matches_brute_force(backend, n, d, k):
    x = ties_free(n, d)
    assert torch.equal(nk.knn(x, k), brute_knn(x, k))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_knn_batched_and_fp64(backend):
    x = ties_free(50, 12, batch=3, dtype=torch.float64)
    idx = nk.knn(x, 7)
    assert idx.shape == (3, 50, 7) and idx.dtype == torch.int64
    for b in range(3):
        assert torch.equal(idx[b], brute_knn(x[b], 7))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_half_precision(backend, dtype):
    """Half inputs accumulate in fp32: the neighbour sets of the rounded features, up to near-ties."""
    x = ties_free(200, 64).to(dtype)
    idx = nk.knn(x, 10)
    ref = brute_knn(x.float(), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), ref.tolist())])
    assert overlap >= 0.99
    assert torch.equal(idx[:, 0], torch.arange(200))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_knn_duplicates_and_zero_rows(backend):
    """Exact ties: self stays first, neighbours are distinct, similarities match the reference."""
    base = ties_free(10, 8)
    x = torch.cat([base, base, base[:3], torch.zeros(2, 8)])  # 3 copies of some rows, 2 zero rows
    k = 6
    idx = nk.knn(x, k)
    assert torch.equal(idx[:, 0], torch.arange(len(x)))
    assert all(len(set(row)) == k for row in idx.tolist())
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = torch.gather(xn @ xn.T, 1, idx)
    ref_sims = torch.gather(xn @ xn.T, 1, reference.knn(xn.unsqueeze(0), k)[0])
    torch.testing.assert_close(sims[:, 1:], ref_sims[:, 1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_knn_dot_metric(backend):
    x = ties_free(40, 8) * torch.linspace(0.5, 3, 40).unsqueeze(1)
    idx = nk.knn(x, 4, metric="dot")
    sims = x.double() @ x.double().T
    sims.fill_diagonal_(float("inf"))
    assert torch.equal(idx, torch.sort(-sims, dim=1, stable=True).indices[:, :4])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_knn_query_isolation(backend):
    x = ties_free(60, 16)
    query = torch.zeros(60, dtype=torch.bool)
    query[:15] = True
    idx = nk.knn(x, 8, query_mask=query)
    plain = nk.knn(x, 8)
    assert torch.equal(idx[15:], plain[15:])
    assert torch.equal(idx[:15, 0], torch.arange(15))
    assert not query[idx[:15, 1:]].any()
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    for i in range(15):  # gallery-only neighbours of each query, recomputed by hand
        sims = xn[15:] @ xn[i]
        assert idx[i, 1:].tolist() == (15 + torch.sort(-sims, stable=True).indices[:7]).tolist()


# ----------------------------------------------------------------------------- reciprocal
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_reciprocal_mask(backend):
    x = ties_free(45, 6, batch=2)
    idx = nk.knn(x, 9)
    keep = nk.reciprocal_mask(idx)
    assert keep.dtype == torch.bool and keep.shape == idx.shape
    for b in range(2):
        assert torch.equal(keep[b], brute_reciprocal(idx[b]))
    assert keep[..., 0].all()  # self is always its own reciprocal neighbour


def test_reverse_index_reference_definition():
    idx = nk.knn(ties_free(30, 5), 6).unsqueeze(0)
    keep = reference.reciprocal_mask(idx)
    rev = reference.reverse_index(idx, keep)
    for j in range(30):
        for tp in range(6):
            i = idx[0, j, tp].item()
            t = rev[0, j, tp].item()
            if t >= 0:
                assert idx[0, i, t] == j and keep[0, i, t]
            else:
                assert not any(idx[0, i, s] == j and keep[0, i, s] for s in range(6))
    assert int((rev >= 0).sum()) == int(keep.sum())


# ----------------------------------------------------------------------------- attention
def attention_inputs(n=37, d=16, k=5, heads=2, batch=None, dtype=torch.float32, n_land=5, seed=0, keep_all=False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    q, kk, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    idx = nk.knn(q.float(), k)
    keep = torch.ones_like(idx, dtype=torch.bool) if keep_all else nk.reciprocal_mask(idx)
    landmarks = torch.randperm(n, generator=g)[:n_land]
    return q, kk, v, idx, keep, landmarks, heads


def reference_attention(q, k, v, idx, keep, landmarks, heads):
    batched = q.dim() == 3
    args = [t if batched else t.unsqueeze(0) for t in (q, k, v, idx, keep)]
    out = reference.neighbor_attention(*args, landmarks, heads)
    return out if batched else out[0]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,d,k,heads,batch,n_land", [
    (37, 16, 5, 1, None, 5), (37, 16, 5, 2, None, 1), (64, 12, 20, 3, 3, 5), (1, 8, 1, 2, None, 1), (50, 32, 50, 2, 2, 4)])
def test_neighbor_attention_values_and_grads(backend, n, d, k, heads, batch, n_land):
    inputs = attention_inputs(n, d, k, heads, batch, n_land=n_land)
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    out = nk.neighbor_attention(q, kk, v, *inputs[3:])
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = reference_attention(qr, kr, vr, *inputs[3:])
    assert_close_fp32(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kk, v), g)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), g)
    for a, b in zip(grads, ref_grads):
        assert_close_fp32(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_neighbor_attention_gradcheck_fp64(backend):
    q, kk, v, idx, keep, landmarks, heads = attention_inputs(13, 6, 4, 2, dtype=torch.float64, n_land=3)
    fn = lambda a, b, c: nk.neighbor_attention(a, b, c, idx, keep, landmarks, heads)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, kk, v)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_neighbor_attention_non_reciprocal_keep(backend):
    """keep beyond the reciprocal mask (plain top-k attention) is still exact, values and grads."""
    inputs = attention_inputs(30, 8, 6, 2, keep_all=True, dtype=torch.float64)
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    out = nk.neighbor_attention(q, kk, v, *inputs[3:])
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = reference_attention(qr, kr, vr, *inputs[3:])
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, kk, v)), torch.autograd.grad(ref.sum(), (qr, kr, vr))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_neighbor_attention_half(backend, dtype, tol):
    """Half inputs: scores and softmax in fp32; error is the rounding of the output (tol relative)."""
    inputs = attention_inputs(40, 16, 8, 2, dtype=dtype)
    out = nk.neighbor_attention(*inputs)
    assert out.dtype == dtype
    ref = reference_attention(*[t.double() if t.is_floating_point() else t for t in inputs[:5]], *inputs[5:])
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_neighbor_attention_duplicates_no_nan(backend):
    base = ties_free(8, 8)
    x = torch.cat([base] * 4).requires_grad_()
    idx = nk.knn(x, 5)
    keep = nk.reciprocal_mask(idx)
    out = nk.neighbor_attention(x, x, x, idx, keep, torch.tensor([0, 9, 17]), 2)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("batch", [None, 2])
def test_factored_attention_composes_neighbor_attention(backend, batch):
    """landmark_factors + sparse_attention is neighbor_attention, values and grads; P, R by definition."""
    inputs = attention_inputs(33, 12, 6, 3, batch, dtype=torch.float64)
    idx, keep, lm, heads = inputs[3:]
    q, kk, v = (t.clone().requires_grad_() for t in inputs[:3])
    P, R = nk.landmark_factors(q, kk, q[..., lm, :], kk[..., lm, :], heads)
    qh, kh = q.unflatten(-1, (heads, 4)), kk.unflatten(-1, (heads, 4))
    torch.testing.assert_close(P, torch.einsum("...nhc,...mhc->...nhm", qh, kh[..., lm, :, :]))
    torch.testing.assert_close(R, torch.einsum("...nhc,...mhc->...nhm", kh, qh[..., lm, :, :]))
    out = nk.sparse_attention(P, R, v, idx, keep, 0.5)
    qr, kr, vr = (t.clone().requires_grad_() for t in inputs[:3])
    ref = nk.neighbor_attention(qr, kr, vr, idx, keep, lm, heads)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, kk, v), g), torch.autograd.grad(ref, (qr, kr, vr), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_attention_under_autocast(backend):
    """bf16 autocast: the landmark factors stay fp32 (the affinity overflows half precision) and
    neighbor_attention equals its fp32 value up to the bf16 rounding of v's dtype (here fp32)."""
    q, kk, v, idx, keep, lm, heads = attention_inputs(40, 16, 6, 2)
    ref = nk.neighbor_attention(q, kk, v, idx, keep, lm, heads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P, R = nk.landmark_factors(q, kk, q[lm], kk[lm], heads)
        out = nk.neighbor_attention(q, kk, v, idx, keep, lm, heads)
    assert P.dtype == R.dtype == torch.float32
    assert_close_fp32(out, ref)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_landmark_affinity_knn(backend):
    q, kk, _, _, _, lm, heads = attention_inputs(30, 8, 4, 2, batch=2, dtype=torch.float64)
    P, R = nk.landmark_factors(q, kk, q[:, lm], kk[:, lm], heads)
    idx = nk.landmark_affinity_knn(P, R, 7)
    assert torch.equal(idx, nk.affinity_knn(q, kk, lm, heads, 7))
    affinity = torch.einsum("bnhm,bjhm->bnj", P, R)
    affinity.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    assert torch.equal(idx, affinity.topk(7, dim=-1).indices)
    assert torch.equal(nk.landmark_affinity_knn(P[0], R[0], 7), idx[0])


# ----------------------------------------------------------------------------- bad input
def _bad_attention_cases():
    q, kk, v, idx, keep, lm, h = attention_inputs(20, 8, 4, 2)
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
    q, kk, v, idx, keep, lm, h = attention_inputs(20, 8, 4, 2)
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


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: nk.knn(x, 0), ValueError, "k must"),
    (lambda x: nk.knn(x, 21), ValueError, "k must"),
    (lambda x: nk.knn(x, 2.0), TypeError, "k must"),
    (lambda x: nk.knn(x.long(), 2), TypeError, "x must"),
    (lambda x: nk.knn(x[0], 1), ValueError, "x must"),
    (lambda x: nk.knn(x * float("inf"), 2), ValueError, "x contains"),
    (lambda x: nk.knn(x, 2, metric="l2"), ValueError, "metric"),
    (lambda x: nk.reciprocal_mask(torch.tensor([[0, 1], [1, 1]])), ValueError, "idx repeats"),
    (lambda x: nk.reciprocal_mask(torch.tensor([[0, 5], [1, 0]])), ValueError, "idx has entries"),
    (lambda x: nk.reciprocal_mask(torch.zeros(2, 3, dtype=torch.long)), ValueError, "idx has 3"),
    (lambda x: nk.set_backend("gpu"), ValueError, "backend"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(ties_free(20, 4))


def test_forced_backend_unavailable_is_an_error():
    with nk.use_backend("cuda"), pytest.raises(RuntimeError, match="'cuda' is not available for cpu tensors"):
        nk.knn(ties_free(10, 4), 2)


def test_automatic_backend_on_cpu():
    assert nk.get_backend("cpu") == ("cpu" if nk.extension_available() else "reference")
