"""knn gives one answer everywhere: the same index tensor, bit for bit, on every backend case this
machine runs (reference, torch, cpu, triton-interpreted, cuda-emulated; cuda and triton on a GPU),
for precision "exact" and "certified", any thread count, and on adversarial data: near-duplicate
clusters (gaps far below fp32 rounding), exact duplicate groups, zero rows, Re-ID-like clusters,
random rows, batches, k = N, in fp32/fp16/bf16/fp64. The expected tensor is the dense reference's:
the top-k of the canonical score (nformer_kernels.canonical), computed by plain PyTorch.
A caller's TF32 / reduced-precision matmul settings never change the answer.
"""
import math

import pytest
import torch

import nformer_kernels as nk
from nformer_kernels import canonical, reference
from tests.helpers import KNN_DATA as DATA, near_duplicates, torch_threads

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def expected(x, k, metric="cosine"):
    with nk.use_backend("reference"):
        return nk.knn(x.cpu(), k, metric=metric, precision="exact")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("kind", list(DATA))
def test_identical_on_every_backend_and_precision(backend, kind, dtype):
    b, n, d, k = (1, 48, 16, 7) if backend.slow else (2, 400, 40, 20)
    x = DATA[kind](b, n, d, seed=len(kind)).to(dtype)
    want = expected(x, k)
    for precision in ("exact", "certified"):
        got = nk.knn(backend.tensor(x), k, precision=precision)
        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), precision


@pytest.mark.parametrize("kind", ["near-duplicates", "duplicate-groups"])
def test_identical_for_k_equal_to_n_and_margin_zero(backend, kind):
    """k = N (every row a permutation) and margin 0 (every row rescanned)."""
    n = 20 if backend.slow else 90
    x = DATA[kind](1, n, 12, seed=5)[0]
    assert torch.equal(nk.knn(backend.tensor(x), n).cpu(), expected(x, n))
    idx, stats = nk.knn(backend.tensor(x), 6, precision="certified", margin=0, return_stats=True)
    assert torch.equal(idx.cpu(), expected(x, 6))
    assert stats.rows_recomputed == n  # K' = k: no row can be certified, all are rescanned


@pytest.mark.parametrize("noise", [0.0, 1e-4], ids=["copies", "near-copies"])
def test_groups_larger_than_a_list_holds(backend, noise):
    """A group of near-ties far larger than k + the cpu list's 32 spare slots: the lists overflow and
    are held by canonical score mid-scan (one c for both rows of a pair), on rows inside and outside
    the group."""
    n, group, k = (70, 50, 3) if backend.slow else (700, 520, 20)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 16, generator=g)
    x[:group] = x[0] + noise * torch.randn(group, 16, generator=g)
    x = x[torch.randperm(n, generator=g)]
    assert torch.equal(nk.knn(backend.tensor(x), k).cpu(), expected(x, k))
    u = canonical.canonical_rows(x)[None]
    rows = torch.arange(0, n, 7)[None]
    got = backend.kernel("knn_rows")(backend.tensor(u), backend.tensor(rows), k).cpu()
    assert torch.equal(got, reference.knn_rows(u, rows, k))


@pytest.mark.backends("cpu", "torch")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_identical_for_any_thread_count(backend, threads):
    x = near_duplicates(1, 1500, 24, seed=2)[0]  # several CPU tiles
    with torch_threads(threads):
        got = nk.knn(x, 20)
    assert torch.equal(got, expected(x, 20))


@pytest.mark.backends("reference", "torch", "cpu")
def test_dot_metric_and_query_isolation_identical(backend):
    x = near_duplicates(1, 300, 16, seed=3)[0] * torch.linspace(0.5, 2, 300)[:, None]
    queries = torch.zeros(300, dtype=torch.bool)
    queries[::4] = True
    with nk.use_backend("reference"):
        want_dot = nk.knn(x, 9, metric="dot")
        want_iso = nk.knn(x, 9, query_mask=queries)
    assert torch.equal(nk.knn(x, 9, metric="dot"), want_dot)
    assert torch.equal(nk.knn(x, 9, query_mask=queries), want_iso)


def test_canonical_rows_and_scores_do_not_depend_on_the_blocking():
    """The canonical score of a pair is the same whatever else is computed with it, and symmetric."""
    x = canonical.canonical_rows(near_duplicates(1, 64, 37, seed=4)[0])
    full = canonical.canonical_scores(x[:, None], x[None])
    assert torch.equal(full, full.T)
    for i in (0, 17, 63):
        assert torch.equal(canonical.canonical_scores(x[i], x), full[i])
    assert torch.equal(canonical.canonical_rows(torch.cat([x[:5] * 4, torch.zeros(1, 37)]))[:5],
                       canonical.canonical_rows(x[:5]))


def test_canonical_score_is_the_documented_order():
    """c(a, b): 16 lanes, each summed in index order, then folded in halves (docs/design.md)."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(53, generator=g), torch.randn(53, generator=g)
    p = [float(a[e]) * float(b[e]) for e in range(53)]  # python floats: IEEE fp64, exact products
    lanes = [0.0] * 16
    for e, v in enumerate(p):
        lanes[e % 16] += v
    h = 8
    while h:
        lanes = [lanes[i] + lanes[i + h] for i in range(h)]
        h //= 2
    assert canonical.canonical_scores(a, b).item() == lanes[0]


def cancelling_rows(n, d, seed):
    """Row 0 all ones; the others small multiples of 2**-14 with +2**40 and -2**40 at two random
    places. 2**-14 is below half an ulp of 2**40, so a sum keeps or loses each small term depending
    on the order of its additions: only the canonical order gives c's bits (and ranks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, d), generator=g).float() * 2.0 ** -14
    x[0] = 1.0
    for j in range(1, n):
        pos = torch.randperm(d, generator=g)[:2]
        x[j, pos[0]], x[j, pos[1]] = 2.0 ** 40, -(2.0 ** 40)
    return x


def test_cancelling_rows_make_the_order_of_additions_matter():
    x = cancelling_rows(40, 37, seed=0)
    c = canonical.canonical_scores(x[0], x)[1:]
    exact = torch.tensor([math.fsum(row) for row in x[1:].double().tolist()], dtype=torch.float64)
    assert (c != exact).any() and len(set(c.tolist())) > 20


@pytest.mark.backends("reference", "torch", "cpu", "triton-interpreted", "cuda-emulated", "cuda", "triton")
def test_canonical_score_bits_decide_the_order(backend):
    """Where a score's bits depend on the order of its additions, every kernel ranks by the canonical
    bits: knn_rescore with 31 candidates a row (on the cpu, batches of 4, 2 and 1 keys), knn_rows and
    knn, exact and certified (every pair a near-tie, so every pair is ranked by c: the cpu lists by
    f and by c)."""
    n, d, k = 40, 37, 10
    x = cancelling_rows(n, d, seed=0)[None]
    g = torch.Generator().manual_seed(1)
    offsets = torch.stack([torch.randperm(n - 1, generator=g)[:30] + 1 for _ in range(n)])
    rows = torch.arange(n)[:, None]
    cand = torch.cat([rows, (rows + offsets) % n], dim=1)[None]  # self + 30 others
    margin = torch.zeros(1, n, dtype=torch.float64)
    got = backend.kernel("knn_rescore")(backend.tensor(x), backend.tensor(cand), 31, backend.tensor(margin))
    want = reference.knn_rescore(x, cand, 31, margin)  # every candidate ranked
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    q = torch.arange(0, n, 3)[None]
    assert torch.equal(backend.kernel("knn_rows")(backend.tensor(x), backend.tensor(q), k).cpu(),
                       reference.knn_rows(x, q, k))
    want = expected(x[0], k, metric="dot")
    for precision in ("exact", "certified"):
        assert torch.equal(nk.knn(backend.tensor(x[0]), k, metric="dot", precision=precision).cpu(), want)


@pytest.mark.backends("reference", "torch", "cpu", "triton-interpreted", "cuda", "triton")
def test_tf32_and_medium_matmul_precision_change_nothing(backend, monkeypatch):
    """A caller's allow_tf32 / set_float32_matmul_precision("medium") are off inside knn (checked at
    every kernel call), restored after it, and the answer is unchanged (on a GPU: with TF32 on)."""
    x = backend.tensor(near_duplicates(1, 48 if backend.slow else 300, 16, seed=7)[0])
    want = expected(x, 9)
    seen = []
    real = nk.backends.kernel

    def kernel(name, op):
        fn = real(name, op)

        def checked(*args):
            seen.append(canonical.fp32_matmul_is_exact())
            return fn(*args)
        return checked

    monkeypatch.setattr(nk.backends, "kernel", kernel)
    knobs = canonical._fp32_precision_knobs()
    saved = [knob.fp32_precision for knob in knobs]
    try:
        for knob in knobs:
            knob.fp32_precision = "tf32"
        if knobs and hasattr(torch.backends.mkldnn, "matmul"):
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert not canonical.fp32_matmul_is_exact()
        for precision in ("exact", "certified"):
            assert torch.equal(nk.knn(x, 9, precision=precision).cpu(), want)
        assert not canonical.fp32_matmul_is_exact()  # restored
    finally:
        for knob, value in zip(knobs, saved):
            knob.fp32_precision = value
    assert seen and all(seen)
