"""Tolerances and input builders shared by every test (one place; tests import from here).

Tolerances (err = max|got - ref| / max(1, max|ref|)):
  outputs in the input dtype: fp32 1e-4, fp64 1e-10, fp16 2e-3, bf16 1e-2 (accumulation is fp32
  and the output is rounded once: two such results differ by at most one ulp, 2^-10 (fp16) or
  2^-7 (bf16) of max(1, |ref|)). A whole model in fp16/bf16 rounds once per layer: MODEL_TOL
  (bf16 1.6e-2).
  probs, dP, dR (the accumulation dtype, fp32 for every input but fp64): 1e-4 (1e-10 in fp64), for
  every v dtype (fp16/bf16 products are exact in fp32; measured errors are ~3e-7).
knn: self first, distinct indices, and the similarities of the chosen neighbours equal the true
top-k similarities (fp64 from the input values) to 3e-5; exact ids where ties are exact (smaller
index first) or the input is ties-free.
"""
import contextlib
import functools
import math
import os

import torch

import nformer_kernels as nk
from nformer_kernels import reference

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MODEL_TOL = {**TOL, torch.bfloat16: 1.6e-2}
ACC_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-4, torch.bfloat16: 1e-4}  # by v's dtype
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def dtype_id(dtype):
    """Test id of a dtype ("float32"): ids stay free of backend names such as "torch", so -k selects cases."""
    return str(dtype).removeprefix("torch.")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def probs_tol(dtype):
    """probs are in the accumulation dtype whatever v's dtype."""
    return ACC_TOL[acc_dtype(dtype)]


def on_reference(fn, *args, **kwargs):
    """fn(*args, **kwargs) with the dense reference backend selected, then the previous choice back."""
    with nk.use_backend("reference"):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) inside the block (the OpenMP schedules of the cpu kernels)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def neighbour_sims(x, idx):
    """fp64 similarity of each row of x (B,N,d) to each of its listed neighbours idx (B,N,k)."""
    xd = x.double()
    return torch.einsum("bnd,bnkd->bnk", xd, xd[torch.arange(x.shape[0], device=x.device)[:, None, None], idx])


def brute_knn(x, k):
    """Cosine top-k of x (N,d) by numpy loops: self first, then (similarity desc, index asc)."""
    import numpy as np  # here, not at the top: the GPU test selection runs without numpy

    xn = x.double().cpu().numpy()
    xn = xn / np.maximum(np.linalg.norm(xn, axis=1, keepdims=True), 1e-12)
    out = []
    for i in range(len(xn)):
        sims = xn @ xn[i]
        order = sorted((j for j in range(len(xn)) if j != i), key=lambda j: (-sims[j], j))
        out.append([i] + order[: k - 1])
    return torch.tensor(out)


def brute_reciprocal(idx):
    """keep of idx (N,k) by Python loops: keep[i,t] = i in idx[idx[i,t]]."""
    rows = idx.tolist()
    return torch.tensor([[i in rows[j] for j in row] for i, row in enumerate(rows)])


def exact_tie_groups(n=203, d=32, groups=6, seed=3, dtype=torch.float32):
    """(x (N,d), sim (N,N) fp64): rows drawn from `groups` unit vectors and a zero row, so copies tie
    exactly; sim holds the similarities per pair of groups (a BLAS may round copies differently),
    the diagonal +inf. Distinct similarities differ by > 1e-3."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(groups, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    group = torch.randint(0, groups + 1, (n,), generator=g)  # group `groups`: zero rows
    x = torch.cat([base, torch.zeros(1, d, dtype=dtype)])[group]
    base_sim = torch.zeros(groups + 1, groups + 1, dtype=torch.float64)
    base_sim[:groups, :groups] = base.double() @ base.double().T
    for row in base_sim[:groups]:
        distinct = row.unique()
        assert (distinct[1:] - distinct[:-1]).min() > 1e-3, "test data must only tie exactly"
    sim = base_sim[group][:, group]
    sim.fill_diagonal_(float("inf"))
    return x, sim


def lattice_rows(b=2, n=37, d=16, period=9, seed=1):
    """Entries in {-4..4}/8: every inner product is exact in any summation order, so equal
    similarities are exact ties in every dtype; row i equals row i + period."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-4, 5, (b, period, d), generator=g) / 8
    return base[:, torch.arange(n) % period]


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


def attention_case(B, N, H, l, k, dv, dtype, keep_mode="reciprocal", seed=0, device="cpu", magnitude=1.0):
    """Batched kernel inputs P, R (acc dtype, Gaussian times `magnitude`), v, idx (knn of random
    points), keep, scale.

    keep_mode: "reciprocal" (the reciprocal mask), "subset" (70% of it, the first quarter of the
    rows with nothing kept: zeros, never NaN) or "all" (every listed neighbour)."""
    acc = acc_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    P = (magnitude * torch.randn(B, N, H, l, generator=g, dtype=torch.float64)).to(acc)
    R = (magnitude * torch.randn(B, N, H, l, generator=g, dtype=torch.float64)).to(acc)
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


def grad_like(t, seed=5):
    """A random upstream gradient of t's shape, dtype and device (drawn in fp64 on the CPU)."""
    return randn(t.shape, seed, t.dtype, t.device)


def neighbor_attention_case(n=37, d=16, k=5, heads=2, batch=None, dtype=torch.float32, n_land=5, seed=0,
                            keep_all=False, device="cpu"):
    """Public-API inputs q, k, v ((N,d) or (B,N,d)), idx (cosine knn of q), keep (reciprocal, or all),
    landmarks (n_land distinct rows), heads."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    q, kk, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    qb = q.float() if batch is not None else q.float()[None]
    idx = reference.knn(torch.nn.functional.normalize(qb, dim=-1), k)
    keep = torch.ones_like(idx, dtype=torch.bool) if keep_all else reference.reciprocal_mask(idx)
    if batch is None:
        idx, keep = idx[0], keep[0]
    landmarks = torch.randperm(n, generator=g)[:n_land]
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(kk), to(v), to(idx), to(keep), to(landmarks), heads


def reference_attention(q, k, v, idx, keep, landmarks, heads):
    """reference.neighbor_attention for (N,d) or (B,N,d) inputs."""
    batched = q.dim() == 3
    args = [t if batched else t.unsqueeze(0) for t in (q, k, v, idx, keep)]
    out = reference.neighbor_attention(*args, landmarks, heads)
    return out if batched else out[0]


def kernel_grads(backend_name, grad_out, P, R, v, idx, keep, scale):
    """(out, probs, dP, dR, dv) of a backend's batched kernels: forward, reverse_index, backward."""
    kernel = functools.partial(nk.backends.kernel, backend_name)
    out, probs = kernel("sparse_attention")(P, R, v, idx, keep, scale)
    rev = kernel("reverse_index")(idx, keep)
    return (out, probs, *kernel("sparse_attention_backward")(grad_out, P, R, v, idx, rev, probs, scale))


def reference_grads(grad_out, P, R, v, idx, keep, scale):
    """(out, probs, dP, dR, dv) of reference.sparse_attention by autograd."""
    Pr, Rr, vr = (t.clone().requires_grad_() for t in (P, R, v))
    out, probs = reference.sparse_attention(Pr, Rr, vr, idx, keep, scale)
    return (out.detach(), probs.detach(), *torch.autograd.grad(out, (Pr, Rr, vr), grad_out))


class KernelAttention(torch.autograd.Function):
    """sparse_attention differentiable through one backend's batched kernels only: the forward,
    reverse_index and the backward kernel (what the public op registers for a library backend)."""

    @staticmethod
    def forward(ctx, backend_name, P, R, v, idx, keep, scale):
        out, probs = nk.backends.kernel(backend_name, "sparse_attention")(P, R, v, idx, keep, scale)
        ctx.save_for_backward(P, R, v, idx, keep, probs)
        ctx.backend_name, ctx.scale = backend_name, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        P, R, v, idx, keep, probs = ctx.saved_tensors
        kernel = functools.partial(nk.backends.kernel, ctx.backend_name)
        rev = kernel("reverse_index")(idx, keep)
        dP, dR, dv = kernel("sparse_attention_backward")(grad_out.contiguous(), P, R, v, idx, rev, probs, ctx.scale)
        return None, dP, dR, dv, None, None, None


def register_counting_backend(monkeypatch, missing=()):
    """Registers (for this test only) a CPU backend "counting" that runs the torch backend's kernels
    (its knn exact, as the torch backend's) but those named in `missing`, and records each kernel
    name called; returns that list."""
    from nformer_kernels import backends, torch_ops
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    calls = []

    def counting(name):
        def run(*args):
            calls.append(name)
            return getattr(torch_ops, name)(*args)
        return run

    backends.register_backend(backends.Backend(
        "counting", lambda device: "" if device.type == "cpu" else "cpu only",
        lambda: {name: counting(name) for name in backends.KERNELS if name not in missing}, exact_knn=True,
        missing=tuple(missing)))
    return calls


class RunsACommand:
    """A pickled payload: unpickling it runs `touch marker` (what no file of the project may do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def near_duplicates(b, n, d, seed=0, noise=1e-4, clusters=None):
    """(b,n,d) rows in clusters of ~20 around random centres, offsets of `noise`: at 1e-4 the cosines
    within a cluster differ by ~1e-8, below fp32 rounding: near-ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    clusters = clusters or max(1, n // 20)
    centres = torch.randn((b, clusters, d), generator=g)
    member = torch.randint(0, clusters, (b, n), generator=g)
    return torch.gather(centres, 1, member[..., None].expand(b, n, d)) + noise * torch.randn((b, n, d), generator=g)


def duplicate_groups(b, n, d, seed=0):
    """Groups of exact copies (some larger than k) and zero rows: exact ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.cat([torch.randn((b, 5, d), generator=g), torch.zeros((b, 1, d))], dim=1)
    pick = torch.randint(0, 6, (b, n), generator=g)
    return torch.gather(base, 1, pick[..., None].expand(b, n, d))


def reid_like(b, n, d, seed=0):
    return near_duplicates(b, n, d, seed=seed, noise=0.5, clusters=max(1, n // 8))


def random_rows(b, n, d, seed=0):
    return torch.randn((b, n, d), generator=torch.Generator().manual_seed(seed))


KNN_DATA = {  # knn inputs hard on rounding (identity tests): near-ties, exact ties, zero rows
    "near-duplicates": near_duplicates, "duplicate-groups": duplicate_groups, "reid-like": reid_like,
    "random": random_rows}
