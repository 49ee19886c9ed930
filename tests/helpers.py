"""Tolerances and input builders shared by every test (one place; tests import from here).

Tolerances (err = max|got - ref| / max(1, max|ref|)):
  outputs in the input dtype: fp32 1e-4, fp64 1e-10, fp16 2e-3, bf16 1.6e-2 (one rounding of
  the output dtype; accumulation is fp32).
  probs, dP, dR (the accumulation dtype, fp32 for every input but fp64): 1e-4; 1e-3 when v is
  fp16/bf16, whose products are accumulated in another order.
knn: self first, distinct indices, and the similarities of the chosen neighbours equal the true
top-k similarities (fp64 from the input values) to 3e-5; exact ids where ties are exact (smaller
index first) or the input is ties-free.
"""
import functools
import math

import torch

from nformer_kernels import reference

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACC_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-3, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual, expected, rel, what=""):
    """max|actual - expected| <= rel * max(1, max|expected|), and actual finite."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= rel * scale, f"{what}: max err {err:.3g} > {rel:g} * {scale:.3g}"


def assert_close_fp32(actual, expected):
    """The project's fp32 tolerance: 1e-4 * max(1, max|ref|)."""
    assert_close(actual, expected, TOL[torch.float32])


def randn(shape, seed=0, dtype=torch.float32, device="cpu"):
    """Gaussian values drawn in fp64 on the CPU (the same values for every dtype and device), then cast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def ties_free(n, d, generator_seed=0, dtype=torch.float32, batch=None):
    """Gaussian (N,d) or (B,N,d) features; continuous values, so exact ties have probability 0."""
    return randn((n, d) if batch is None else (batch, n, d), generator_seed, dtype)


def unit_rows(shape, dtype=torch.float32, seed=0, device="cpu"):
    """L2-normalised Gaussian rows (normalised in fp64, then cast)."""
    return torch.nn.functional.normalize(randn(shape, seed, torch.float64), dim=-1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _gapped(b, n, d, k, seed, gap):
    for s in range(seed, seed + 100):
        x = unit_rows((b, n, d), torch.float64, s)
        sim = torch.bmm(x, x.transpose(1, 2))
        sim.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        top = sim.topk(min(k + 1, n), dim=-1).values[..., 1:]
        if top.shape[-1] < 2 or (top[..., :-1] - top[..., 1:]).min() > gap:
            return x
    raise AssertionError("no ties-free draw found")


def gapped_rows(b, n, d, k, seed=0, gap=1e-6, dtype=torch.float32, device="cpu"):
    """Unit rows whose top-(k+1) similarities per row are >= gap apart: one exact knn answer."""
    return _gapped(b, n, d, k, seed, gap).to(device=device, dtype=dtype)


def assert_knn(x, idx, k, atol=3e-5, rows=None, chunk=1 << 18):
    """idx (B,N,k) of x (B,N,d): self first, distinct ids, and the similarities of idx[...,1:] equal
    the true top-(k-1) (fp64 from x's values) on `rows` (default all). O(|rows| * N) memory per chunk."""
    B, N, _ = x.shape
    dev = x.device
    assert idx.shape == (B, N, k) and idx.dtype == torch.int64 and idx.device == dev
    assert torch.equal(idx[..., 0], torch.arange(N, device=dev).expand(B, N)), "self must come first"
    assert bool(((idx >= 0) & (idx < N)).all())
    srt = idx.sort(dim=-1).values
    assert not bool((srt[..., 1:] == srt[..., :-1]).any()), "repeated neighbour"
    rows = torch.arange(N, device=dev) if rows is None else rows
    for b in range(B):
        q = x[b, rows].double()
        sim = torch.cat([q @ x[b, c:c + chunk].double().T for c in range(0, N, chunk)], dim=1)
        sim[torch.arange(len(rows), device=dev), rows] = float("inf")
        want = sim.topk(k, dim=1).values[:, 1:]
        got = torch.gather(sim, 1, idx[b, rows])[:, 1:]
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def knn_graph(b, n, k, seed=0, device="cpu"):
    """Neighbour lists (B,N,k) of random 8-d points: self first, many reciprocal pairs."""
    return reference.knn(unit_rows((b, n, 8), seed=seed), k).to(device)


def random_neighbours(b, n, k, seed=0, device="cpu"):
    """Distinct neighbours per row, self first, otherwise random (few reciprocal pairs)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.stack([torch.randperm(n - 1, generator=g)[:k - 1] + 1 for _ in range(b * n)]).view(b, n, k - 1)
    rows = torch.arange(n).view(1, n, 1)
    return torch.cat([rows.expand(b, n, 1), (rows + offsets) % n], dim=2).to(device)


def random_idx(b, n, k, seed=0, device="cpu"):
    """Neighbour tables with distinct entries per row but no self-first structure."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, n, generator=g).argsort(-1)[..., :k].contiguous().to(device)


def attention_case(B, N, H, l, k, dv, dtype, keep_mode="reciprocal", seed=0, device="cpu"):
    """Batched kernel inputs P, R (acc dtype), v, idx (knn of random points), keep, scale.

    keep_mode: "reciprocal" (the reciprocal mask), "subset" (70% of it, the first quarter of the
    rows with nothing kept: zeros, never NaN) or "all" (every listed neighbour)."""
    acc = acc_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(B, N, H, l, generator=g, dtype=torch.float64).to(acc)
    R = torch.randn(B, N, H, l, generator=g, dtype=torch.float64).to(acc)
    v = torch.randn(B, N, H * dv, generator=g, dtype=torch.float64).to(dtype)
    idx = knn_graph(B, N, k, seed)
    keep = reference.reciprocal_mask(idx)
    if keep_mode == "subset":
        keep &= torch.rand(keep.shape, generator=g) < 0.7
        keep[:, : N // 4] = False
    elif keep_mode == "all":
        keep = torch.ones_like(keep)
    to = lambda t: t.to(device)  # noqa: E731
    return to(P), to(R), to(v), to(idx), to(keep), 1.0 / math.sqrt(8)
