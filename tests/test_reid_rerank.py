"""k-reciprocal re-ranking: dense and sparse versions against a loop transcription of the
original algorithm (Zhong et al. CVPR 2017, as published in torchreid's rerank.py)."""
import numpy as np
import pytest
import torch

from nformer_reid.rerank import re_ranking, re_ranking_sparse


def loop_reference(q_g, q_q, g_g, k1, k2, lambda_value, stats=None):
    """The published algorithm, literally, in float64 (stable neighbour order); a column whose
    maximum is 0 (identical items) normalises to 0, the documented convention for that 0/0."""
    num_q = q_g.shape[0]
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    col_max = dist.max(axis=0)
    dist = (dist / np.where(col_max > 0, col_max, 1)).T
    n = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")
    kh = int(np.around(k1 / 2.0)) + 1

    def reciprocal(i, k):
        return [j for j in rank[i, :k] if i in rank[j, :k]]

    V = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1 + 1)
        expansion = set(r)
        for c in r:
            rc = reciprocal(c, kh)
            accepted = len(set(rc) & set(r)) > 2.0 / 3 * len(rc)
            if stats is not None:
                stats["accepted" if accepted else "rejected"] += 1
            if accepted:
                expansion |= set(rc)
        members = sorted(expansion)
        w = np.exp(-dist[i, members])
        V[i, members] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((num_q, n))
    for i in range(num_q):
        for j in range(n):
            s = np.minimum(V[i], V[j]).sum()
            jaccard[i, j] = 1 - s / (2 - s)
    return (jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value)[:, num_q:]


def clustered_features(seed, num_q, num_g, dim=16, num_ids=10, noise=0.7):
    """Unit features around identity centres: ties-free, with real k-reciprocal structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    x = centres[rng.integers(0, num_ids, num_q + num_g)] + noise * rng.normal(size=(num_q + num_g, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    d = np.sqrt(np.maximum(((x64[:, None] - x64[None]) ** 2).sum(-1), 0))
    return x[:num_q], x[num_q:], d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


CASES = [(10, 50, 20, 6), (15, 60, 5, 3), (8, 40, 7, 1), (12, 70, 4, 2), (6, 45, 11, 6)]


@pytest.mark.parametrize("num_q,num_g,k1,k2", CASES)
def test_dense_and_sparse_equal_reference(num_q, num_g, k1, k2):
    qf, gf, q_g, q_q, g_g = clustered_features(num_q + k1, num_q, num_g)
    stats = {"accepted": 0, "rejected": 0}
    ref = loop_reference(q_g, q_q, g_g, k1, k2, 0.3, stats)
    assert stats["accepted"] > 0  # the expansion step is exercised
    dense64 = re_ranking(q_g, q_q, g_g, k1, k2, 0.3, dtype=np.float64)
    np.testing.assert_allclose(dense64, ref, rtol=0, atol=1e-6)
    dense32 = re_ranking(q_g, q_q, g_g, k1, k2, 0.3)
    assert dense32.dtype == np.float32
    np.testing.assert_allclose(dense32, ref, rtol=0, atol=1e-5)
    sparse = re_ranking_sparse(torch.from_numpy(qf), torch.from_numpy(gf), k1, k2, 0.3, pair_budget=300)
    assert sparse.dtype == np.float32 and sparse.shape == (num_q, num_g)
    np.testing.assert_allclose(sparse, ref, rtol=0, atol=1e-6)


def test_expansion_rejections_are_exercised():
    stats = {"accepted": 0, "rejected": 0}
    _, _, q_g, q_q, g_g = clustered_features(3, 10, 60, noise=1.2)
    loop_reference(q_g, q_q, g_g, 20, 6, 0.3, stats)
    assert stats["rejected"] > 0 and stats["accepted"] > 0


def test_sparse_accepts_numpy_and_unnormalised_features():
    qf, gf, q_g, q_q, g_g = clustered_features(11, 9, 40)
    scale = np.linspace(0.5, 3, qf.shape[0] + gf.shape[0], dtype=np.float32)[:, None]
    got = re_ranking_sparse(qf * scale[:9], gf * scale[9:], k1=6, k2=3, lambda_value=0.5)
    np.testing.assert_allclose(got, loop_reference(q_g, q_q, g_g, 6, 3, 0.5), rtol=0, atol=1e-6)


def test_lambda_one_is_the_normalised_original_distance():
    qf, gf, q_g, q_q, g_g = clustered_features(5, 5, 30)
    d2 = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    expected = (d2 / d2.max(axis=0)).T[:5, 5:]
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, 5, 2, 1.0, dtype=np.float64), expected, atol=1e-12)
    np.testing.assert_allclose(re_ranking_sparse(qf, gf, 5, 2, 1.0), expected, atol=1e-6)


def test_validation():
    qf, gf, q_g, q_q, g_g = clustered_features(0, 4, 10)
    with pytest.raises(ValueError, match="must not exceed"):
        re_ranking_sparse(qf, gf, k1=20)
    with pytest.raises(ValueError, match="shapes do not fit"):
        re_ranking(q_g, q_q[:3, :3], g_g, k1=3)
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        re_ranking(q_g, q_q, g_g, k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking_sparse(qf, gf, k1=3, lambda_value=1.5)
    with pytest.raises(ValueError, match=r"\(Q,d\) and \(G,d\)"):
        re_ranking_sparse(qf, gf[:, :5], k1=3)
