"""knn(precision="certified"): fp16 candidates, canonical re-scoring, a per-row certificate, and an
exact rescan of the rows it cannot prove. Always the canonical answer: identical indices to
precision="exact" (tests/test_knn_identity.py checks every data kind and backend), the fp64
brute-force top-k similarities on adversarial data, with the fallback path forced; its stats."""
import pytest
import torch

import nformer_kernels as nk
from tests.helpers import assert_knn, gapped_rows, randn


def clustered(n, d, ids, noise, seed=0):
    centres = randn((ids, d), seed=seed)
    members = torch.randint(0, ids, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return centres[members] + noise * randn((n, d), seed=seed + 2)


def unit64(x):
    return torch.nn.functional.normalize(x.double(), dim=-1)


@pytest.mark.parametrize("margin", [0, 4, None])
@pytest.mark.parametrize("shape,k", [((1, 150, 24), 20), ((2, 61, 16), 7), ((1, 40, 8), 40), ((1, 57, 16), 20)])
def test_identical_to_exact_on_tie_free_data(backend, shape, k, margin):
    backend.skip_dtype(torch.float64)
    b, n, d = shape
    if backend.slow and (b * n > 64 or k == n or margin == 4):
        pytest.skip("the interpreted/emulated kernels take the (1, 57, 16) cases only (slow)")
    x = backend.tensor(gapped_rows(b, n, d, k, seed=n))
    idx, stats = nk.knn(x, k, precision="certified", margin=margin, return_stats=True)
    assert torch.equal(idx, nk.knn(x, k, precision="exact"))
    assert stats.precision == "certified" and stats.rows == b * n
    assert stats.certified_rows + stats.rows_recomputed == b * n
    if margin == 0 and k < n:
        assert stats.rows_recomputed > 0  # the fallback path ran, and gave the exact answer


@pytest.mark.parametrize("kind", ["near-duplicates", "duplicates", "reid-like"])
def test_exact_on_adversarial_data(backend, kind):
    n = 60 if backend.slow else 1200
    if kind == "near-duplicates":
        x = clustered(n, 32, n // 30, 1e-4)
    elif kind == "duplicates":
        x = torch.cat([randn((n // 3, 32), seed=4)] * 3)
    else:
        x = clustered(n, 32, n // 8, 0.5)
    x = backend.tensor(x)
    if backend.slow and kind != "duplicates":
        pytest.skip("the interpreted/emulated kernels take the duplicates case only (slow)")
    for margin in (0, 12):
        idx = nk.knn(x, 20, precision="certified", margin=margin)
        assert_knn(unit64(x)[None], idx[None], 20, atol=2e-7)
        if kind == "duplicates":  # exact ties: the smaller index first, as the dense reference
            with nk.use_backend("reference"):
                assert torch.equal(idx, nk.knn(x, 20, precision="exact"))


@pytest.mark.backends("reference", "torch", "cpu")
def test_float64_input_is_certified_in_float64(backend):
    x = gapped_rows(1, 90, 12, 9, seed=5, dtype=torch.float64)
    idx, stats = nk.knn(x, 9, precision="certified", return_stats=True)
    assert torch.equal(idx, nk.knn(x, 9, precision="exact")) and stats.certified_rows > 0


@pytest.mark.backends("reference", "cpu")
def test_auto_and_half_inputs(backend):
    x = gapped_rows(1, 50, 8, 5, seed=2)[0]
    _, stats = nk.knn(x, 5, return_stats=True)
    assert stats.precision == ("certified" if x.is_cuda else "exact")  # auto: certified for fp32 on CUDA
    idx, stats = nk.knn(x.half(), 5, precision="certified", return_stats=True)
    assert stats.precision == "certified" and stats.certified_rows > 0  # fp16 input: two stages as well
    assert torch.equal(idx, nk.knn(x.half(), 5, precision="exact"))
    assert nk.NFormer(dim=8, depth=1, topk=5, knn_precision="exact").knn_precision == "exact"


def test_bad_precision_arguments():
    x = randn((10, 4))
    with pytest.raises(ValueError, match="precision must be one of"):
        nk.knn(x, 3, precision="fast")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        nk.knn(x, 3, precision="certified", margin=-1)
    with pytest.raises(TypeError, match="margin must be an int"):
        nk.knn(x, 3, precision="certified", margin=1.5)
    with pytest.raises(ValueError, match="knn_precision"):
        nk.NFormer(dim=8, depth=1, knn_precision="fast")
