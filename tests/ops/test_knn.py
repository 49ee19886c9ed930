"""knn: every backend's batched kernel (contract: csrc/ops.cpp) against the reference and fp64 brute
force, nk.knn under the active backend against brute force, and bad input.

Tolerances and builders: tests/helpers.py. Inputs are ties-free unless a test is about ties.
The emulated and interpreted cases take small shapes (`fast_and`); the emulation's knn costs most
(a thread per CUDA thread), so the public-API tests run interpreted, not emulated.
"""
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import reference
from tests.conftest import EMULATED, INTERPRETED, fast_and, fast_only
from tests.helpers import (DTYPES, HALF_DTYPES, assert_knn, brute_knn, dtype_id, exact_tie_groups, gapped_rows,
                           lattice_rows, neighbour_sims, randn, ties_free, torch_threads, unit_rows)

# The cases checked for the reference's exact ids on gapped inputs (fp32/fp64) and its neighbour
# similarities (fp16/bf16). The GPU cases sum in other orders (FMA contraction): by similarity only.
EXACT = ("torch", "cpu", INTERPRETED)


# ----------------------------------------------------------------------------- batched kernel
def knn_shape(s, *slow):
    return pytest.param(s, marks=fast_and(*slow), id="B{}N{}d{}k{}".format(*s))


KNN_SHAPES = [  # B, N, d, k: one row, odd sizes, batch, k = N, k = 64 (the triton limit)
    knn_shape((1, 1, 4, 1), EMULATED, INTERPRETED), knn_shape((2, 37, 16, 5), EMULATED),
    knn_shape((1, 37, 13, 37), EMULATED), knn_shape((1, 200, 40, 20), EMULATED), knn_shape((1, 37, 16, 5)),
    knn_shape((3, 37, 16, 37)), knn_shape((1, 70, 8, 64)), knn_shape((2, 1031, 64, 20)),
    knn_shape((1, 300, 200, 64)), knn_shape((3, 517, 13, 7))]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", KNN_SHAPES)
def test_knn_kernel(backend, dtype, shape):
    """Self first, distinct ids, the true top-k similarities (fp64 from the input values)."""
    backend.skip_dtype(dtype)
    B, N, d, k = shape
    x = unit_rows((B, N, d), dtype, seed=N, device=backend.device)
    assert_knn(x, backend.kernel("knn")(x, k), k)


EXACT_SHAPES = [  # B, N, d, k
    knn_shape((1, 1, 8, 1), INTERPRETED), knn_shape((3, 1, 8, 1)), knn_shape((1, 37, 8, 1)), knn_shape((3, 37, 8, 1)),
    knn_shape((1, 37, 8, 5)), knn_shape((3, 37, 8, 5)), knn_shape((1, 37, 8, 37)), knn_shape((3, 37, 8, 37)),
    knn_shape((1, 300, 8, 20)), knn_shape((3, 300, 8, 20)), knn_shape((2, 37, 24, 5), INTERPRETED),
    knn_shape((1, 70, 16, 16), INTERPRETED), knn_shape((2, 70, 40, 20), INTERPRETED),
    knn_shape((1, 37, 24, 37), INTERPRETED), knn_shape((1, 70, 8, 64), INTERPRETED),
    knn_shape((1, 70, 24, 33), INTERPRETED), knn_shape((3, 90, 16, 9))]


@pytest.mark.backends(*EXACT)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", EXACT_SHAPES)
def test_knn_kernel_exact(backend, dtype, shape):
    """Gapped unit rows: the reference's ids exactly (fp32/fp64); fp16/bf16: self first, and the
    neighbours' similarities (fp64 of the rounded values) equal the reference's to 1e-6."""
    backend.skip_dtype(dtype)
    B, N, d, k = shape
    x = gapped_rows(B, N, d, k, dtype=dtype)
    idx = backend.kernel("knn")(x, k)
    ref = reference.knn(x, k)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(idx, ref)
    else:
        assert idx.dtype == torch.int64 and idx.shape == (B, N, k)
        assert torch.equal(idx[..., 0], torch.arange(N).expand(B, N))
        assert_knn(x, idx, k)
        torch.testing.assert_close(neighbour_sims(x, idx), neighbour_sims(x, ref), rtol=0, atol=1e-6)


@pytest.mark.backends(EMULATED)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,N,d,k,rows_per_block", [(1, 300, 64, 20, 128), (1, 150, 20, 64, 128), (2, 37, 16, 5, 64)])
def test_knn_kernel_wmma_tiles(backend, dtype, B, N, d, k, rows_per_block):
    """The fp16/bf16 WMMA kernel with each of its row tiles forced (the launcher picks one by N)."""
    from tests.cuda_emulation.backend import knn_with_tile

    x = unit_rows((B, N, d), dtype, seed=N)
    assert_knn(x, knn_with_tile(x, k, rows_per_block), k)


@pytest.mark.backends(EMULATED)
@pytest.mark.parametrize("rows_per_block", [64, 128])
def test_knn_kernel_wmma_tile_skip_keeps_close_candidates(backend, rows_per_block):
    """The WMMA kernel skips a column tile when no score in it beats the weakest k-th score among the
    block's rows. Rows 0-127 lie on a circle [1, 0.1 cos, 0.1 sin, 0...] (their lists fill in the
    first tile, all with the same k-th score); rows 128-383 are orthogonal to them (tile 1 is
    skipped) but for row 300, placed so that it beats rows 4-6's k-th score by ~4e-5 and nobody
    else's: a skip any less strict than the kernel's loses it. The k scores found must equal the
    true top-k (fp32 scores of the fp16 rows)."""
    from tests.cuda_emulation.backend import knn_with_tile

    n, k, c = 384, 8, 128
    phi = torch.arange(c, dtype=torch.float64) * (2 * math.pi / c)
    x = torch.zeros(n, 16, dtype=torch.float64)
    x[:c, 0], x[:c, 1], x[:c, 2] = 1, 0.1 * phi.cos(), 0.1 * phi.sin()
    x[c:, 3:8] = 0.3 * torch.randn(n - c, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = math.cos(4 * 2 * math.pi / c) + 0.004  # row 5's k-th neighbour is 4 steps away
    x[300] = 0
    x[300, 0], x[300, 1], x[300, 2] = 1, 0.1 * b * phi[5].cos(), 0.1 * b * phi[5].sin()
    x = x.half()[None]
    idx = knn_with_tile(x, k, rows_per_block)
    xf = x.float()
    s = torch.bmm(xf, xf.transpose(1, 2))
    s.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    assert torch.equal(idx[..., 0], torch.arange(n)[None])
    assert 300 in idx[0, 5].tolist()
    torch.testing.assert_close(torch.gather(s, 2, idx)[..., 1:], s.topk(k, dim=-1).values[..., 1:], rtol=0, atol=2e-6)


@pytest.mark.backends("cuda", "triton")
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B,N", [(1, 17003), (3, 6001)])
def test_knn_kernel_many_rows_per_block(backend, dtype, B, N):
    """Sizes where the CUDA fp16/bf16 kernel switches to its 128-row blocks (checked on sampled rows)."""
    x = unit_rows((B, N, 64), dtype, seed=1, device=backend.device)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:300].to(backend.device)
    assert_knn(x, backend.kernel("knn")(x, 20), 20, rows=rows)


@pytest.mark.slow
@pytest.mark.backends("cuda", "triton")
def test_knn_kernel_one_million_rows_bf16(backend):
    """N = 1,000,000, d = 256, k = 20 in bf16, against chunked fp64 mm + topk on 256 sampled rows."""
    g = torch.Generator(device=backend.device).manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn((1, 1_000_000, 256), generator=g, device=backend.device),
                                      dim=-1).to(torch.bfloat16)
    idx = backend.kernel("knn")(x, 20)
    torch.cuda.synchronize()
    rows = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(1))[:256].to(backend.device)
    assert_knn(x, idx, 20, rows=rows, atol=1e-4)


# ----------------------------------------------------------------------------- ties and duplicates
@pytest.mark.backends("reference", "torch", "cpu")  # the kernels whose knn is the canonical answer itself
@pytest.mark.parametrize("threads", [1, 2, max(3, os.cpu_count() or 1)], ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_knn_kernel_exact_ties_smaller_index_first(backend, dtype, threads):
    """Duplicate rows and zero rows: exact ties resolve to the smaller index, self stays first, on
    every CPU, BLAS, tile split and thread count (the canonical score orders near pairs)."""
    x, sim = exact_tie_groups(dtype=dtype)
    k = 40  # crosses the boundary between groups of duplicates
    want = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    with torch_threads(threads):
        got = backend.kernel("knn")(backend.tensor(x).unsqueeze(0), k)[0].cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_knn_exact_ties_smaller_index_first_on_every_backend(backend, dtype):
    """nk.knn on every backend (the two-stage path on cuda and triton): the same tie order."""
    x, sim = exact_tie_groups(n=90 if backend.slow else 203, dtype=dtype)
    k = 40
    want = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    for precision in ("exact", "certified"):
        assert torch.equal(nk.knn(backend.tensor(x), k, precision=precision).cpu(), want), precision


@fast_and(INTERPRETED)  # the emulation's ties: the test above
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_knn_kernel_lattice_ties_and_duplicate_rows(backend, dtype):
    """Exactly representable similarities (many exact ties, repeated rows): the stable order of the
    exact similarities for every k; all-equal similarities list the other rows in index order."""
    x = lattice_rows().to(dtype)
    sim = torch.bmm(x.double(), x.double().transpose(1, 2))
    sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    order = torch.sort(-sim, dim=-1, stable=True).indices
    for k in (1, 5, 16, 37):
        idx = backend.kernel("knn")(backend.tensor(x), k).cpu()
        assert_knn(x, idx, k, atol=0)
        assert torch.equal(idx, order[..., :k]), f"k={k}"
    same = torch.full((2, 20, 8), 0.5, dtype=dtype)  # all similarities equal
    expected = torch.stack([torch.tensor([i] + [j for j in range(20) if j != i][:5]) for i in range(20)])
    assert torch.equal(backend.kernel("knn")(backend.tensor(same), 6).cpu(), expected.expand(2, 20, 6))


@pytest.mark.parametrize("n,k", [(40, 7), pytest.param(40, 40, marks=fast_and(INTERPRETED))])
def test_knn_kernel_duplicate_features(backend, n, k):
    """Every vector 4 times: self first, distinct ids, no NaN, the reference's similarities, and the
    three copies of each vector are its best non-self neighbours."""
    base = unit_rows((2, 10, 6), seed=2)
    x = base.repeat_interleave(4, dim=1)[:, :n].contiguous()
    idx = backend.kernel("knn")(backend.tensor(x), k).cpu()
    assert torch.equal(idx[..., 0], torch.arange(n).expand(2, n))
    assert all(row.unique().numel() == k for row in idx.reshape(-1, k))
    sims = neighbour_sims(x, idx)
    assert not sims.isnan().any()
    torch.testing.assert_close(sims, neighbour_sims(x, reference.knn(x, k)), rtol=0, atol=1e-6)
    if k >= 4:
        assert (sims[..., 1:4] > 1 - 1e-6).all()


def test_knn_kernel_all_identical_rows(backend):
    x = unit_rows((1, 1, 5), seed=3).expand(1, 50, 5).contiguous()
    idx = backend.kernel("knn")(backend.tensor(x), 6).cpu()
    assert torch.equal(idx[..., 0], torch.arange(50)[None])
    assert all(row.unique().numel() == 6 for row in idx[0])


@pytest.mark.backends("reference", "torch", "cpu")
def test_knn_kernel_k_equals_n_multi_tile(backend):
    """k = N = 600 (several CPU tiles): a permutation per row, self first, similarities descending."""
    x = unit_rows((2, 600, 8), seed=7)
    idx = backend.kernel("knn")(x, 600)
    assert torch.equal(idx.sort(-1).values, torch.arange(600).expand(2, 600, 600))
    assert torch.equal(idx[..., 0], torch.arange(600).expand(2, 600))
    sims = neighbour_sims(x, idx)[..., 1:]
    assert (sims[..., :-1] - sims[..., 1:]).min() > -1e-6
    torch.testing.assert_close(sims, neighbour_sims(x, reference.knn(x, 600))[..., 1:], rtol=0, atol=1e-6)


@pytest.mark.backends("torch", "cpu")
def test_knn_kernel_input_that_requires_grad(backend):
    x = gapped_rows(1, 700, 8, 5).clone().requires_grad_()
    assert torch.equal(backend.kernel("knn")(x, 5), reference.knn(x.detach(), 5))


# ----------------------------------------------------------------------------- one backend's kernels
@pytest.mark.backends("cpu")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("b,n", [(2, 700), (1, 2100)])  # several tiles; 2100 with 2 threads: odd block count
def test_knn_cpu_multi_tile_schedules(backend, threads, b, n):
    x = gapped_rows(b, n, 8, 10)
    with torch_threads(threads):
        got = backend.kernel("knn")(x, 10)
    assert torch.equal(got, reference.knn(x, 10))


@pytest.mark.backends("cpu")
def test_knn_cpu_memory_is_not_quadratic(backend):
    """N = 20,000: an N x N fp32 matrix would be 1.6 GB; the kernel must stay far below."""
    script = textwrap.dedent("""
        import resource, torch, nformer_kernels
        x = torch.nn.functional.normalize(torch.randn(1, 20000, 32), dim=-1)
        torch.ops.nformer.knn(x[:, :600].contiguous(), 20)  # warm up BLAS / thread pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = torch.ops.nformer.knn(x, 20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert idx.shape == (1, 20000, 20)
        print((after - before) / 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(nk.__file__)), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    growth_mb = float(res.stdout.strip().splitlines()[-1])
    assert growth_mb < 200, f"peak RSS grew by {growth_mb:.0f} MB"


@pytest.mark.backends("cpu")
def test_knn_cpu_rejects_bad_calls(backend):
    knn = backend.kernel("knn")
    x = unit_rows((1, 10, 4))
    with pytest.raises(RuntimeError, match="k"):
        knn(x, 11)
    with pytest.raises(RuntimeError, match="k"):
        knn(x, 0)
    with pytest.raises(RuntimeError, match="float"):
        knn(x.to(torch.int32), 3)
    with pytest.raises(RuntimeError, match=r"\(B,N,d\)"):
        knn(x[0], 3)
    bad = x.clone()
    bad[0, 3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        knn(bad, 3)


@pytest.mark.backends("cuda")
def test_knn_cuda_large_k_and_errors(backend):
    knn = backend.kernel("knn")
    x = unit_rows((1, 300, 24), device="cuda")
    assert_knn(x, knn(x, 100), 100)  # beyond the public API's GPU limit: the kernel itself supports it
    with pytest.raises(RuntimeError, match="largest k"):
        knn(unit_rows((1, 5000, 8), torch.float16, device="cuda"), 5000)
    with pytest.raises(RuntimeError, match="contiguous"):
        knn(unit_rows((1, 40, 8), device="cuda").transpose(1, 2), 3)
    with pytest.raises(RuntimeError, match="k must be"):
        knn(x, 301)


@pytest.mark.backends("cuda")
def test_knn_cuda_uses_current_stream(backend):
    x = unit_rows((2, 700, 32), torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        idx = backend.kernel("knn")(x, 9)
        keep = backend.kernel("reciprocal_mask")(idx)
    stream.synchronize()
    assert_knn(x, idx, 9)
    assert torch.equal(keep, reference.reciprocal_mask(idx))


@pytest.mark.backends("triton-interpreted")
def test_knn_triton_allow_tf32_runs(backend):
    x = gapped_rows(1, 37, 24, 5)
    idx = backend.kernel("knn")(x, 5, allow_tf32=True)
    assert_knn(x, idx, 5)
    torch.testing.assert_close(neighbour_sims(x, idx), neighbour_sims(x, reference.knn(x, 5)), rtol=0, atol=1e-5)


@pytest.mark.backends("triton-interpreted", "triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [24, 64])
def test_knn_triton_resident_query_variant(backend, dtype, d):
    """Q_RESIDENT at the non-resident tile shape (query rows loaded once) gives the launcher's result."""
    import triton

    from nformer_kernels.triton import knn as triton_knn

    x = unit_rows((2, 70, d), dtype, seed=4, device=backend.device)
    base = triton_knn.choose_variant(dtype, 5)
    resident = dataclasses.replace(base, constexprs={**base.constexprs, "Q_RESIDENT": True, "BLOCK_D": 64})
    idx = torch.empty(2, 70, 5, dtype=torch.int64, device=backend.device)
    resident.launch((triton.cdiv(70, resident.constexprs["BLOCK_M"]), 2), x, idx, 70, d, 5)
    assert torch.equal(idx, backend.kernel("knn")(x, 5))
    assert_knn(x, idx, 5)


@pytest.mark.backends("triton-interpreted", "triton")
@pytest.mark.parametrize("dtype, k, d", [(torch.float16, 5, 24), (torch.bfloat16, 20, 256), (torch.float16, 40, 200)],
                         ids=["fp16-k5-d24", "bf16-k20-d256", "fp16-k40-d200"])
def test_knn_triton_hopper_tiles(backend, dtype, k, d, monkeypatch):
    """The sm_90 choice (Q-resident 128 x 128 tiles; 64 x 64, 4 warps at K_PAD = 64) on a partial last
    tile, a batch and duplicated rows: as stage 1, the true top-k within its operands' rounding (its
    fp32 sums run in another order than the 64 x 64 tiles', so near-ties may swap); through nk.knn,
    the canonical answer itself."""
    from nformer_kernels.triton import knn as triton_knn

    x = unit_rows((2, 150, d), dtype, seed=9, device=backend.device)
    x[:, 130:145] = x[:, 10:25]  # exact duplicates
    hopper = triton_knn.choose_variant(dtype, k, d=d, capability=(9, 0))
    assert hopper.constexprs["Q_RESIDENT"] and hopper.constexprs["BLOCK_D"] >= d
    idx = triton_knn.knn(x, k, capability=(9, 0))
    assert_knn(x, idx, k, atol=2e-3 if dtype == torch.bfloat16 else 3e-4)
    torch.testing.assert_close(neighbour_sims(x, idx), neighbour_sims(x, triton_knn.knn(x, k, capability=(8, 6))),
                               rtol=0, atol=2e-3 if dtype == torch.bfloat16 else 3e-4)
    monkeypatch.setattr(triton_knn, "device_capability", lambda device: (9, 0))
    xf = x.float()
    with nk.use_backend(backend.name):
        got = nk.knn(xf, k, precision="certified")
    with nk.use_backend("reference"):
        assert torch.equal(got, nk.knn(xf, k))


@pytest.mark.backends("triton-interpreted", "triton")
def test_knn_triton_launcher_rejects_bad_input(backend):
    from nformer_kernels.triton import knn as triton_knn

    x = unit_rows((1, 70, 8), device=backend.device)
    with pytest.raises(ValueError, match="triton knn range"):
        triton_knn.knn(x, 65)  # above the triton limit (nk.knn hands such calls to the torch backend)
    with pytest.raises(ValueError, match="k must be"):
        triton_knn.knn(x, 71)
    with pytest.raises(TypeError):
        triton_knn.knn(x.double(), 5)


# ----------------------------------------------------------------------------- public API
on_api_cases = fast_and(INTERPRETED)  # not emulated: its knn is the slow one; the kernel tests above cover it


@on_api_cases
@pytest.mark.parametrize("n,d,k", [(1, 4, 1), (37, 16, 5), (64, 8, 64), (129, 32, 20)])
def test_knn_matches_brute_force(backend, n, d, k):
    x = backend.tensor(ties_free(n, d))
    assert torch.equal(nk.knn(x, k).cpu(), brute_knn(x, k))


@pytest.mark.backends("reference", "torch", "cpu", "cuda")  # fp64: not triton
def test_knn_batched_and_fp64(backend):
    x = backend.tensor(ties_free(50, 12, batch=3, dtype=torch.float64))
    idx = nk.knn(x, 7)
    assert idx.shape == (3, 50, 7) and idx.dtype == torch.int64 and idx.device == x.device
    for b in range(3):
        assert torch.equal(idx[b].cpu(), brute_knn(x[b], 7))


@on_api_cases
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_knn_half_precision(backend, dtype):
    """Half inputs accumulate in fp32: the neighbour sets of the rounded features, up to near-ties."""
    x = backend.tensor(ties_free(200, 64).to(dtype))
    idx = nk.knn(x, 10).cpu()
    ref = brute_knn(x.float(), 10)
    overlap = sum(len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), ref.tolist())) / len(ref)
    assert overlap >= 0.99
    assert torch.equal(idx[:, 0], torch.arange(200))


@on_api_cases
def test_knn_duplicates_and_zero_rows(backend):
    """Exact ties: self stays first, neighbours are distinct, similarities match the reference."""
    base = ties_free(10, 8)
    x = torch.cat([base, base, base[:3], torch.zeros(2, 8)])  # 3 copies of some rows, 2 zero rows
    k = 6
    idx = nk.knn(backend.tensor(x), k).cpu()
    assert torch.equal(idx[:, 0], torch.arange(len(x)))
    assert all(len(set(row)) == k for row in idx.tolist())
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = torch.gather(xn @ xn.T, 1, idx)
    ref_sims = torch.gather(xn @ xn.T, 1, reference.knn(xn.unsqueeze(0), k)[0])
    torch.testing.assert_close(sims[:, 1:], ref_sims[:, 1:], rtol=0, atol=1e-6)


@on_api_cases
def test_knn_dot_metric(backend):
    x = ties_free(40, 8) * torch.linspace(0.5, 3, 40).unsqueeze(1)
    idx = nk.knn(backend.tensor(x), 4, metric="dot").cpu()
    sims = x.double() @ x.double().T
    sims.fill_diagonal_(float("inf"))
    assert torch.equal(idx, torch.sort(-sims, dim=1, stable=True).indices[:, :4])


@on_api_cases
def test_knn_query_isolation(backend):
    x = ties_free(60, 16)
    query = torch.zeros(60, dtype=torch.bool)
    query[:15] = True
    idx = nk.knn(backend.tensor(x), 8, query_mask=backend.tensor(query)).cpu()
    plain = nk.knn(backend.tensor(x), 8).cpu()
    assert torch.equal(idx[15:], plain[15:])
    assert torch.equal(idx[:15, 0], torch.arange(15))
    assert not query[idx[:15, 1:]].any()
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    for i in range(15):  # gallery-only neighbours of each query, recomputed by hand
        sims = xn[15:] @ xn[i]
        assert idx[i, 1:].tolist() == (15 + torch.sort(-sims, stable=True).indices[:7]).tolist()


@on_api_cases
@pytest.mark.parametrize("shape,k", [((1, 8), 1), ((3, 37, 16), 37), pytest.param((1031, 64), 20, marks=fast_only)])
def test_knn_and_reciprocal_mask_on_the_backend(backend, shape, k):
    """nk.knn and nk.reciprocal_mask run on the selected backend: the true top-k of the normalised
    rows, and the reference's reciprocal mask of those lists."""
    x = randn(shape, seed=0, device=backend.device)
    assert nk.get_backend(x.device) == backend.name
    idx = nk.knn(x, k)
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert_knn(xn if xn.dim() == 3 else xn[None], idx if idx.dim() == 3 else idx[None], k)
    keep = nk.reciprocal_mask(idx)
    assert torch.equal(keep, reference.reciprocal_mask(idx if idx.dim() == 3 else idx[None]).view_as(keep))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,exc,match", [
    (lambda x: nk.knn(x, 0), ValueError, "k must"),
    (lambda x: nk.knn(x, 21), ValueError, "k must"),
    (lambda x: nk.knn(x, 2.0), TypeError, "k must"),
    (lambda x: nk.knn(x.long(), 2), TypeError, "x must"),
    (lambda x: nk.knn(x[0], 1), ValueError, "x must"),
    (lambda x: nk.knn(x * float("inf"), 2), ValueError, "x contains"),
    (lambda x: nk.knn(x, 2, metric="l2"), ValueError, "metric"),
], ids=["k0", "k_above_n", "k_float", "x_int", "x_1d", "x_inf", "metric"])
def test_knn_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(ties_free(20, 4))
