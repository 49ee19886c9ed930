"""CPU (C++/OpenMP) kernels of the `nformer` op library against nformer_kernels.reference.

Calls torch.ops.nformer.* directly (the batched (B,N,...) kernel contract), so the public
wrappers' validation is not in the way. Tolerances: fp32 and fp64 `1e-4 * max(1, max|ref|)`
(the reference computes in fp32 even for fp64); fp16 `2e-3 * max(1, max|ref|)` and bf16
`1.6e-2 * max(1, max|ref|)` on outputs stored in that dtype (both sides accumulate in fp32 and
round once, so they differ by at most about one unit in the last place).
"""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nformer_kernels
from nformer_kernels import reference

pytestmark = pytest.mark.skipif(not nformer_kernels.extension_available(),
                                reason="the compiled extension nformer_kernels._C is not built")

ops = torch.ops.nformer
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tol(dtype):
    return HALF_TOL.get(dtype, 1e-4)


def assert_close(actual, expected, dtype):
    expected = expected.to(actual.dtype)
    bound = tol(dtype) * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def normalized(b, n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g, dtype=torch.float64), dim=-1)
    return x.to(dtype)


@functools.lru_cache(maxsize=None)
def ties_free(b, n, d, k, seed=0, gap=1e-6):
    """Normalised features whose top-k similarities (and the (k+1)-th) are >= gap apart."""
    for s in range(seed, seed + 100):
        x = normalized(b, n, d, s)
        sim = torch.bmm(x.double(), x.double().transpose(1, 2))
        sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        top = sim.topk(min(k + 1, n), dim=-1).values[..., 1:]
        if top.shape[-1] < 2 or (top[..., :-1] - top[..., 1:]).min() > gap:
            return x
    raise AssertionError("no ties-free draw found")


def neighbour_sims(x, idx):
    """fp64 similarity of each row to each of its listed neighbours."""
    xd = x.double()
    return torch.einsum("bnd,bnkd->bnk", xd, xd[torch.arange(x.shape[0])[:, None, None], idx])


def knn_graph(b, n, k, seed=0):
    return reference.knn(normalized(b, n, 8, seed), k)


# ---------------------------------------------------------------- knn

@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 1), (37, 5), (37, 37), (300, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_matches_reference_exactly(b, n, k, dtype):
    x = ties_free(b, n, 8, k).to(dtype)  # cached: never modified
    assert torch.equal(ops.knn(x, k), reference.knn(x, k))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("b,n", [(2, 700), (1, 2100)])  # several tiles; 2100 with 2 threads: odd block count
def test_knn_multi_tile_schedules(threads, b, n):
    x = ties_free(b, n, 8, 10)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.knn(x, 10)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, reference.knn(x, 10))


def test_knn_k_equals_n_multi_tile():
    x = normalized(2, 600, 8, 7)
    idx = ops.knn(x, 600)
    assert torch.equal(idx.sort(-1).values, torch.arange(600).expand(2, 600, 600))
    assert torch.equal(idx[..., 0], torch.arange(600).expand(2, 600))
    sims = neighbour_sims(x, idx)[..., 1:]
    assert (sims[..., :-1] - sims[..., 1:]).min() > -1e-6
    torch.testing.assert_close(sims, neighbour_sims(x, reference.knn(x, 600))[..., 1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_knn_half_dtypes(dtype):
    x = normalized(3, 90, 16, 1, dtype)
    idx, ref = ops.knn(x, 9), reference.knn(x, 9)
    assert idx.dtype == torch.int64 and idx.shape == (3, 90, 9)
    assert torch.equal(idx[..., 0], torch.arange(90).expand(3, 90))
    torch.testing.assert_close(neighbour_sims(x, idx), neighbour_sims(x, ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,k", [(40, 7), (40, 40)])
def test_knn_duplicate_features(n, k):
    base = normalized(2, 10, 6, 2)
    x = base.repeat_interleave(4, dim=1)[:, :n].contiguous()  # every vector 4 times
    idx, ref = ops.knn(x, k), reference.knn(x, k)
    assert torch.equal(idx[..., 0], torch.arange(n).expand(2, n))
    assert all(row.unique().numel() == k for row in idx.reshape(-1, k))
    sims = neighbour_sims(x, idx)
    assert not sims.isnan().any()
    torch.testing.assert_close(sims, neighbour_sims(x, ref), rtol=0, atol=1e-6)
    # The three copies of each vector are its best non-self neighbours.
    if k >= 4:
        assert (sims[..., 1:4] > 1 - 1e-6).all()


def test_knn_input_that_requires_grad():
    x = ties_free(1, 700, 8, 5).clone().requires_grad_()
    assert torch.equal(ops.knn(x, 5), reference.knn(x.detach(), 5))


def test_knn_all_identical_rows():
    x = normalized(1, 1, 5, 3).expand(1, 50, 5).contiguous()
    idx = ops.knn(x, 6)
    assert torch.equal(idx[..., 0], torch.arange(50)[None])
    assert all(row.unique().numel() == 6 for row in idx[0])


def test_knn_rejects_bad_calls():
    x = normalized(1, 10, 4, 0)
    with pytest.raises(RuntimeError, match="k"):
        ops.knn(x, 11)
    with pytest.raises(RuntimeError, match="k"):
        ops.knn(x, 0)
    with pytest.raises(RuntimeError, match="float"):
        ops.knn(x.to(torch.int32), 3)
    with pytest.raises(RuntimeError, match=r"\(B,N,d\)"):
        ops.knn(x[0], 3)
    bad = x.clone()
    bad[0, 3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.knn(bad, 3)


def test_knn_memory_is_not_quadratic():
    """N = 20,000: an N x N fp32 matrix would be 1.6 GB; the kernel must stay far below."""
    script = textwrap.dedent("""
        import resource, torch, nformer_kernels
        x = torch.nn.functional.normalize(torch.randn(1, 20000, 32), dim=-1)
        torch.ops.nformer.knn(x[:, :600].contiguous(), 20)  # warm up BLAS / thread pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = torch.ops.nformer.knn(x, 20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert idx.shape == (1, 20000, 20)
        print((after - before) / 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(nformer_kernels.__file__)), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    growth_mb = float(res.stdout.strip().splitlines()[-1])
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


# ---------------------------------------------------------------- reciprocal_mask / reverse_index

def random_idx(b, n, k, seed):
    """Neighbour tables with distinct entries per row but no self-first structure."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, n, generator=g).argsort(-1)[..., :k].contiguous()


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 5), (37, 37), (120, 20)])
@pytest.mark.parametrize("source", ["knn", "random"])
def test_reciprocal_and_reverse_match_reference(b, n, k, source):
    idx = knn_graph(b, n, k, seed=4) if source == "knn" else random_idx(b, n, k, seed=4)
    keep = ops.reciprocal_mask(idx)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, reference.reciprocal_mask(idx))
    g = torch.Generator().manual_seed(5)
    for mask in (keep, keep & (torch.rand(keep.shape, generator=g) < 0.7)):
        assert torch.equal(ops.reverse_index(idx, mask), reference.reverse_index(idx, mask))


def test_reciprocal_rejects_bad_calls():
    idx = knn_graph(1, 10, 3)
    bad = idx.clone()
    bad[0, 2, 1] = 10
    with pytest.raises(RuntimeError, match=r"\[0, N\)"):
        ops.reciprocal_mask(bad)
    with pytest.raises(RuntimeError, match="int64"):
        ops.reciprocal_mask(idx.int())
    with pytest.raises(RuntimeError, match="keep"):
        ops.reverse_index(idx, torch.ones(1, 10, 4, dtype=torch.bool))


# ---------------------------------------------------------------- sparse_attention

def attention_inputs(b, n, h, l, dv, k, dtype, seed=0, keep="reciprocal"):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    idx = knn_graph(b, n, k, seed)
    keep_t = reference.reciprocal_mask(idx)
    if keep == "random":  # a subset of the reciprocal pairs, with one row fully masked
        keep_t &= torch.rand(keep_t.shape, generator=g) < 0.6
        keep_t[0, 0] = False
    P = torch.randn(b, n, h, l, generator=g, dtype=acc)
    R = torch.randn(b, n, h, l, generator=g, dtype=acc)
    v = torch.randn(b, n, h * dv, generator=g, dtype=acc).to(dtype)
    return P, R, v, idx, keep_t


SHAPES = [  # (b, n, h, l, dv, k)
    (1, 1, 1, 1, 1, 1),
    (3, 37, 2, 5, 7, 5),
    (1, 37, 1, 1, 3, 37),
    (3, 64, 2, 5, 128, 20),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("keep", ["reciprocal", "random"])
def test_sparse_attention_forward(shape, dtype, keep):
    b, n, h, l, dv, k = shape
    P, R, v, idx, keep_t = attention_inputs(b, n, h, l, dv, k, dtype, keep=keep)
    out, probs = ops.sparse_attention(P, R, v, idx, keep_t, 0.37)
    ref_out, ref_probs = reference.sparse_attention(P, R, v, idx, keep_t, 0.37)
    assert out.dtype == dtype and probs.dtype == P.dtype
    assert not out.isnan().any() and not probs.isnan().any()
    assert_close(out, ref_out, dtype)
    assert_close(probs, ref_probs, torch.float32)
    assert (probs[~keep_t.unsqueeze(2).expand_as(probs)] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_sparse_attention_backward_matches_autograd(shape, dtype):
    b, n, h, l, dv, k = shape
    P, R, v, idx, keep = attention_inputs(b, n, h, l, dv, k, dtype, seed=1)
    scale = 0.45
    rev = reference.reverse_index(idx, keep)
    out, probs = ops.sparse_attention(P, R, v, idx, keep, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dP, dR, dv_ = ops.sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale)

    Pr, Rr, vr = (t.clone().requires_grad_() for t in (P, R, v))
    reference.sparse_attention(Pr, Rr, vr, idx, keep, scale)[0].backward(grad_out)
    assert dP.dtype == P.dtype and dR.dtype == R.dtype and dv_.dtype == dtype
    assert_close(dP, Pr.grad, torch.float32)
    assert_close(dR, Rr.grad, torch.float32)
    assert_close(dv_, vr.grad, dtype)


class SparseAttention(torch.autograd.Function):
    """Differentiable op built only from the CPU forward and backward kernels."""

    @staticmethod
    def forward(ctx, P, R, v, idx, keep, rev, scale):
        out, probs = ops.sparse_attention(P, R, v, idx, keep, scale)
        ctx.save_for_backward(P, R, v, idx, rev, probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        P, R, v, idx, rev, probs = ctx.saved_tensors
        dP, dR, dv = ops.sparse_attention_backward(grad_out.contiguous(), P, R, v, idx, rev, probs, ctx.scale)
        return dP, dR, dv, None, None, None, None


@pytest.mark.parametrize("keep_kind", ["reciprocal", "random"])
def test_sparse_attention_gradcheck_fp64(keep_kind):
    P, R, v, idx, keep = attention_inputs(2, 12, 2, 3, 3, 4, torch.float64, seed=3, keep=keep_kind)
    rev = ops.reverse_index(idx, keep)
    inputs = tuple(t.requires_grad_() for t in (P, R, v))
    assert torch.autograd.gradcheck(lambda P_, R_, v_: SparseAttention.apply(P_, R_, v_, idx, keep, rev, 0.6),
                                    inputs)


def test_sparse_attention_rejects_bad_calls():
    P, R, v, idx, keep = attention_inputs(1, 10, 2, 3, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="P and R"):
        ops.sparse_attention(P.double(), R, v, idx, keep, 1.0)
    with pytest.raises(RuntimeError, match="v must be"):
        ops.sparse_attention(P, R, v[..., :7].contiguous(), idx, keep, 1.0)
    with pytest.raises(RuntimeError, match="keep"):
        ops.sparse_attention(P, R, v, idx, keep.int(), 1.0)
    bad = idx.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(RuntimeError, match=r"\[0, N\)"):
        ops.sparse_attention(P, R, v, bad, keep, 1.0)
    out, probs = ops.sparse_attention(P, R, v, idx, keep, 1.0)
    rev = ops.reverse_index(idx, keep)
    with pytest.raises(RuntimeError, match="rev"):
        ops.sparse_attention_backward(out, P, R, v, idx, rev + 5, probs, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.sparse_attention_backward(out.double(), P, R, v, idx, rev, probs, 1.0)
