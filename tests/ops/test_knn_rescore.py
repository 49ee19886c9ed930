"""knn_rescore, stage 2 of the two-stage knn: every backend's batched kernel (contract: csrc/ops.cpp)
against the spec, torch_ops.rescore_candidates, index for index and flag for flag: the canonical
score has the same bits on every backend, so flags agree even on the certificate's boundary.
On tie-free Gaussian rows, integer-valued rows with exact duplicates (ties broken by the smaller
index) and near-duplicate rows (ties within fp32 rounding); the two-stage knn dispatching its
stage 2 to the active backend; schemas and fake kernels; bad calls the kernels refuse.
The emulated and interpreted cases (slow) take the small shapes only.
"""
import logging

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import backends, torch_ops
from tests.helpers import gapped_rows, register_counting_backend, unit_rows

EMULATED, INTERPRETED = "cuda-emulated", "triton-interpreted"
TRITON_MAX_CANDIDATES = 64  # nformer_kernels.triton.knn_rescore.MAX_CANDIDATES
SLOW_MAX_ROWS = 120  # B*N the interpreted/emulated cases take
FLOATS = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]  # fp64: rounded to fp32


def candidates_for(b, n, kc, seed=0, device="cpu"):
    """(B,N,K') int64 as stage 1 gives them: self first, then K'-1 distinct other rows in any order."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((b, n, kc), dtype=torch.int64)
    for bi in range(b):
        for i in range(n):
            others = torch.randperm(n - 1, generator=g)[:kc - 1]
            out[bi, i, 0] = i
            out[bi, i, 1:] = others + (others >= i).long()
    return out.to(device)


def margins_off_the_boundary(x, candidates, k):
    """(B,N) margins 0.5x or 1.5x the row's gap s_(k) - s(last candidate) (fp64 from x's values),
    0.25 where the gap is under 1e-3 or infinite: rows on both sides of the certificate."""
    b, n, _ = candidates.shape
    idx, _ = torch_ops.rescore_candidates(x.double(), candidates, k, x.new_zeros((b, n), dtype=torch.float64))
    xd = x.double()
    bidx = torch.arange(b, device=x.device).view(b, 1)
    rows = torch.arange(n, device=x.device).view(1, n)
    score = lambda j: (xd * xd[bidx, j]).sum(-1)  # noqa: E731
    kth = torch.where(idx[..., k - 1] == rows, float("inf"), score(idx[..., k - 1]))
    gap = kth - score(candidates[..., -1])
    factor = torch.where(rows % 2 == 0, 0.5, 1.5).expand(b, n)
    return torch.where(gap.isfinite() & (gap.abs() > 1e-3), gap.abs() * factor, torch.full_like(gap, 0.25))


def assert_matches_spec(backend, x, candidates, k, margin, *, mixed=True):
    idx, certified = backend.kernel("knn_rescore")(x, candidates, k, margin)
    want_idx, want_cert = torch_ops.rescore_candidates(x, candidates, k, margin)
    assert idx.dtype == torch.int64 and certified.dtype == torch.bool
    assert idx.shape == want_idx.shape and certified.shape == want_cert.shape
    assert torch.equal(idx, want_idx)
    assert torch.equal(certified, want_cert)
    if mixed and 1 < k < candidates.shape[2] < x.shape[1]:  # both sides of the certificate exercised
        assert bool(want_cert.any()) and not bool(want_cert.all())


def skip_large(backend, rows):
    if backend.slow and rows > SLOW_MAX_ROWS:
        pytest.skip(f"the interpreted/emulated kernels take B*N <= {SLOW_MAX_ROWS} only (slow)")


SHAPES = [  # B, N, d, k, K': one row, B > 1 and odd d, K' = N = k, K' = k, the default K' = 32, k = 1,
    # then larger ones and K' above the triton limit
    (1, 1, 4, 1, 1), (2, 37, 13, 5, 17), (1, 37, 13, 37, 37), (1, 50, 8, 7, 7), (2, 60, 33, 20, 32), (1, 45, 9, 1, 12),
    (3, 300, 64, 20, 32), (2, 500, 256, 20, 64), (1, 200, 24, 50, 100)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}N{}d{}k{}K'{}".format(*s))
def test_matches_spec_on_tie_free_rows(backend, dtype, shape):
    backend.skip_dtype(dtype)
    b, n, d, k, kc = shape
    skip_large(backend, b * n)
    if backend.name == "triton" and kc > TRITON_MAX_CANDIDATES:
        pytest.skip(f"the triton knn_rescore takes K' <= {TRITON_MAX_CANDIDATES} (resolve sends larger K' to torch)")
    x = unit_rows((b, n, d), dtype, seed=n + d, device=backend.device)
    candidates = candidates_for(b, n, kc, seed=d, device=backend.device)
    assert_matches_spec(backend, x, candidates, k, margins_off_the_boundary(x, candidates, k))


def integer_rows_with_duplicates(b, n, d, copies, seed):
    """(B, N*copies, d) rows of small integers (exact scores), each row repeated `copies` times."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (b, n, d), generator=g).double()
    return torch.cat([base] * copies, dim=1)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(2, 15, 5, 3, 6, 16), (1, 20, 3, 2, 8, 40), (2, 100, 8, 3, 20, 32)],
                         ids=lambda s: "B{}N{}d{}x{}k{}K'{}".format(*s))  # B, N (before the copies), d, copies, k, K'
def test_matches_spec_on_exact_duplicates(backend, dtype, shape):
    """Exact ties (duplicated rows and equal integer scores): the smaller index first, as the spec."""
    backend.skip_dtype(dtype)
    b, n, d, copies, k, kc = shape
    skip_large(backend, b * n * copies)
    x = backend.tensor(integer_rows_with_duplicates(b, n, d, copies, seed=n).to(dtype))
    candidates = candidates_for(b, n * copies, kc, seed=d, device=backend.device)
    g = torch.Generator().manual_seed(1)
    margin = backend.tensor((torch.randint(0, 3, (b, n * copies), generator=g) + 0.5).double())  # never on a tie
    assert_matches_spec(backend, x, candidates, k, margin, mixed=False)


@pytest.mark.backends("reference", "torch", "cpu", EMULATED, INTERPRETED, "cuda", "triton")
def test_repeated_candidate_ids(backend):
    """Beyond what stage 1 hands over (distinct ids): a repeated id keeps both slots, as the spec."""
    x = backend.tensor(integer_rows_with_duplicates(1, 12, 4, 2, seed=3).float())
    candidates = candidates_for(1, 24, 8, seed=2, device=backend.device)
    candidates[..., 5] = candidates[..., 3]
    margin = torch.full((1, 24), 0.5, dtype=torch.float64, device=backend.device)
    assert_matches_spec(backend, x, candidates, 6, margin, mixed=False)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")])
def test_half_inputs(backend, dtype):
    """fp16/bf16: the canonical scores of the values (exact in fp32), as the spec."""
    x = backend.tensor(integer_rows_with_duplicates(2, 20, 6, 2, seed=4).to(dtype))
    candidates = candidates_for(2, 40, 12, seed=5, device=backend.device)
    margin = backend.tensor(torch.randint(0, 3, (2, 40), generator=torch.Generator().manual_seed(6)) + 0.5).double()
    assert_matches_spec(backend, x, candidates, 9, margin, mixed=False)


def test_near_duplicates_identical_on_the_boundary(backend):
    """Rows that differ by 1e-7 (scores within fp32 rounding of each other) and margins set to the
    gap itself: every backend's canonical scores, order and flags are the spec's, bit for bit."""
    from nformer_kernels import canonical

    b, n, d, k, kc = (1, 40, 24, 5, 12) if backend.slow else (2, 300, 40, 20, 31)  # K' = 4*7 + 2 + 1: every cpu batch
    g = torch.Generator().manual_seed(9)
    base = torch.randn((b, n // 4, d), generator=g)
    x = canonical.canonical_rows(base.repeat(1, 4, 1) + 1e-7 * torch.randn((b, n, d), generator=g))
    candidates = candidates_for(b, n, kc, seed=3)
    xd = canonical.canonical_scores(x[:, :, None], x[torch.arange(b)[:, None, None], candidates])
    margin = (xd[..., k - 1] - xd[..., -1]).abs()  # on the boundary where the order of the sum matters
    x, candidates, margin = backend.tensor(x), backend.tensor(candidates), backend.tensor(margin)
    assert_matches_spec(backend, x, candidates, k, margin, mixed=False)


@pytest.mark.backends("reference", "torch", "cpu", EMULATED, INTERPRETED, "cuda", "triton")
def test_stage1_candidates_with_the_certified_bound(backend):
    """The call the certified knn makes: fp16 stage-1 candidates and margin 2*eps."""
    from nformer_kernels.canonical import score_error_bound

    n, k, kc = (57, 9, 21) if backend.slow else (400, 20, 32)
    x = backend.tensor(gapped_rows(2, n, 16, k, seed=7))
    candidates = backends.kernel("reference", "knn")(x.half(), kc)
    assert_matches_spec(backend, x, candidates, k, 2 * score_error_bound(x, torch.float16), mixed=False)


def test_certified_knn_rescores_on_the_active_backend(monkeypatch):
    """Stage 1 and stage 2 both run on the selected backend's kernels."""
    calls = register_counting_backend(monkeypatch)
    x = gapped_rows(1, 60, 8, 5, seed=1)[0]
    with nk.use_backend("counting"):
        idx = nk.knn(x, 5, precision="certified")
    assert calls == ["knn", "knn_rescore"]
    with nk.use_backend("reference"):
        assert torch.equal(idx, nk.knn(x, 5, precision="exact"))


@pytest.mark.backends(INTERPRETED, "triton", EMULATED, "cuda")
def test_rescans_run_on_the_backends_own_knn_rows(backend, monkeypatch):
    """margin 0: no row can be certified, so every row is rescanned, by the backend's own streaming
    knn_rows kernel (never the torch backend); the answer is the reference's."""
    x = backend.tensor(gapped_rows(1, 40, 8, 5, seed=3, dtype=torch.float64))
    calls = []
    real = backends.kernel
    monkeypatch.setattr(backends, "kernel", lambda name, op: calls.append((name, op)) or real(name, op))
    idx = nk.knn(x, 5, precision="certified", margin=0)
    assert calls == [(backend.name, "knn_rows")]
    with nk.use_backend("reference"):
        assert torch.equal(idx.cpu(), nk.knn(x.cpu(), 5, precision="exact"))


def test_a_backend_without_knn_rows_rescans_on_the_torch_backend(monkeypatch, caplog):
    calls = register_counting_backend(monkeypatch, missing=("knn_rows",))
    x = gapped_rows(1, 40, 8, 5, seed=3)[0]
    with nk.use_backend("counting"), caplog.at_level(logging.DEBUG, logger="nformer_kernels"):
        idx = nk.knn(x, 5, precision="certified", margin=0)
    assert "the counting backend has no knn_rows kernel" in caplog.text and calls == []
    with nk.use_backend("reference"):
        assert torch.equal(idx, nk.knn(x, 5, precision="exact"))


@pytest.mark.backends("cpu", INTERPRETED, "cuda", "triton")
def test_library_op_schema_and_fake_kernel(backend):
    x = unit_rows((2, 37, 12), seed=1, device=backend.device)
    candidates = candidates_for(2, 37, 16, seed=1, device=backend.device)
    margin = torch.full((2, 37), 1e-3, dtype=torch.float64, device=backend.device)
    torch.library.opcheck(backend.kernel("knn_rescore").default, (x, candidates, 5, margin),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.backends(INTERPRETED, "triton")
def test_triton_refuses_what_it_cannot_take(backend):
    x = unit_rows((1, 80, 8), seed=2, device=backend.device)
    margin = torch.zeros((1, 80), dtype=torch.float64, device=backend.device)
    with pytest.raises(ValueError, match="outside the triton knn_rescore range"):
        backend.kernel("knn_rescore")(x, candidates_for(1, 80, 65, device=backend.device), 5, margin)
    with pytest.raises(ValueError, match="float64"):
        backend.kernel("knn_rescore")(x, candidates_for(1, 80, 16, device=backend.device), 5, margin.float())
    with pytest.raises(TypeError, match="floating point"):
        backend.kernel("knn_rescore")(x.long(), candidates_for(1, 80, 16, device=backend.device), 5, margin)


@pytest.mark.backends("cpu", "cuda")
def test_compiled_kernels_check_shapes(backend):
    x = unit_rows((1, 20, 8), seed=2, device=backend.device)
    candidates = candidates_for(1, 20, 6, device=backend.device)
    margin = torch.zeros((1, 20), dtype=torch.float64, device=backend.device)
    rescore = backend.kernel("knn_rescore")
    with pytest.raises(RuntimeError, match="k <= K'"):
        rescore(x, candidates, 7, margin)
    with pytest.raises(RuntimeError, match="margin"):
        rescore(x, candidates, 3, margin.float())
    with pytest.raises(RuntimeError, match="candidates"):
        rescore(x, candidates[:, :10], 3, margin)


@pytest.mark.skipif(not nk.triton.imported, reason="triton is not installed")
def test_triton_launcher_only_picks_listed_variants():
    """Every K' the launcher takes maps to a variant aot.py compiles (tests/test_triton_compile.py)."""
    from nformer_kernels.triton import knn_rescore
    from nformer_kernels.triton.aot import all_variants

    listed = all_variants()
    for kc in range(1, knn_rescore.MAX_CANDIDATES + 1):
        assert knn_rescore.choose_variant(kc) in listed, kc
    assert knn_rescore.MAX_CANDIDATES == TRITON_MAX_CANDIDATES == nk.triton.knn.MAX_K
