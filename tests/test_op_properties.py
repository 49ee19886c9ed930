"""Property-based tests over the ops' argument space (hypothesis): random shapes, dtypes, layouts
(transposed, sliced, stride-0), scales from 1e-30 to 1e30, k, duplicates, NaN/Inf. Every call
gives the reference's answer or a ValueError/TypeError, never another exception, and never a
non-finite output for accepted finite input.

Profiles: "ci" (default, a few seconds per test) and "thorough" (HYPOTHESIS_PROFILE=thorough).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nformer_kernels as nk
from nformer_kernels import reference

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FAST = pytest.mark.backends("reference", "torch", "cpu")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
USER_ERRORS = (ValueError, TypeError)


@st.composite
def features(draw, max_rows=24, max_dim=12):
    """(tensor, finite): a float tensor of random shape, dtype, scale and layout, maybe with duplicates or NaN/Inf."""
    batch = draw(st.sampled_from([None, 1, 2]))
    n = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_dim))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((batch or 1, n, d), generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # duplicate rows: exact ties
        x[:, n // 2:] = x[:, : n - n // 2].clone()
    x = x * 10.0 ** draw(st.integers(-30, 30))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "stride0"]))
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=2)[..., ::2]
    elif layout == "stride0":
        x = x[:, :1].expand_as(x)  # every row the same (a legal view with stride 0)
    special = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    x = x.to(dtype)
    if special is not None:
        x = x.clone()
        x[0, draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = special
    x = x if batch is not None else x[0]
    return x, bool(torch.isfinite(x).all())


def _unit(x):
    """fp64 unit rows of x (the reference's view of cosine similarity), zero rows kept zero."""
    xd = x.double()
    peak = xd.abs().amax(-1, keepdim=True)
    return torch.nn.functional.normalize(xd / torch.where(peak > 0, peak, 1), dim=-1)


def _assert_valid_topk(x, idx, k):
    """Self first, distinct ids in range, and neighbour similarities equal the true top-k (fp64)."""
    xb, ib = (x, idx) if x.dim() == 3 else (x[None], idx[None])
    b, n, _ = xb.shape
    assert ib.shape == (b, n, k) and ib.dtype == torch.int64
    assert torch.equal(ib[..., 0], torch.arange(n).expand(b, n))
    assert bool(((ib >= 0) & (ib < n)).all())
    srt = ib.sort(-1).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any())
    unit = _unit(xb)
    sim = unit @ unit.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    want = sim.topk(k, dim=-1).values[..., 1:]
    got = torch.gather(sim, 2, ib)[..., 1:]
    # The kernels' similarities are rounded once in the input dtype (unit rows) and accumulated in fp32.
    atol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(x.dtype, 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


@FAST
@settings(settings.get_profile(PROFILE))
@given(data=st.data(), case=features())
def test_knn_answers_or_refuses(backend, data, case):
    x, finite = case
    n = x.shape[-2]
    k = data.draw(st.one_of(st.integers(1, n), st.integers(-2, n + 3), st.sampled_from([2.5, "3", None])))
    try:
        idx = nk.knn(x, k)
    except USER_ERRORS:
        assert not finite or not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n
        return
    assert finite and 1 <= k <= n
    _assert_valid_topk(x, idx, k)


@st.composite
def neighbour_lists(draw):
    """(idx, valid): int64 (N,k)|(B,N,k) lists, valid or with one fault (repeat, out of range, wrong dtype)."""
    batch = draw(st.sampled_from([None, 2]))
    n = draw(st.integers(1, 30))
    k = draw(st.integers(1, n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range((batch or 1) * n)]).view(batch or 1, n, k)
    fault = draw(st.sampled_from([None, None, "repeat", "range", "dtype", "transposed"]))
    valid = True
    if fault == "repeat" and k > 1:
        idx[0, 0, 1] = idx[0, 0, 0]
        valid = False
    elif fault == "range":
        idx[0, -1, -1] = draw(st.sampled_from([-1, n, n + 5]))
        valid = False
    elif fault == "dtype":
        idx = idx.int()
        valid = False
    elif fault == "transposed" and n == k:  # a legal non-contiguous view of a valid table
        idx = idx.transpose(1, 2).contiguous().transpose(1, 2)
        valid = bool((idx.sort(-1).values.diff(dim=-1) > 0).all())
    return (idx if batch else idx[0]), valid


@FAST
@settings(settings.get_profile(PROFILE))
@given(case=neighbour_lists())
def test_reciprocal_mask_answers_or_refuses(backend, case):
    idx, valid = case
    try:
        keep = nk.reciprocal_mask(idx)
    except USER_ERRORS:
        assert not valid
        return
    assert valid
    batched = idx if idx.dim() == 3 else idx[None]
    want = reference.reciprocal_mask(batched)
    assert torch.equal(keep if idx.dim() == 3 else keep[None], want)


@FAST
@settings(settings.get_profile(PROFILE))
@given(data=st.data(), case=features(max_rows=20, max_dim=8))
def test_neighbor_attention_answers_or_refuses(backend, data, case):
    x, finite = case
    n = x.shape[-2]
    heads = data.draw(st.sampled_from([1, 2]))
    if x.shape[-1] % heads:
        heads = 1
    k = data.draw(st.integers(1, n))
    try:
        idx = nk.knn(x, k)
    except USER_ERRORS:
        assert not finite
        return
    keep = nk.reciprocal_mask(idx)
    landmarks = torch.randperm(n, generator=torch.Generator().manual_seed(n))[: data.draw(st.integers(1, min(n, 5)))]
    try:
        out = nk.neighbor_attention(x, x, x, idx, keep, landmarks, heads)
    except USER_ERRORS as exc:
        assert not finite or "too large" in str(exc)
        return
    assert finite and bool(torch.isfinite(out).all())
    xb = x if x.dim() == 3 else x[None]
    args = [t if x.dim() == 3 else t[None] for t in (idx, keep)]
    want = reference.neighbor_attention(xb.contiguous(), xb.contiguous(), xb.contiguous(), *args, landmarks, heads)
    want = want if x.dim() == 3 else want[0]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(x.dtype, 1e-4)
    scale = max(1.0, want.double().abs().max().item())
    assert (out.double() - want.double()).abs().max().item() <= tol * scale


@FAST
@settings(settings.get_profile(PROFILE))
@given(data=st.data(), case=features(max_rows=20, max_dim=8))
def test_nformer_answers_or_refuses(backend, data, case):
    """The module composes the ops: finite output for accepted finite input, else a named refusal."""
    x, finite = case
    x = x.float() if x.dtype == torch.float64 else x
    heads = 2 if x.shape[-1] % 2 == 0 else 1
    model = nk.NFormer(dim=x.shape[-1], depth=2, num_heads=heads, topk=data.draw(st.integers(1, 25))).eval()
    model = model.to(x.dtype) if x.dtype != torch.float32 else model
    try:
        out = model(x, generator=torch.Generator().manual_seed(0))
    except USER_ERRORS as exc:
        assert not finite or "too large" in str(exc)
        return
    assert finite and out.shape == x.shape and bool(torch.isfinite(out).all())


@settings(settings.get_profile(PROFILE), max_examples=25)
@given(n=st.integers(1, 70), d=st.integers(1, 40), k_frac=st.floats(0, 1), copies=st.integers(1, 4),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]), noise=st.sampled_from([0.0, 1e-7, 1e-3]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 99))
def test_knn_backends_agree_bit_for_bit(n, d, k_frac, copies, scale, noise, dtype, seed):
    """Random shapes, scales, duplicate copies and noise: reference, torch and cpu (exact and
    certified) return one tensor (the canonical top-k, docs/design.md)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn((max(1, n // copies), d), generator=g)
    x = base.repeat(-(-n // base.shape[0]), 1)[:n]  # n rows: each base row `copies` times (a few once more)
    x = ((x + noise * torch.randn(x.shape, generator=g)) * scale).to(dtype)
    if not torch.isfinite(x).all():
        return
    k = max(1, min(n, round(k_frac * n)))
    with nk.use_backend("reference"):
        want = nk.knn(x, k, precision="exact")
    for name in [b for b in ("torch", "cpu") if b in nk.available_backends("cpu")]:
        with nk.use_backend(name):
            for precision in ("exact", "certified"):
                assert torch.equal(nk.knn(x, k, precision=precision), want), (name, precision)
