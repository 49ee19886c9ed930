"""knn at N=2000 on the CPU: nk.knn (automatic backend) vs chunked torch.mm + topk vs faiss.

pytest-benchmark suite; `pytest bench --benchmark-disable` runs each case once. No timing asserts.
"""
import pytest
import torch

import nformer_kernels as nk
from nformer_bench import baselines
from nformer_bench.runner import synthetic_features

N, K = 2000, 20


@pytest.fixture(scope="module")
def x():
    return synthetic_features(N, 256, "cpu", torch.float32)[0]


def test_knn_fused(benchmark, x):
    benchmark.extra_info["backend"] = nk.get_backend(x.device)
    idx = benchmark(nk.knn, x, K)
    assert idx.shape == (N, K)


def test_knn_torch_chunked(benchmark, x):
    idx = benchmark(baselines.knn_torch_chunked, x, K)
    assert idx.shape == (N, K)


def test_knn_faiss(benchmark, x):
    pytest.importorskip("faiss")
    x_np = torch.nn.functional.normalize(x, dim=1).numpy()
    idx = benchmark(baselines.knn_faiss, x_np, K, torch.get_num_threads())
    assert idx.shape == (N, K)
