"""The torchreid protocol: evaluate_rank against plain loop transcriptions of torchreid's
eval_market1501 / eval_cuhk03 (and fast-reid's mINP), with ids of every kind (0-based, negative,
non-contiguous, pid 0 in queries); evaluate_features against evaluate_rank on the full matrix;
compute_distance_matrix's torchreid meaning."""
import warnings

import numpy as np
import pytest
import torch

from nformer_reid.metrics import compute_distance_matrix, count_valid_queries, evaluate_features, evaluate_rank


def kept_order(dist_row, q_pid, q_cam, g_pids, g_cams):
    """Gallery indices by (distance, index) — a stable argsort — without same pid + same camera."""
    order = np.argsort(dist_row, kind="stable")
    return [j for j in order if not (g_pids[j] == q_pid and g_cams[j] == q_cam)]


def market_reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """eval_market1501 (torchreid) plus mINP (fast-reid), one query at a time. Returns cmc, mAP,
    mINP and the number of scored queries."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        kept = kept_order(distmat[i], q_pids[i], q_cams[i], g_pids, g_cams)
        raw = np.array([1 if g_pids[j] == q_pids[i] else 0 for j in kept])
        if not raw.any():
            continue
        cum = raw.cumsum()
        last = np.flatnonzero(raw).max()
        all_inp.append(cum[last] / (last + 1.0))
        cmc = np.minimum(cum, 1)
        cmc = np.concatenate([cmc, np.ones(max(0, max_rank - len(cmc)))])  # kept list shorter than max_rank
        all_cmc.append(cmc[:max_rank])
        precision = np.array([cum[r] / (r + 1.0) for r in range(len(raw))]) * raw
        all_ap.append(precision.sum() / raw.sum())
    return np.mean(all_cmc, axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def cuhk03_reference(distmat, q_pids, g_pids, q_cams, g_cams, max_rank, draws):
    """eval_cuhk03 (torchreid) with the draws given: draws[v, r, p] in [0, 1) for the v-th scored
    query, repeat r and the p-th gallery pid in ascending order picks that pid's kept entry
    min(floor(u * n), n - 1) in gallery-index order (evaluate_rank's documented sampling)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    pids = sorted(set(g_pids.tolist()))
    all_cmc, all_ap = [], []
    v = 0
    for i in range(num_q):
        kept = kept_order(distmat[i], q_pids[i], q_cams[i], g_pids, g_cams)
        raw = np.array([1 if g_pids[j] == q_pids[i] else 0 for j in kept])
        if not raw.any():
            continue
        cmc = 0.0
        for r in range(draws.shape[1]):
            chosen = set()
            for p, pid in enumerate(pids):
                candidates = sorted(j for j in kept if g_pids[j] == pid)
                n = len(candidates)
                chosen.add(candidates[min(int(draws[v, r, p] * n), n - 1)])
            masked = np.array([raw[k] for k, j in enumerate(kept) if j in chosen])
            cmc = cmc + np.minimum(masked.cumsum(), 1)[:max_rank].astype(np.float32)
        all_cmc.append(cmc / draws.shape[1])
        cum = raw.cumsum()
        all_ap.append((np.array([cum[r] / (r + 1.0) for r in range(len(raw))]) * raw).sum() / raw.sum())
        v += 1
    return np.asarray(all_cmc, dtype=np.float32).sum(0) / len(all_cmc), float(np.mean(all_ap))


def id_case(seed, kind, num_q=25, num_g=90, num_ids=12, num_cams=3):
    """pids / camids of a kind: 0-based, negative, non-contiguous (huge gaps) or mixed."""
    rng = np.random.default_rng(seed)
    if kind == "zero_based":
        space = np.arange(num_ids)
    elif kind == "negative":
        space = -np.arange(1, num_ids + 1) * 3
    elif kind == "sparse":
        space = np.array([0, 7, 1 << 40, 12345, 5, 999, 2, 3 << 33, 41, 8, 77, 6])[:num_ids]
    else:  # mixed: junk-like -1 and distractor-like 0 are ordinary ids, also in the queries
        space = np.array([-1, 0, 1, 2, -5, 3, 4, 100, 5, -2, 6, 7])[:num_ids]
    q_pids, g_pids = rng.choice(space, num_q), rng.choice(space, num_g)
    cam_space = np.array([0, 1, 2, -4, 9])[:num_cams] if kind != "zero_based" else np.arange(num_cams)
    return q_pids, g_pids, rng.choice(cam_space, num_q), rng.choice(cam_space, num_g)


def distances(seed, shape, kind):
    rng = np.random.default_rng(seed + 1000)
    if kind == "ties":  # many exact ties, also between matches and non-matches
        return rng.integers(0, 5, shape).astype(np.float32)
    if kind == "float16":
        return rng.normal(size=shape).astype(np.float16)
    if kind == "float64":
        return rng.normal(size=shape)
    if kind == "int":
        return rng.integers(-3, 4, shape).astype(np.int32)
    return rng.normal(size=shape).astype(np.float32)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("id_kind", ["zero_based", "negative", "sparse", "mixed"])
@pytest.mark.parametrize("dist_kind", ["float32", "ties", "float16", "float64", "int"])
def test_evaluate_rank_is_torchreid_market1501_with_fastreid_mINP(id_kind, dist_kind):
    for seed in range(2):
        ids = id_case(seed, id_kind)
        dist = distances(seed, (len(ids[0]), len(ids[1])), dist_kind)
        ref_cmc, ref_map, ref_inp, num_valid = market_reference(dist, *ids, max_rank=20)
        assert num_valid == count_valid_queries(*ids) > 0
        for chunk in (None, 1, 7):
            cmc, mAP, mINP = quiet(evaluate_rank, dist, *ids, max_rank=20, return_mINP=True, chunk_size=chunk)
            assert cmc.dtype == np.float32 and cmc.shape == (20,)
            np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
            assert mAP == pytest.approx(ref_map, abs=1e-12) and mINP == pytest.approx(ref_inp, abs=1e-12)
        two = quiet(evaluate_rank, dist, *ids, max_rank=20)
        assert len(two) == 2 and two[1] == mAP


def test_zero_based_ids_as_torchreid_relabels_them():
    # MSMT17-like: test ids start at 0; query pid 0 is a real identity and must be scored
    dist = np.array([[0.3, 0.1, 0.2, 0.4],
                     [0.1, 0.5, 0.2, 0.3]], dtype=np.float32)
    q_pids, g_pids = np.array([0, 1]), np.array([0, 1, 0, 1])
    q_cams, g_cams = np.array([0, 0]), np.array([1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every query has a match: no warning at all
        cmc, mAP, mINP = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3, return_mINP=True)
    # query 0 (pid 0, cam 0): entry 2 (pid 0, cam 0) dropped; kept order 1, 0, 3 -> match at rank 2
    # query 1 (pid 1, cam 0): kept order 0, 2, 3, 1 -> matches at ranks 3 and 4
    np.testing.assert_allclose(cmc, [0, 0.5, 1])
    assert mAP == pytest.approx((1 / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    assert mINP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert count_valid_queries(q_pids, g_pids, q_cams, g_cams) == 2


def test_queries_without_a_match_are_skipped_with_one_warning():
    ids = id_case(3, "mixed", num_q=30, num_g=40)
    q_pids = ids[0].copy()
    q_pids[:5] = 424242  # absent from the gallery
    ids = (q_pids,) + ids[1:]
    dist = distances(3, (30, 40), "float32")
    ref_cmc, ref_map, ref_inp, num_valid = market_reference(dist, *ids, max_rank=10)
    assert num_valid == count_valid_queries(*ids) <= 25
    with pytest.warns(RuntimeWarning, match=f"{30 - num_valid} of 30 queries have no valid gallery match"):
        cmc, mAP, mINP = evaluate_rank(dist, *ids, max_rank=10, return_mINP=True)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(ref_map, abs=1e-12) and mINP == pytest.approx(ref_inp, abs=1e-12)
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(dist[:2], [424242, -424242], ids[1], [0, 0], ids[3])


def test_max_rank_beyond_the_gallery_is_cut_with_torchreids_note():
    ids = id_case(4, "zero_based", num_q=6, num_g=9, num_ids=3)
    dist = distances(4, (6, 9), "ties")
    with pytest.warns(RuntimeWarning, match="number of gallery samples is quite small, got 9"):
        cmc, mAP = evaluate_rank(dist, *ids, max_rank=50)
    ref_cmc, ref_map, _, _ = market_reference(dist, *ids, max_rank=50)
    assert cmc.shape == (9,) and cmc[-1] == 1
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(ref_map, abs=1e-12)


def draws_for(seed, dist, ids, num_repeats):
    num_valid = count_valid_queries(*ids)
    return np.random.default_rng(seed).random((num_valid, num_repeats, len(set(ids[1].tolist()))))


@pytest.mark.parametrize("id_kind", ["zero_based", "negative", "sparse", "mixed"])
@pytest.mark.parametrize("dist_kind", ["float32", "ties", "float64"])
def test_cuhk03_single_shot_is_torchreids_with_the_documented_draws(id_kind, dist_kind):
    ids = id_case(5, id_kind, num_q=20, num_g=70, num_cams=2)
    dist = distances(5, (20, 70), dist_kind)
    for seed, repeats in ((0, 10), (7, 3)):
        ref_cmc, ref_map = cuhk03_reference(dist, *ids, max_rank=8, draws=draws_for(seed, dist, ids, repeats))
        cmc, mAP, mINP = quiet(evaluate_rank, dist, *ids, max_rank=8, use_metric_cuhk03=True, return_mINP=True,
                               seed=seed, num_repeats=repeats, chunk_size=3)
        np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
        assert mAP == pytest.approx(ref_map, abs=1e-12)
        # AP and INP use the full kept list: the market values
        _, market_map, market_inp = quiet(evaluate_rank, dist, *ids, max_rank=8, return_mINP=True)
        assert mAP == market_map and mINP == market_inp


def test_cuhk03_draws_are_seeded_and_single_entries_are_deterministic():
    ids = id_case(6, "zero_based", num_q=30, num_g=80, num_cams=2)
    dist = distances(6, (30, 80), "float32")
    a = quiet(evaluate_rank, dist, *ids, use_metric_cuhk03=True, seed=1)[0]
    b = quiet(evaluate_rank, dist, *ids, use_metric_cuhk03=True, seed=1)[0]
    c = quiet(evaluate_rank, dist, *ids, use_metric_cuhk03=True, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (len(set(ids[1].tolist())),)  # the sampled list has one entry per gallery pid
    # one gallery image per pid, in the other camera: nothing random, the market CMC
    q_pids, g_pids = np.arange(10), np.arange(10)[::-1].copy()
    d = distances(7, (10, 10), "float32")
    single = evaluate_rank(d, q_pids, g_pids, np.zeros(10, int), np.ones(10, int), max_rank=10,
                           use_metric_cuhk03=True, seed=3)
    market = evaluate_rank(d, q_pids, g_pids, np.zeros(10, int), np.ones(10, int), max_rank=10)
    np.testing.assert_allclose(single[0], market[0], atol=1e-6)
    assert single[1] == market[1]


def test_argument_checks():
    ids = id_case(0, "zero_based", num_q=4, num_g=6)
    dist = distances(0, (4, 6), "float32")
    for kwargs, exc, message in ((dict(use_metric_cuhk03=1), TypeError, "use_metric_cuhk03 must be a bool"),
                                 (dict(return_mINP="yes"), TypeError, "return_mINP must be a bool"),
                                 (dict(seed=-1), ValueError, "seed must be >= 0"),
                                 (dict(num_repeats=0), ValueError, "num_repeats must be >= 1")):
        with pytest.raises(exc, match=message):
            quiet(evaluate_rank, dist, *ids, **kwargs)
    qf, gf = np.ones((4, 3)), np.ones((6, 3))
    with pytest.raises(ValueError, match="use_metric_cuhk03 is not supported by evaluate_features"):
        evaluate_features(qf, gf, *ids, use_metric_cuhk03=True)
    with pytest.raises(ValueError, match="g_camids has 5 entries"):
        evaluate_features(qf, gf, *ids[:3], ids[3][:5])
    with pytest.raises(ValueError, match="qf and gf must be"):
        evaluate_features(qf, gf[:, :2], *ids)
    with pytest.raises(ValueError, match="gallery_chunk must be >= 1"):
        evaluate_features(qf, gf, *ids, gallery_chunk=0)
    with pytest.raises(ValueError, match="metric"):
        evaluate_features(qf, gf, *ids, metric="l1")
    with pytest.raises(ValueError, match="gf contains NaN"):
        evaluate_features(qf, np.full((6, 3), np.nan), *ids)
    with pytest.raises(ValueError, match="exceed the float32 range"):
        quiet(evaluate_features, qf * 1e30, -gf * 1e30, *ids)


# ------------------------------------------------------------------------------------ evaluate_features
def features(seed, num_q, num_g, dim, kind, dtype=np.float32):
    """Random, clustered (identities around centres: few entries before the last match) or
    duplicated rows (exact ties between matches and others)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.normal(size=(num_q + num_g, dim))
    else:
        centres = rng.normal(size=(8, dim))
        x = centres[rng.integers(0, 8, num_q + num_g)] + 0.3 * rng.normal(size=(num_q + num_g, dim))
        if kind == "duplicates":
            x[num_q + num_g // 2:] = x[num_q:num_q + num_g - num_g // 2]
            x[:num_q // 2] = x[num_q:num_q + num_q // 2]  # queries equal to gallery rows: distance 0
    if dtype == np.int64:
        x = np.round(x * 3)
    return x[:num_q].astype(dtype), x[num_q:].astype(dtype)


@pytest.mark.parametrize("kind", ["random", "clustered", "duplicates"])
@pytest.mark.parametrize("metric,normalize", [("euclidean", False), ("euclidean", True), ("cosine", False),
                                              ("cosine", True)])
def test_evaluate_features_equals_evaluate_rank_on_the_full_matrix(kind, metric, normalize):
    qf, gf = features(1, 23, 67, 6, kind)
    ids = id_case(1, "mixed", num_q=23, num_g=67, num_ids=6)
    dist = compute_distance_matrix(qf, gf, metric, normalize)
    ref = quiet(evaluate_rank, dist, *ids, max_rank=30, return_mINP=True)
    for query_chunk, gallery_chunk in ((None, None), (1, 1), (7, 7), (5, 1000), (1000, 13)):
        got = quiet(evaluate_features, qf, gf, *ids, metric, normalize, 30, return_mINP=True,
                    query_chunk=query_chunk, gallery_chunk=gallery_chunk)
        np.testing.assert_array_equal(got[0], ref[0])
        assert got[1] == ref[1] and got[2] == ref[2]


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int64])
def test_evaluate_features_other_dtypes_and_torch_input(dtype):
    qf, gf = features(2, 17, 41, 5, "duplicates", dtype)
    ids = id_case(2, "zero_based", num_q=17, num_g=41, num_ids=5)
    for metric, normalize in (("euclidean", False), ("cosine", True)):
        ref = quiet(evaluate_rank, compute_distance_matrix(qf, gf, metric, normalize), *ids, max_rank=50)
        got = quiet(evaluate_features, torch.from_numpy(qf), gf, *map(torch.from_numpy, ids), metric=metric,
                    normalize=normalize, query_chunk=4, gallery_chunk=9)
        np.testing.assert_array_equal(got[0], ref[0])
        assert got[1] == ref[1] and got[0].shape == (41,)


def test_evaluate_features_on_a_larger_clustered_split():
    # several images per id in several cameras, distractors of their own ids and of id 0
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32))
    g_pids = np.concatenate([np.repeat(np.arange(1, 41), 12), np.zeros(150, int), 1000 + np.arange(150)])
    q_pids = np.repeat(np.arange(1, 41), 3)
    feats = lambda p: np.where((p > 0)[:, None] & (p <= 40)[:, None], centres[np.clip(p - 1, 0, 39)], 0) \
        + 0.6 * rng.normal(size=(len(p), 32))  # noqa: E731
    qf, gf = feats(q_pids).astype(np.float32), feats(g_pids).astype(np.float32)
    q_cams, g_cams = rng.integers(0, 6, len(q_pids)), rng.integers(0, 6, len(g_pids))
    for normalize in (False, True):
        ref = evaluate_rank(compute_distance_matrix(qf, gf, normalize=normalize), q_pids, g_pids, q_cams, g_cams,
                            return_mINP=True)
        got = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, normalize=normalize, return_mINP=True,
                                query_chunk=50, gallery_chunk=100)
        np.testing.assert_array_equal(got[0], ref[0])
        assert got[1:] == ref[1:] and 0.3 < got[1] < 1


def test_distances_do_not_depend_on_the_block():
    qf, gf = features(4, 37, 53, 24, "random")
    for metric, normalize in (("euclidean", False), ("euclidean", True), ("cosine", False)):
        full = compute_distance_matrix(qf, gf, metric, normalize)
        for chunk in (1, 3, 16, 1000):
            assert torch.equal(compute_distance_matrix(qf, gf, metric, normalize, chunk_size=chunk), full)
        # an entry computed with its gallery row alone (normalised rows: the grid is per row)
        if normalize or metric == "cosine":
            for i, j in ((0, 0), (5, 17), (36, 52)):
                single = compute_distance_matrix(qf[i:i + 1], gf[j:j + 1], metric, normalize)
                assert torch.equal(single[0, 0], full[i, j])


def test_compute_distance_matrix_is_torchreids_by_default():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(9, 16, generator=g) * 3, torch.randn(11, 16, generator=g) * 3
    torch.testing.assert_close(compute_distance_matrix(qf, gf), torch.cdist(qf, gf) ** 2, atol=2e-4, rtol=1e-5)
    qn, gn = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    torch.testing.assert_close(compute_distance_matrix(qf, gf, "cosine"), 1 - qn @ gn.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(compute_distance_matrix(qf, gf, normalize=True), torch.cdist(qn, gn) ** 2,
                               atol=1e-5, rtol=0)
    same = torch.ones(3, 16)
    assert torch.equal(compute_distance_matrix(same, same * 1), torch.zeros(3, 3))  # exact zero for duplicates
