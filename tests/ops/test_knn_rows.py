"""knn_rows: every backend's batched kernel (contract: csrc/ops.cpp) against the reference, bit for bit.

knn_rows is the exact rescan of the rows a two-stage knn could not certify, so each backend's
kernel must return the canonical top-k by itself: the tests compare index tensors for identity on
data hard on rounding (near-duplicate clusters, exact duplicate groups, zero rows), any subset of
rows (repeated, unordered, one row, all rows), batches, k = 1 and k = N, every dtype.
"""
import pytest
import torch

from nformer_kernels import canonical, reference
from tests.conftest import EMULATED, INTERPRETED
from tests.helpers import KNN_DATA, dtype_id

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SLOW = (EMULATED, INTERPRETED)


def subset(b, n, r, seed):
    """(b, r) int64 rows in [0, n): unordered, with repeats."""
    return torch.randint(0, n, (b, r), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", list(KNN_DATA))
def test_knn_rows_is_the_reference(backend, kind, dtype):
    backend.skip_dtype(dtype)
    b, n, d, k, r = (2, 45, 19, 7, 11) if backend.slow else (2, 700, 40, 20, 150)
    x = canonical.canonical_rows(KNN_DATA[kind](b, n, d, seed=len(kind))).to(dtype)
    rows = subset(b, n, r, seed=n)
    got = backend.kernel("knn_rows")(backend.tensor(x), backend.tensor(rows), k)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), reference.knn_rows(x, rows, k))


@pytest.mark.parametrize("shape", [pytest.param(s, id="B{}N{}d{}k{}R{}".format(*s)) for s in [
    (1, 1, 4, 1, 1), (3, 37, 13, 1, 5), (1, 37, 16, 37, 37), (2, 70, 24, 33, 9), (1, 70, 8, 64, 3)]])
def test_knn_rows_shapes(backend, shape):
    """One row, k = 1, k = N (every row a permutation), k = 64 (the triton limit), batches, odd d."""
    b, n, d, k, r = shape
    x = canonical.canonical_rows(KNN_DATA["duplicate-groups"](b, n, d, seed=n))
    rows = subset(b, n, r, seed=d)
    got = backend.kernel("knn_rows")(backend.tensor(x), backend.tensor(rows), k).cpu()
    assert torch.equal(got, reference.knn_rows(x, rows, k))
    assert torch.equal(got[:, :, 0], rows)  # self first


def test_knn_rows_empty_and_bad_rows(backend):
    x = backend.tensor(canonical.canonical_rows(KNN_DATA["random"](2, 20, 8)))
    empty = backend.kernel("knn_rows")(x, backend.tensor(torch.zeros((2, 0), dtype=torch.int64)), 3)
    assert tuple(empty.shape) == (2, 0, 3)
    if backend.name == "reference":
        pytest.skip("the reference is the specification: it indexes, it does not validate")
    for bad in (torch.tensor([[0, 20]] * 2), torch.tensor([[-1, 3]] * 2)):
        with pytest.raises((ValueError, RuntimeError), match=r"rows must lie in \[0, N"):
            backend.kernel("knn_rows")(x, backend.tensor(bad), 3)
