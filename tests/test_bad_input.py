"""Module and checkpoint arguments: a clear TypeError/ValueError naming the argument, never a
silently wrong model; numpy integer scalars count as ints."""
import numpy as np
import pytest
import torch

import nformer_kernels as nk
from nformer_bench.baselines import random_official_state_dict
from tests.helpers import randn


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(depth=-1), ValueError, "depth must be >= 1"),
    (dict(depth=0), ValueError, "depth must be >= 1"),
    (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(dim=32, num_heads=3), ValueError, "divisible by num_heads"),
    (dict(topk=0), ValueError, "topk must be >= 1"),
    (dict(num_landmarks=0), ValueError, "num_landmarks must be >= 1"),
    (dict(dropout=2.0), ValueError, "dropout must be a probability"),
    (dict(dim=32.0), TypeError, "dim must be an int"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(inference_chunk_rows=0), ValueError, "inference_chunk_rows must be >= 1"),
])
def test_nformer_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        nk.NFormer(**kwargs)


def test_numpy_integers_are_ints():
    x = randn((30, 8), seed=1)
    assert torch.equal(nk.knn(x, np.int64(4)), nk.knn(x, 4))
    model = nk.NFormer(dim=8, depth=np.int32(1), num_heads=np.int64(2), topk=np.int16(5)).eval()
    assert model(x).shape == x.shape


def test_query_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match="query_mask must have shape"):
        nk.knn(randn((10, 3)), 3, query_mask=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_mask must be a bool tensor"):
        nk.knn(randn((10, 3)), 3, query_mask=[True] * 10)


def test_nformer_query_mask_and_landmarks_name_the_argument():
    model = nk.NFormer(dim=8, depth=1, topk=3).eval()
    x = randn((10, 8))
    with pytest.raises(TypeError, match="query_mask must be a bool tensor, got list"):
        model(x, query_mask=[False] * 10)
    with pytest.raises(ValueError, match="query_mask must have shape"):
        model(x, query_mask=torch.zeros(3, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"landmarks must be a \(depth, l\) int64 tensor.*shape \(\)"):
        model(x, landmarks=torch.tensor(3))
    with pytest.raises(TypeError, match="landmarks must be"):
        model(x, landmarks=3)


def test_library_leftovers():
    """Zero feature columns, input of another dtype than the model, meta tensors, list weights."""
    with pytest.raises(ValueError, match=r"x must have at least one feature column, got shape \(5, 0\)"):
        nk.knn(torch.empty(5, 0), 2)
    model = nk.NFormer(dim=8, depth=1, topk=3).eval()
    x = randn((10, 8))
    lm = torch.tensor([[0, 1, 2, 3, 4]])
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # cast to the model's dtype
        out = model(x.to(dtype), landmarks=lm)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, model(x.to(dtype).float(), landmarks=lm), rtol=0, atol=0)
    P, R = nk.landmark_factors(*(t.to("meta") for t in (x, x, x[:2], x[:2])), 2)  # shapes only
    assert P.device.type == "meta" and P.shape == (10, 2, 2) and R.shape == (10, 2, 2)
    with pytest.raises(TypeError, match=r"state_dict\['h.0.attn.c_attn.w'\] must be a tensor, got list"):
        nk.NFormer.from_official({"h.0.attn.c_attn.w": [1, 2]})


def _first(sd, suffix):
    return next(key for key in sd if key.endswith(suffix))


def test_official_checkpoint_refusals():
    sd = random_official_state_dict()
    nk.NFormer.from_official(sd)  # the intact one loads
    with pytest.raises(TypeError, match="mapping"):
        nk.NFormer.from_official([("h.0.attn.c_attn.w", torch.zeros(2, 6))])
    bad = dict(sd)
    bad[_first(sd, "h.0.attn.c_attn.w")] = torch.full_like(sd[_first(sd, "h.0.attn.c_attn.w")], float("nan"))
    with pytest.raises(ValueError, match="h.0.attn.c_attn.w contains NaN or Inf"):
        nk.NFormer.from_official(bad)
    bad = dict(sd)
    bad[_first(sd, "h.0.attn.c_attn.b")] = sd[_first(sd, "h.0.attn.c_attn.b")].long()
    with pytest.raises(TypeError, match="h.0.attn.c_attn.b must be floating point"):
        nk.NFormer.from_official(bad)
    without_first = {key: val for key, val in sd.items() if not key.startswith("nformer.h.0.")}
    with pytest.raises(ValueError, match="h.0.attn.c_attn.w"):
        nk.NFormer.from_official(without_first)
    sd4 = random_official_state_dict(depth=4)
    without_middle = {key: val for key, val in sd4.items() if not key.startswith("nformer.h.2.")}
    with pytest.raises(ValueError, match=r"blocks \[0, 1, 3\] but not \[2\]"):
        nk.NFormer.from_official(without_middle)


def test_official_checkpoint_expected_size():
    sd = random_official_state_dict(dim=32, depth=2)
    assert nk.NFormer.from_official(sd, dim=32, depth=np.int64(2)).depth == 2
    with pytest.raises(ValueError, match="depth=2, but depth=4 was asked for"):
        nk.NFormer.from_official(sd, depth=4)
    with pytest.raises(ValueError, match="dim=32, but dim=256 was asked for"):
        nk.NFormer.from_official(sd, dim=256)
