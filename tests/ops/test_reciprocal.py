"""reciprocal_mask and reverse_index: every backend's batched kernels (contract: csrc/ops.cpp) against
the reference and their loop definitions, nk.reciprocal_mask under the active backend, bad input."""
import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import reference
from tests.conftest import EMULATED, INTERPRETED, VS_REFERENCE, fast_and
from tests.helpers import brute_reciprocal, knn_graph, random_idx, random_neighbours, ties_free

NEIGHBOUR_LISTS = {
    "knn": knn_graph,  # knn of random points: self first, many reciprocal pairs
    "random": random_neighbours,  # self first, otherwise random: few reciprocal pairs
    "unordered": random_idx,  # distinct ids, no self-first structure
}


def lists(B, N, k, *slow):
    return pytest.param(B, N, k, marks=fast_and(*slow))


@pytest.mark.backends(*VS_REFERENCE)
@pytest.mark.parametrize("source", ["knn", pytest.param("random", marks=fast_and(EMULATED)), "unordered"])
@pytest.mark.parametrize("B,N,k", [
    lists(1, 1, 1, EMULATED, INTERPRETED), lists(2, 37, 1, INTERPRETED), lists(3, 37, 5, EMULATED, INTERPRETED),
    lists(1, 70, 16, INTERPRETED), lists(3, 37, 37, EMULATED, INTERPRETED), lists(1, 70, 70, INTERPRETED),
    lists(3, 120, 20), lists(2, 200, 9, EMULATED), lists(1, 64, 64, EMULATED), lists(2, 300, 20, EMULATED),
    lists(2, 1031, 20), lists(3, 1, 1), lists(1, 37, 5), lists(1, 37, 37), lists(1, 120, 20)])
def test_reciprocal_mask_and_reverse_index_kernels(backend, B, N, k, source):
    """keep equals the reference; reverse_index too, for keep and for two random subsets of it."""
    idx = NEIGHBOUR_LISTS[source](B, N, k, seed=4, device=backend.device)
    keep = backend.kernel("reciprocal_mask")(idx)
    assert keep.dtype == torch.bool and keep.shape == idx.shape
    assert torch.equal(keep, reference.reciprocal_mask(idx))
    g = torch.Generator().manual_seed(5)
    for kp in (keep, keep & backend.tensor(torch.rand(keep.shape, generator=g) < 0.7),
               keep & backend.tensor(torch.rand(keep.shape, generator=g) < 0.5)):
        rev = backend.kernel("reverse_index")(idx, kp)
        assert rev.dtype == torch.int64 and torch.equal(rev, reference.reverse_index(idx, kp))


def test_reverse_index_definition(backend):
    """rev[j,t'] = t with idx[i,t] == j and keep[i,t] for i = idx[j,t'], else -1, by loops."""
    idx = knn_graph(1, 30, 6, seed=0, device=backend.device)
    keep = backend.kernel("reciprocal_mask")(idx)
    assert torch.equal(keep[0].cpu(), brute_reciprocal(idx[0].cpu()))
    rev = backend.kernel("reverse_index")(idx, keep)
    idx, keep, rev = idx.cpu(), keep.cpu(), rev.cpu()
    for j in range(30):
        for tp in range(6):
            i = idx[0, j, tp].item()
            t = rev[0, j, tp].item()
            if t >= 0:
                assert idx[0, i, t] == j and keep[0, i, t]
            else:
                assert not any(idx[0, i, s] == j and keep[0, i, s] for s in range(6))
    assert int((rev >= 0).sum()) == int(keep.sum())


@pytest.mark.backends("cpu")
def test_reciprocal_cpu_rejects_bad_calls(backend):
    idx = knn_graph(1, 10, 3)
    bad = idx.clone()
    bad[0, 2, 1] = 10
    with pytest.raises(RuntimeError, match=r"\[0, N\)"):
        backend.kernel("reciprocal_mask")(bad)
    with pytest.raises(RuntimeError, match="int64"):
        backend.kernel("reciprocal_mask")(idx.int())
    with pytest.raises(RuntimeError, match="keep"):
        backend.kernel("reverse_index")(idx, torch.ones(1, 10, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- public API
def test_reciprocal_mask(backend):
    x = backend.tensor(ties_free(45, 6, batch=2))
    idx = nk.knn(x, 9)
    keep = nk.reciprocal_mask(idx)
    assert keep.dtype == torch.bool and keep.shape == idx.shape and keep.device == idx.device
    for b in range(2):
        assert torch.equal(keep[b].cpu(), brute_reciprocal(idx[b].cpu()))
    assert keep[..., 0].all()  # self is always its own reciprocal neighbour


@pytest.mark.parametrize("call,match", [
    (lambda: nk.reciprocal_mask(torch.tensor([[0, 1], [1, 1]])), "idx repeats"),
    (lambda: nk.reciprocal_mask(torch.tensor([[0, 5], [1, 0]])), "idx has entries"),
    (lambda: nk.reciprocal_mask(torch.zeros(2, 3, dtype=torch.long)), "idx has 3"),
], ids=["repeats", "out_of_range", "k_above_n"])
def test_reciprocal_mask_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_reciprocal_mask_check_inputs_false_skips_only_the_value_checks():
    """For lists built by knn (NFormer, re-ranking): the O(N*k log k) checks are skipped; the
    shape and dtype checks are not."""
    repeats = torch.tensor([[0, 1], [1, 1]])
    assert nk.reciprocal_mask(repeats, check_inputs=False).shape == (2, 2)
    with pytest.raises(ValueError, match="idx has 3"):
        nk.reciprocal_mask(torch.zeros(2, 3, dtype=torch.long), check_inputs=False)
    with pytest.raises(TypeError, match="int64"):
        nk.reciprocal_mask(repeats.int(), check_inputs=False)
