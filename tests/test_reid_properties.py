"""Property-based tests (hypothesis) of the Re-ID metrics over their argument space: evaluate_rank,
compute_distance_matrix, re_ranking and re_ranking_sparse with random shapes, dtypes (numpy and
torch, float16 .. float64, integers), layouts (transposed, sliced, stride-0, reversed), scales
1e-30 .. 1e30, duplicates (exact ties), zero rows, NaN/Inf and numpy scalar arguments.

Every call gives the answer of the loop transcriptions in test_reid_metrics / test_reid_protocol /
test_reid_rerank (the oracles), or raises ValueError / TypeError; never another exception, and never
NaN for accepted finite input. evaluate_features gives evaluate_rank's answer on compute_distance_matrix,
bit for bit, or refuses where that refuses.

Profiles: "ci" (default; all of this file in well under a minute on two loaded cores) and
"thorough" (HYPOTHESIS_PROFILE=thorough, by hand: many more examples).
"""
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nformer_reid.metrics import compute_distance_matrix, evaluate_features, evaluate_rank
from nformer_reid.rerank import re_ranking, re_ranking_sparse
from tests.test_reid_metrics import loop_reference as rank_reference
from tests.test_reid_protocol import market_reference
from tests.test_reid_rerank import loop_reference as rerank_reference

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
USER_ERRORS = (ValueError, TypeError)
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ID_SPACES = st.sampled_from([np.arange(-1, 4), np.arange(3), np.array([-7, 0, 1 << 40, 3]), np.array([-2, -1])])
LAYOUTS = ["contiguous", "transposed", "sliced", "stride0", "reversed"]


def lay_out(draw, a: np.ndarray) -> np.ndarray:
    """The same values as `a` in a random memory layout (never a copy of the caller's array)."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "transposed":
        return np.ascontiguousarray(a.T).T
    if layout == "sliced":
        wide = np.zeros((a.shape[0], 2 * a.shape[1]), dtype=a.dtype)
        wide[:, ::2] = a
        return wide[:, ::2]
    if layout == "stride0" and a.shape[0] > 0:  # every row the first one: duplicates by construction
        return np.broadcast_to(a[:1], a.shape)
    if layout == "reversed":
        return np.ascontiguousarray(a[::-1])[::-1]
    return a


def as_backend(draw, a: np.ndarray):
    """numpy as given, or a torch tensor (possibly non-contiguous) holding the same values."""
    if not draw(st.booleans()):
        return a
    t = torch.from_numpy(np.array(a))
    if draw(st.booleans()) and t.dim() == 2:
        t = t.T.contiguous().T  # column-major
    return t


def maybe_numpy_int(draw, value: int):
    return draw(st.sampled_from([int, np.int64, np.int32]))(value)


def poison(draw, a: np.ndarray) -> bool:
    """Maybe put one NaN / Inf into a float array (in place). Returns whether it did."""
    if a.size == 0 or a.dtype.kind != "f" or not draw(st.integers(0, 5)) == 0:
        return False
    flat = a.reshape(-1)
    flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return True


def to_float64(x) -> np.ndarray:
    return (x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))


# --------------------------------------------------------------------------------------- evaluate_rank
@st.composite
def rank_cases(draw):
    num_q, num_g = draw(st.integers(1, 10)), draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "ties", "int", "constant"]))
    if kind == "int":
        dtype = draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8]))
        dist = rng.integers(0, 5, (num_q, num_g)).astype(dtype)
    else:
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        base = {"normal": lambda: rng.normal(size=(num_q, num_g)),
                "ties": lambda: rng.integers(-2, 3, (num_q, num_g)).astype(np.float64),
                "constant": lambda: np.full((num_q, num_g), 0.5)}[kind]()
        with np.errstate(over="ignore"):
            dist = (base * 10.0 ** draw(st.integers(-30, 30))).astype(dtype)
    bad = poison(draw, dist)
    space = draw(ID_SPACES)  # no id is special: 0-based, negative, non-contiguous
    q_pids, g_pids = rng.choice(space, num_q), rng.choice(space, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    dist = lay_out(draw, dist)
    max_rank = maybe_numpy_int(draw, draw(st.integers(1, 20)))
    return_mINP = draw(st.booleans())
    chunk = draw(st.one_of(st.none(), st.integers(1, 4)))
    chunk = None if chunk is None else maybe_numpy_int(draw, chunk)
    return dict(distmat=as_backend(draw, dist), q_pids=q_pids, g_pids=as_backend(draw, g_pids), q_camids=q_cams,
                g_camids=g_cams, max_rank=max_rank, return_mINP=return_mINP, chunk_size=chunk), bad


@settings(settings.get_profile(PROFILE))
@given(rank_cases())
def test_evaluate_rank_matches_the_loop_reference_or_refuses(case):
    kwargs, bad = case
    values = to_float64(kwargs["distmat"])
    finite = bool(np.isfinite(values).all())
    ids = [np.asarray(kwargs[k]) for k in ("q_pids", "g_pids", "q_camids", "g_camids")]
    valid = any(((ids[1] == p) & (ids[3] != c)).any() for p, c in zip(ids[0], ids[2]))  # no id is special
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            got = evaluate_rank(**kwargs)
        except USER_ERRORS as exc:
            assert bad or not finite or not valid, f"refused a valid input: {exc!r}"
            event("refused")
            return
        event("accepted")
        assert finite and valid, "accepted NaN/Inf or a split without a valid match"
        ref_cmc, ref_map = rank_reference(values, *ids, max_rank=int(kwargs["max_rank"]))
    cmc, mAP = got[:2]
    assert len(got) == (3 if kwargs["return_mINP"] else 2)
    assert cmc.dtype == np.float32 and np.isfinite(cmc).all() and np.isfinite(mAP)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(ref_map, abs=1e-9)
    if kwargs["return_mINP"]:
        assert got[2] == pytest.approx(market_reference(values, *ids, int(kwargs["max_rank"]))[2], abs=1e-9)


# ----------------------------------------------------------------------------- compute_distance_matrix
def unit_rows(x: np.ndarray) -> np.ndarray:
    """Reference L2 normalisation in float64, scale-free; zero rows stay zero."""
    peak = np.abs(x).max(axis=1, keepdims=True)
    y = x / np.where(peak > 0, peak, 1)
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.where(norm > 0, norm, 1)


@st.composite
def feature_pair(draw, max_rows=10, max_dim=6, min_rows=0, degenerate=True):
    """(qf, gf, poisoned): features of random shape, dtype, scale and layout; with `degenerate`,
    maybe duplicate rows (exact ties) and a zero row."""
    q_rows, g_rows = draw(st.integers(min_rows, max_rows)), draw(st.integers(min_rows, max_rows))
    dim = draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    both = rng.normal(size=(q_rows + g_rows, dim))
    if degenerate and draw(st.booleans()) and q_rows + g_rows > 1:  # duplicates: exact ties
        both[(q_rows + g_rows) // 2:] = both[: q_rows + g_rows - (q_rows + g_rows) // 2]
    if degenerate and draw(st.integers(0, 4)) == 0 and q_rows + g_rows:  # a zero row
        both[draw(st.integers(0, q_rows + g_rows - 1))] = 0
    dtype = draw(st.sampled_from(FLOAT_DTYPES + [np.int64]))
    if dtype is np.int64:
        both = np.clip(np.round(both * 100), -1000, 1000).astype(np.int64)
    else:
        with np.errstate(over="ignore"):
            both = (both * 10.0 ** draw(st.integers(-30, 30))).astype(dtype)
    bad = poison(draw, both)
    return lay_out(draw, both[:q_rows]), lay_out(draw, both[q_rows:]), bad


@settings(settings.get_profile(PROFILE))
@given(feature_pair(), st.sampled_from(["euclidean", "cosine"]), st.booleans(), st.integers(1, 5))
def test_compute_distance_matrix_matches_float64_or_refuses(pair, metric, normalize, chunk):
    qf, gf, bad = pair
    q64, g64 = to_float64(qf), to_float64(gf)
    finite = bool(np.isfinite(q64).all() and np.isfinite(g64).all())
    # the reference runs on NaN/Inf input too (then only the refusal is checked)
    with np.errstate(all="ignore"):
        ref, tol = distance_reference(q64, g64, metric, normalize, finite)
    try:
        out = compute_distance_matrix(as_backend_fixed(qf), gf, metric, normalize=normalize,
                                      chunk_size=np.int64(chunk))
    except USER_ERRORS as exc:
        overflow = not (normalize or metric == "cosine") and finite and ref.size and ref.max() > 1e37
        assert bad or not finite or overflow, f"refused a valid input: {exc!r}"
        event("refused (overflow)" if overflow else "refused")
        return
    event("accepted")
    assert finite, "accepted NaN/Inf"
    assert out.dtype == torch.float32 and out.shape == ref.shape and bool(torch.isfinite(out).all())
    got = out.double().numpy()
    assert (np.abs(got - np.clip(ref, 0, None)) <= tol).all(), np.abs(got - ref).max()
    assert (got >= 0).all()


def distance_reference(q64, g64, metric, normalize, finite):
    """float64 reference distances and the float32 tolerance of each (subnormal results: absolute floor)."""
    if normalize or metric == "cosine":
        qn, gn = unit_rows(q64), unit_rows(g64)
        sim = qn @ gn.T
        ref = 1 - sim if metric == "cosine" else (qn ** 2).sum(1)[:, None] + (gn ** 2).sum(1)[None] - 2 * sim
        return ref, 2e-5 * np.ones_like(ref)
    peak = max(np.abs(q64).max(initial=0), np.abs(g64).max(initial=0)) if finite else 1.0
    s = peak if peak > 0 else 1.0
    ref = (((q64 / s)[:, None] - (g64 / s)[None]) ** 2).sum(-1) * s * s
    return ref, 2e-5 * q64.shape[1] * s * s + 1e-5 * ref + np.finfo(np.float32).tiny


def as_backend_fixed(x):
    """The query side as a torch tensor (the gallery stays numpy): both kinds in one call."""
    return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x


@settings(settings.get_profile(PROFILE))
@given(feature_pair(max_rows=10, max_dim=5, min_rows=1), st.sampled_from(["euclidean", "cosine"]), st.booleans(),
       st.data())
def test_evaluate_features_equals_evaluate_rank_on_the_matrix_or_both_refuse(pair, metric, normalize, data):
    qf, gf, _ = pair
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31 - 1)))
    space = data.draw(ID_SPACES)
    ids = (rng.choice(space, qf.shape[0]), rng.choice(space, gf.shape[0]), rng.integers(0, 2, qf.shape[0]),
           rng.integers(0, 2, gf.shape[0]))
    max_rank = data.draw(st.integers(1, 12))
    chunks = dict(query_chunk=data.draw(st.one_of(st.none(), st.integers(1, 4))),
                  gallery_chunk=data.draw(st.one_of(st.none(), st.integers(1, 5))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            ref = evaluate_rank(compute_distance_matrix(qf, gf, metric, normalize), *ids, max_rank,
                                return_mINP=True)
        except USER_ERRORS as exc:
            with pytest.raises(type(exc)):
                evaluate_features(qf, gf, *ids, metric, normalize, max_rank, return_mINP=True, **chunks)
            event("both refused")
            return
        got = evaluate_features(as_backend_fixed(qf), gf, *ids, metric, normalize, max_rank, return_mINP=True,
                                **chunks)
    event("accepted")
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[1:] == ref[1:]


# ------------------------------------------------------------------------------------------ re_ranking
def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))


@st.composite
def dense_cases(draw):
    qf, gf, _ = draw(feature_pair(max_rows=9, max_dim=5, min_rows=1))
    x = np.concatenate([to_float64(qf), to_float64(gf)])
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    peak = np.abs(x).max()
    x = x / peak if peak > 0 else x
    num_q = qf.shape[0]
    d = euclidean(x, x)
    scale = 10.0 ** draw(st.integers(-30, 30))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    with np.errstate(over="ignore", under="ignore"):
        blocks = [(b * scale).astype(dtype) for b in (d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:])]
    bad = any(poison(draw, b) for b in blocks[:1])
    n = x.shape[0]
    k1 = maybe_numpy_int(draw, draw(st.integers(1, max(1, n - 1))))
    k2 = maybe_numpy_int(draw, draw(st.integers(1, n)))
    lam = draw(st.sampled_from([float, np.float32, np.float64]))(draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])))
    return [as_backend(draw, lay_out(draw, b)) for b in blocks], int(k1), int(k2), k1, k2, lam, bad


@settings(settings.get_profile(PROFILE))
@given(dense_cases())
def test_re_ranking_matches_the_loop_reference_or_refuses(case):
    blocks, k1i, k2i, k1, k2, lam, bad = case
    values = [to_float64(b) for b in blocks]
    finite = all(np.isfinite(v).all() for v in values)
    n = values[0].shape[0] + values[0].shape[1]
    try:
        got64 = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=lam, dtype=np.float64)
        got32 = re_ranking(*blocks, k1=k1, k2=k2, lambda_value=lam)
    except USER_ERRORS as exc:
        assert bad or not finite or max(k1i + 1, k2i) > n, f"refused a valid input: {exc!r}"
        event("refused")
        return
    event("accepted")
    assert finite and max(k1i + 1, k2i) <= n
    ref = rerank_reference(*values, k1i, k2i, float(lam))
    for got in (got64, got32):
        assert np.isfinite(got).all() and (got >= -1e-6).all() and (got <= 1 + 1e-6).all()
    np.testing.assert_allclose(got64, ref, rtol=0, atol=1e-6)


def ties_free(x: np.ndarray, kk: int, gap: float = 1e-5) -> bool:
    """Every item's first kk + 1 neighbours (float64 Euclidean order) are apart by more than gap."""
    d = euclidean(x, x) ** 2
    top = np.sort(d, axis=1)[:, : kk + 1]
    return bool((np.diff(top, axis=1) > gap).all())


@settings(settings.get_profile(PROFILE))
@given(st.one_of(feature_pair(max_rows=10, max_dim=6, min_rows=1),
                 feature_pair(max_rows=10, max_dim=8, min_rows=2, degenerate=False)), st.data())
def test_re_ranking_sparse_matches_the_reference_or_refuses(pair, data):
    qf, gf, bad = pair
    q64, g64 = to_float64(qf), to_float64(gf)
    n = q64.shape[0] + g64.shape[0]
    k1 = data.draw(st.integers(1, max(1, n - 1)))
    k2 = data.draw(st.integers(1, n))
    lam = data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    finite = bool(np.isfinite(q64).all() and np.isfinite(g64).all())
    try:
        got = re_ranking_sparse(as_backend_fixed(qf), gf, k1=np.int64(k1), k2=k2, lambda_value=np.float32(lam),
                                pair_budget=data.draw(st.sampled_from([7, 1 << 22])))
    except USER_ERRORS as exc:
        assert bad or not finite or max(k1 + 1, k2) > n, f"refused a valid input: {exc!r}"
        event("refused")
        return
    assert finite and max(k1 + 1, k2) <= n
    assert got.dtype == np.float32 and got.shape == (q64.shape[0], g64.shape[0])
    assert np.isfinite(got).all() and (got >= -1e-6).all() and (got <= 1 + 1e-6).all()
    x = unit_rows(np.concatenate([q64, g64]))
    if (np.abs(x).sum(1) > 0).all() and ties_free(x, max(k1 + 1, k2)):
        event("accepted, compared with the reference")
        d = euclidean(x, x)
        nq = q64.shape[0]
        ref = rerank_reference(d[:nq, nq:], d[:nq, :nq], d[nq:, nq:], k1, k2, lam)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    else:
        event("accepted, ties or a zero row: finite and in range")
