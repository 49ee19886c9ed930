"""k-reciprocal re-ranking on the CPU: re_ranking_sparse (full matrix and topk=50) vs the dense
re_ranking at a Market-1501-like shape scaled down (Q = 337, G = 1591, d = 256).

pytest-benchmark suite; `pytest bench --benchmark-disable` runs each case once. No timing asserts:
the Market-1501-size speed-up is measured by `nformer-bench rerank --dense` (one child process
per method, peak RSS included).
"""
import numpy as np
import pytest
import torch

from nformer_bench.runner import synthetic_features
from nformer_reid.rerank import re_ranking, re_ranking_sparse

Q, G = 337, 1591


@pytest.fixture(scope="module")
def features():
    x = synthetic_features(Q + G, 256, "cpu", torch.float32)[0]
    return x[:Q], x[Q:]


@pytest.fixture(scope="module")
def distances(features):
    q, g = (torch.nn.functional.normalize(t, dim=1) for t in features)
    return torch.cdist(q, g).numpy(), torch.cdist(q, q).numpy(), torch.cdist(g, g).numpy()


def test_rerank_sparse(benchmark, features):
    out = benchmark(re_ranking_sparse, *features)
    assert out.shape == (Q, G)


def test_rerank_sparse_topk(benchmark, features):
    idx, dist = benchmark(re_ranking_sparse, *features, topk=50)
    assert idx.shape == dist.shape == (Q, 50)


def test_rerank_dense(benchmark, distances, features):
    out = benchmark.pedantic(re_ranking, args=distances, rounds=1, iterations=1)
    np.testing.assert_allclose(out, re_ranking_sparse(*features), rtol=0, atol=1e-5)
