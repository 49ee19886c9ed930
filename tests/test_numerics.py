"""Numerics at the edges of the float range: knn is scale-invariant for every finite input, the
finite-input check itself cannot overflow, and attention refuses scores it cannot represent."""
import math

import pytest
import torch

import nformer_kernels as nk
from tests.helpers import randn

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _exponents(dtype):
    """Powers of two from the top of dtype's range to just above its normal minimum."""
    top = math.frexp(torch.finfo(dtype).max)[1] - 1
    bottom = math.frexp(torch.finfo(dtype).tiny)[1] + 4
    return [top, top // 2, 0, bottom]


# The kernels see the same rows at every scale (normalised, or scaled by a power of two), so the
# interpreted and emulated kernels add nothing here.
@pytest.mark.backends("reference", "torch", "cpu", "cuda", "triton")
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_knn_is_scale_invariant(backend, dtype, metric):
    backend.skip_dtype(dtype)
    base = randn((2, 37, 8), seed=3, dtype=torch.float64)
    base = base.sign() * (1 + base.abs())
    base = (base / base.abs().max()).to(dtype)  # |entries| in [~0.2, 1]: every scaling below is exact
    want = nk.knn(backend.tensor(base), 5, metric=metric)
    for exponent in _exponents(dtype):
        scaled = (base.double() * 2.0 ** exponent).to(dtype)
        assert torch.equal(scaled.double(), base.double() * 2.0 ** exponent)
        got = nk.knn(backend.tensor(scaled), 5, metric=metric)
        assert torch.equal(got, want), f"2^{exponent}"


@pytest.mark.backends("reference", "torch", "cpu")
def test_knn_zero_rows_are_finite_and_self_first(backend):
    x = randn((20, 6), seed=1)
    x[3] = 0
    x[11] = 0
    idx = nk.knn(x, 4)
    assert torch.equal(idx[:, 0], torch.arange(20))
    assert bool(((idx >= 0) & (idx < 20)).all())


def test_finite_check_does_not_overflow():
    x = randn((30, 4), seed=2, dtype=torch.float64) * 1e300  # its fp32 sum would be inf
    assert nk.knn(x, 3).shape == (30, 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[7, 2] = bad
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            nk.knn(y, 3)


def _attention_inputs(scale_qk):
    x = randn((40, 16), seed=5)
    idx = nk.knn(x, 5)
    return x * scale_qk, x * scale_qk, x, idx, nk.reciprocal_mask(idx), torch.tensor([0, 7, 21])


@pytest.mark.backends("reference", "torch", "cpu")
def test_attention_refuses_scores_beyond_the_float_range(backend):
    q, k, v, idx, keep, landmarks = _attention_inputs(1e9)  # |scores| ~ 1e37: still representable
    out = nk.neighbor_attention(q, k, v, idx, keep, landmarks, 2)
    assert bool(torch.isfinite(out).all())
    q, k, v, idx, keep, landmarks = _attention_inputs(1e10)
    with pytest.raises(ValueError, match="q and k are too large"):
        nk.neighbor_attention(q, k, v, idx, keep, landmarks, 2)
    P, R = nk.landmark_factors(q, k, q[landmarks], k[landmarks], 2)
    with pytest.raises(ValueError, match="P and R .* are too large"):
        nk.sparse_attention(P, R, v, idx, keep, 0.25)
    with pytest.raises(ValueError, match="too large"):
        nk.NFormer(dim=16, depth=1, topk=5).eval()(v * 1e12)
