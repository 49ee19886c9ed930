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


def reference_from_features(qf, gf, k1, k2, lambda_value):
    """loop_reference on the float64 Euclidean distances of the L2-normalised features."""
    x = np.concatenate([qf, gf]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1)
    d = np.sqrt(np.maximum(((x[:, None] - x[None]) ** 2).sum(-1), 0))
    nq = qf.shape[0]
    return loop_reference(d[:nq, nq:], d[:nq, :nq], d[nq:, nq:], k1, k2, lambda_value)


@pytest.mark.parametrize("num_q,num_g,k1,k2", [(1, 13, 3, 2), (7, 33, 2, 1), (13, 31, 9, 5), (5, 6, 4, 11)])
@pytest.mark.parametrize("lambda_value", [0.0, 0.3, 1.0])
def test_sparse_odd_sizes_k2_one_and_lambda_ends(num_q, num_g, k1, k2, lambda_value):
    qf, gf, q_g, q_q, g_g = clustered_features(num_q * 7 + num_g, num_q, num_g)
    ref = loop_reference(q_g, q_q, g_g, k1, k2, lambda_value)
    got = re_ranking_sparse(qf, gf, k1, k2, lambda_value, pair_budget=num_g + 3)  # several query chunks
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    if lambda_value == 1.0:  # no Jaccard term: od itself
        np.testing.assert_allclose(got, re_ranking(q_g, q_q, g_g, k1, k2, 1.0, dtype=np.float64), atol=1e-6)


def test_sparse_with_duplicate_features():
    qf, gf, _, _, _ = clustered_features(21, 8, 40)
    gf[5] = qf[2]  # a query that is also in the gallery
    gf[17] = gf[30]  # two identical gallery images
    got = re_ranking_sparse(qf, gf, 6, 3, 0.3)
    np.testing.assert_allclose(got, reference_from_features(qf, gf, 6, 3, 0.3), rtol=0, atol=1e-6)


def tied_features(seed, n, dim=12, nonzeros=4):
    """Distinct rows with `nonzeros` entries of +-1: unit rows of +-0.5 after normalisation, so
    every dot product and squared distance is exact in float32 and float64 and most of them tie."""
    rng = np.random.default_rng(seed)
    rows = set()
    while len(rows) < n:
        row = np.zeros(dim, dtype=np.int8)
        row[rng.choice(dim, nonzeros, replace=False)] = rng.choice([-1, 1], nonzeros)
        rows.add(row.tobytes())
    x = np.stack([np.frombuffer(r, dtype=np.int8) for r in sorted(rows)]).astype(np.float32)
    return x[rng.permutation(n)]


@pytest.mark.parametrize("k1,k2", [(5, 3), (8, 1), (2, 2)])
def test_sparse_breaks_exact_ties_by_index_as_the_reference(k1, k2):
    x = tied_features(k1, 45)
    got = re_ranking_sparse(x[:9], x[9:], k1, k2, 0.3, pair_budget=50)
    np.testing.assert_allclose(got, reference_from_features(x[:9], x[9:], k1, k2, 0.3), rtol=0, atol=1e-6)


def test_sparse_identical_features_follow_the_documented_convention():
    same = np.full((12, 5), 3.0, dtype=np.float32)  # normalises exactly: every distance is 0
    got = re_ranking_sparse(same[:4], same[4:], k1=3, k2=2, lambda_value=0.4)
    assert got.shape == (4, 8) and np.isfinite(got).all()
    assert (got >= 0).all() and (got <= 0.6 + 1e-6).all()  # od = 0: (1 - lambda) * jaccard
    np.testing.assert_allclose(re_ranking_sparse(same[:4], same[4:], k1=3, k2=2, lambda_value=1.0), 0, atol=1e-6)


def brute_max_sq_dist(x):
    x = x.double()
    return torch.cdist(x, x).pow(2).amax(1)


@pytest.mark.parametrize("num_q,block_rows,tile_cols", [(0, 4, 4), (5, 3, 5), (11, 4, 7), (27, 64, 64)])
def test_max_distance_pass_matches_brute_force_over_many_tiles(num_q, block_rows, tile_cols):
    from nformer_reid.rerank import _max_sq_dist_pass

    x = torch.nn.functional.normalize(torch.randn(27, 6, generator=torch.Generator().manual_seed(num_q)), dim=1)
    x[[3, 20]] = 0  # zero rows: d2(i, zero) = |x_i|^2, not 2 - 2 cos
    sq = (x.double() ** 2).sum(1)
    max_d2, t_qg = _max_sq_dist_pass(x, sq.float(), num_q, True, block_rows, tile_cols)
    torch.testing.assert_close(max_d2, brute_max_sq_dist(x), rtol=0, atol=1e-6)
    want = sq[None, num_q:] - 2 * x[:num_q].double() @ x[num_q:].double().T  # d2 = sq_i + t
    torch.testing.assert_close(t_qg.double(), want, rtol=0, atol=1e-6)
    zeros = torch.zeros(9, 6)
    max_d2, t_qg = _max_sq_dist_pass(zeros, zeros[:, 0], 4, True)
    assert not max_d2.any() and not t_qg.any()


def stable_top(full, r):
    idx = np.argsort(full, axis=1, kind="stable")[:, :r]
    return idx, np.take_along_axis(full, idx, 1)


@pytest.mark.parametrize("r", [1, 7, 40, 500])
def test_sparse_topk_is_the_stable_top_of_the_full_rows(r):
    qf, gf, _, _, _ = clustered_features(8, 10, 40)
    full = re_ranking_sparse(qf, gf, 6, 3, 0.3)
    idx, dist = re_ranking_sparse(qf, gf, 6, 3, 0.3, topk=np.int64(r), pair_budget=90)
    want_idx, want_dist = stable_top(full, min(r, 40))
    assert idx.dtype == np.int64 and dist.dtype == np.float32 and idx.shape == (10, min(r, 40))
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-6)


def test_sparse_topk_keeps_the_smaller_gallery_index_among_ties():
    x = tied_features(3, 40)
    full = re_ranking_sparse(x[:6], x[6:], 4, 2, 1.0)  # lambda 1: od only, many exact ties
    assert (np.diff(np.sort(full, axis=1), axis=1) == 0).any()
    idx, dist = re_ranking_sparse(x[:6], x[6:], 4, 2, 1.0, topk=9)
    want_idx, want_dist = stable_top(full, 9)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(dist, want_dist)


def test_sparse_chunks_stream_the_full_result():
    from nformer_reid.rerank import re_ranking_sparse_chunks

    qf, gf, _, _, _ = clustered_features(4, 11, 30)
    full = re_ranking_sparse(qf, gf, 5, 3, 0.3)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        chunks = []
        for chunk in re_ranking_sparse_chunks(qf, gf, 5, 3, 0.3, pair_budget=65):
            assert torch.get_float32_matmul_precision() == "high"  # the caller's setting between slices
            chunks.append(chunk)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert chunks[0][0] == 0 and chunks[-1][1] == 11 and len(chunks) >= 6  # at most 65 // 30 rows each
    assert all(c[1] == n[0] and 1 <= c[1] - c[0] <= 2 for c, n in zip(chunks, chunks[1:]))
    np.testing.assert_allclose(np.concatenate([c[2] for c in chunks]), full, rtol=0, atol=1e-6)
    (start, stop, rows), = list(re_ranking_sparse_chunks(qf, gf[:0], 1, 1))
    assert (start, stop) == (0, 11) and rows.shape == (11, 0)
    assert list(re_ranking_sparse_chunks(qf[:0], gf, 1, 1)) == []


def test_sparse_option_validation():
    qf, gf, _, _, _ = clustered_features(0, 4, 10)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        re_ranking_sparse(qf, gf, k1=3, topk=0)
    with pytest.raises(TypeError, match="topk must be an int"):
        re_ranking_sparse(qf, gf, k1=3, topk=2.5)
    with pytest.raises(ValueError, match="knn_precision must be one of"):
        re_ranking_sparse(qf, gf, k1=3, knn_precision="fast")
    with pytest.raises(ValueError, match="pair_budget must be >= 1"):
        next(iter(__import__("nformer_reid.rerank", fromlist=["x"]).re_ranking_sparse_chunks(qf, gf, 3,
                                                                                            pair_budget=0)))
    idx, dist = re_ranking_sparse(qf[:0], gf, k1=3, topk=5)
    assert idx.shape == (0, 5) and dist.shape == (0, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("knn_precision", ["auto", "exact", "certified"])
def test_sparse_on_cuda_tensors_equals_the_cpu_result(knn_precision):
    qf, gf, _, _, _ = clustered_features(17, 30, 300, dim=32)
    cpu = re_ranking_sparse(qf, gf, 20, 6, 0.3)
    q, g = torch.from_numpy(qf).cuda(), torch.from_numpy(gf).cuda()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed by the caller: the call still runs in fp32
    try:
        got = re_ranking_sparse(q, g, 20, 6, 0.3, knn_precision=knn_precision, pair_budget=5000)
        idx, dist = re_ranking_sparse(q, g, 20, 6, 0.3, knn_precision=knn_precision, topk=25)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.get_float32_matmul_precision() == previous
    np.testing.assert_allclose(got, cpu, rtol=0, atol=1e-6)
    want_idx, want_dist = stable_top(cpu, 25)
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-6)
    assert (idx == want_idx).mean() > 0.99  # a near-tie may swap two neighbours' places
    on_cpu = re_ranking_sparse(qf, gf, 20, 6, 0.3, device="cuda")  # numpy in, device= picks the GPU
    np.testing.assert_allclose(on_cpu, cpu, rtol=0, atol=1e-6)
