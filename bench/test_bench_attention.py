"""nk.neighbor_attention forward and forward+backward at N=2000 on the CPU: fused cpu backend vs the
dense reference.

pytest-benchmark suite; `pytest bench --benchmark-disable` runs each case once. No timing asserts.
"""
import pytest
import torch

import nformer_kernels as nk
from nformer_bench.runner import explicit_landmarks, synthetic_features

N, D, HEADS, K, LANDMARKS = 2000, 256, 2, 20, 5


@pytest.fixture(scope="module")
def inputs():
    x = synthetic_features(N, D, "cpu", torch.float32)[0]
    idx = nk.knn(x, K)
    keep = nk.reciprocal_mask(idx)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(N, D, generator=gen) for _ in range(3))
    return q, k, v, idx, keep, explicit_landmarks(N, 1, LANDMARKS)[0]


@pytest.fixture(params=["cpu", "reference"], autouse=True)
def backend(request):
    if request.param == "cpu" and not nk.extension_available():
        pytest.skip("the cpu backend needs the compiled extension")
    nk.set_backend(request.param)
    yield request.param
    nk.set_backend(None)


def test_neighbor_attention_forward(benchmark, inputs):
    q, k, v, idx, keep, landmarks = inputs
    benchmark.extra_info["backend"] = nk.get_backend(q.device)

    def forward():
        with torch.no_grad():
            return nk.neighbor_attention(q, k, v, idx, keep, landmarks, HEADS)

    assert benchmark(forward).shape == (N, D)


def test_neighbor_attention_forward_backward(benchmark, inputs):
    q, k, v, idx, keep, landmarks = inputs
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    benchmark.extra_info["backend"] = nk.get_backend(q.device)

    def forward_backward():
        for t in leaves:
            t.grad = None
        nk.neighbor_attention(*leaves, idx, keep, landmarks, HEADS).square().sum().backward()

    benchmark(forward_backward)
    assert all(t.grad is not None for t in leaves)
