"""Full NFormer (4 blocks, k=20, 5 landmarks, eval) at N=2000 on the CPU: fused vs dense official.

pytest-benchmark suite; `pytest bench --benchmark-disable` runs each case once. No timing asserts.
"""
import pytest
import torch

import nformer_kernels as nk
from nformer_bench import baselines
from nformer_bench.runner import explicit_landmarks, synthetic_features

N, D, DEPTH, LANDMARKS = 2000, 256, 4, 5


@pytest.fixture(scope="module")
def x():
    return synthetic_features(N, D, "cpu", torch.float32)


@pytest.fixture(scope="module")
def landmarks():
    return explicit_landmarks(N, DEPTH, LANDMARKS)


def _timed(benchmark, model, *args, **kwargs):
    def run():
        with torch.inference_mode():
            return model(*args, **kwargs)

    return benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_nformer_fused_eval(benchmark, x, landmarks):
    model = nk.NFormer(dim=D, depth=DEPTH, num_landmarks=LANDMARKS, ffn_dim=1024).eval()
    benchmark.extra_info["backend"] = nk.get_backend(x.device)
    assert _timed(benchmark, model, x, landmarks=landmarks).shape == x.shape


def test_nformer_dense_official_eval(benchmark, x, landmarks):
    model = baselines.DenseOfficialNFormer(dim=D, depth=DEPTH, num_landmarks=LANDMARKS).eval()
    assert _timed(benchmark, model, x, landmarks=landmarks).shape == x.shape
