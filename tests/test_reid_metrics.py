"""evaluate_rank against an independent loop implementation of the torchreid protocol."""
import warnings

import numpy as np
import pytest
import torch

from nformer_reid.metrics import compute_distance_matrix, evaluate_features, evaluate_rank, plot_cmc


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per query: stable argsort, drop same pid + same camera (no id is special), first-match CMC,
    AP over the kept list."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    cmcs, aps = [], []
    for i in range(num_q):
        order = sorted(range(num_g), key=lambda j: (distmat[i, j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [1.0 if g_pids[j] == q_pids[i] else 0.0 for j in kept]
        if sum(hits) == 0:
            continue
        first = hits.index(1.0)
        cmcs.append([1.0 if r >= first else 0.0 for r in range(max_rank)])
        found, precisions = 0, []
        for r, h in enumerate(hits):
            if h:
                found += 1
                precisions.append(found / (r + 1))
        aps.append(sum(precisions) / len(precisions))
    return np.mean(cmcs, axis=0), float(np.mean(aps))


def random_case(seed, num_q=30, num_g=120, num_ids=15, num_cams=4, integer_dist=False):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(-1, num_ids, num_q)  # -1 and 0 are ordinary ids, in queries too
    g_pids = rng.integers(-1, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    if integer_dist:  # many exact ties, also between matches and non-matches
        dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float32)
    else:
        dist = rng.normal(size=(num_q, num_g)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer_dist", [False, True])
def test_matches_loop_reference(seed, integer_dist):
    case = random_case(seed, integer_dist=integer_dist)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cmc, mAP = evaluate_rank(*case, max_rank=50, chunk_size=7)
    ref_cmc, ref_map = loop_reference(*case)
    assert cmc.dtype == np.float32 and cmc.shape == (50,)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(ref_map, abs=1e-9)
    assert 0 <= mAP <= 1 and np.all((cmc >= 0) & (cmc <= 1)) and np.all(np.diff(cmc) >= 0)


def test_hand_made_camera_case():
    # query pid 1 in cam 0; gallery sorted by distance below; ids 0 and -1 are just other ids.
    g_pids = np.array([1, 0, -1, 1, 2, 1])
    g_cams = np.array([0, 1, 1, 1, 1, 2])  # entry 0: same pid + same cam -> dropped
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    cmc, mAP = evaluate_rank(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=5)
    # kept list: [0, -1, 1 (match), 2, 1 (match)] -> matches at ranks 3 and 5
    np.testing.assert_allclose(cmc, [0, 0, 1, 1, 1])
    assert mAP == pytest.approx((1 / 3 + 2 / 5) / 2)
    # a query of pid 0 is scored like any other: its match (entry 1, camera 1) is at rank 2
    cmc, mAP = evaluate_rank(dist, np.array([0]), g_pids, np.array([0]), g_cams, max_rank=5)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])
    assert mAP == pytest.approx(1 / 2)


def test_skips_queries_without_match_and_warns_once():
    dist = np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.2]], dtype=np.float32)
    with pytest.warns(RuntimeWarning) as caught:
        cmc, mAP = evaluate_rank(dist, [1, 5, 0], [1, 2], [0, 0, 0], [1, 1], max_rank=50)
    messages = [str(w.message) for w in caught]
    assert sum("2 of 3 queries" in m for m in messages) == 1
    assert sum("gallery samples is quite small, got 2" in m for m in messages) == 1
    assert cmc.shape == (2,)  # cut to the gallery size
    assert mAP == 1.0
    with pytest.raises(ValueError, match="no query has a valid match"):
        evaluate_rank(dist[:2], [7, 8], [1, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="no query has a valid match"):  # only same-camera matches
        evaluate_rank(dist[:1], [1], [1, 1], [0], [0, 0])


def test_torch_input_and_chunking_agree():
    dist, qp, gp, qc, gc = random_case(7, num_q=50, num_g=90)
    ref = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10)
    got = evaluate_rank(torch.from_numpy(dist).double(), torch.from_numpy(qp), torch.from_numpy(gp),
                        torch.from_numpy(qc), torch.from_numpy(gc), max_rank=10, chunk_size=1)
    np.testing.assert_array_equal(ref[0], got[0])
    assert ref[1] == pytest.approx(got[1], abs=1e-12)


def test_input_validation():
    dist, qp, gp, qc, gc = random_case(0, num_q=4, num_g=6)
    with pytest.raises(ValueError, match="q_pids has 3 entries"):
        evaluate_rank(dist, qp[:3], gp, qc, gc)
    with pytest.raises(ValueError, match="2-D"):
        evaluate_rank(dist[0], qp, gp, qc, gc)
    with pytest.raises(TypeError, match="g_camids must hold integers"):
        evaluate_rank(dist, qp, gp, qc, gc.astype(float))
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(dist, qp, gp, qc, gc, max_rank=0)
    bad = np.array([[0.1, np.nan, 0.3], [0.2, 0.1, 0.4]], dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, [1, 1], [1, 2, 1], [0, 0], [1, 1, 1])
    t = [torch.as_tensor(a) for a in (dist, qp, gp, qc, gc)]
    with pytest.raises(ValueError, match="distmat is a meta tensor"):
        evaluate_rank(t[0].to("meta"), *t[1:])
    with pytest.raises(ValueError, match="q_pids is a meta tensor"):
        evaluate_rank(t[0], t[1].to("meta"), *t[2:])
    with pytest.raises(TypeError, match="distmat must be a dense tensor"):
        evaluate_rank(t[0].to_sparse(), *t[1:])
    with pytest.raises(ValueError, match="qf is a meta tensor"):
        evaluate_features(t[0].to("meta"), t[0], qp, qp, qc, qc)


def test_distance_matrix_and_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    d = compute_distance_matrix(qf, gf)  # torchreid's meaning: the features as given
    torch.testing.assert_close(d, torch.cdist(qf, gf) ** 2, atol=1e-4, rtol=1e-5)
    qn, gn = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    torch.testing.assert_close(compute_distance_matrix(qf, gf, normalize=True), torch.cdist(qn, gn) ** 2, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(compute_distance_matrix(qf, gf, "cosine"), 1 - qn @ gn.T)
    with pytest.raises(ValueError, match="metric"):
        compute_distance_matrix(qf, gf, "manhattan")
    path = plot_cmc({"a": (np.linspace(0.5, 1, 20), 0.4), "b": np.linspace(0.2, 1, 20)}, str(tmp_path / "cmc.png"))
    assert (tmp_path / "cmc.png").stat().st_size > 1000 and path.endswith("cmc.png")
