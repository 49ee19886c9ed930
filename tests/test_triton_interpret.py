"""Triton kernels run by the Triton interpreter on CPU tensors, against nformer_kernels.reference.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported, which a test
session that imports other modules cannot guarantee. So in an ordinary session this file holds a
single test that re-runs this file in a child pytest with TRITON_INTERPRET=1 (one extra interpreter
start, ~5 s); in that child (or any session started with TRITON_INTERPRET=1) the real tests run.

Tolerances (err = max|got - ref| / max(1, max|ref|)):
  fp32: 1e-4 everywhere. probs are fp32 for every input dtype: 1e-4.
  out / dv in fp16: 2e-3, bf16: 1e-2 (one rounding of the output dtype; accumulation is fp32).
  dP, dR with fp16/bf16 v: 1e-3 (fp32 math on the same low-precision values, order differs).
knn: self first, distinct indices, and the similarities of the chosen neighbours equal the
reference's (1e-5) -- exact index equality for fp32 and for tie-heavy inputs (ties -> smaller index).
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton_interp
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not INTERPRETING:

    def test_interpreter_suite():
        pytest.importorskip("triton")
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
             "ignore::RuntimeWarning", os.path.abspath(__file__)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        print(child.stdout[-3000:])
        assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]

else:
    import torch

    triton = pytest.importorskip("triton")
    import nformer_kernels.triton as nt
    from nformer_kernels import reference

    LOW_PRECISION_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

    def assert_close(got, ref, tol, what):
        assert got.shape == ref.shape and got.dtype == ref.dtype, what
        assert torch.isfinite(got).all(), f"{what}: non-finite values"
        err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
        scale = max(1.0, ref.double().abs().max().item() if ref.numel() else 0.0)
        assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol:g} * {scale:.3g}"

    def features(b, n, d, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.normalize(torch.randn(b, n, d, generator=g), dim=-1)
        return x.to(dtype)

    def assert_knn_valid(idx, x, k):
        b, n, _ = x.shape
        ref = reference.knn(x, k)
        assert idx.shape == (b, n, k) and idx.dtype == torch.int64
        assert torch.equal(idx[..., 0], torch.arange(n).expand(b, n)), "self must come first"
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "indices in a row must be distinct"
        xf = x.float()
        sim = torch.bmm(xf, xf.transpose(1, 2))
        assert_close(torch.gather(sim, 2, idx), torch.gather(sim, 2, ref), 1e-5, "knn similarities")
        return ref

    # ------------------------------------------------------------------ knn
    @pytest.mark.parametrize("b,n,d,k", [(1, 1, 8, 1), (2, 37, 24, 5), (1, 70, 16, 16),
                                         (2, 70, 40, 20), (1, 37, 24, 37), (1, 70, 8, 64)])
    def test_knn_fp32_exact(b, n, d, k):
        x = features(b, n, d, torch.float32, seed=n + k)
        idx = nt.knn.knn(x, k)
        assert torch.equal(idx, assert_knn_valid(idx, x, k))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("b,n,k", [(2, 37, 5), (1, 70, 16), (1, 70, 33)])
    def test_knn_low_precision(dtype, b, n, k):
        x = features(b, n, 24, dtype, seed=k)
        assert_knn_valid(nt.knn.knn(x, k), x, k)

    def test_knn_allow_tf32_runs():
        x = features(1, 37, 24, torch.float32, seed=3)
        assert_knn_valid(nt.knn.knn(x, 5, allow_tf32=True), x, 5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_knn_ties_and_duplicate_rows(dtype):
        # Entries in {-4..4}/8 make every inner product exact in any summation order, so the
        # many equal similarities are exact ties (-> smaller index), and rows repeat (x_i = x_i+9).
        g = torch.Generator().manual_seed(1)
        base = torch.randint(-4, 5, (2, 9, 16), generator=g) / 8
        x = base[:, torch.arange(37) % 9].to(dtype)
        for k in (1, 5, 16, 37):
            idx = nt.knn.knn(x, k)
            assert torch.equal(idx, assert_knn_valid(idx, x, k)), f"k={k}"
        same = torch.full((2, 20, 8), 0.5, dtype=dtype)  # all similarities equal
        idx = nt.knn.knn(same, 6)
        expected = torch.stack([torch.tensor([i] + [j for j in range(20) if j != i][:5])
                                for i in range(20)])
        assert torch.equal(idx, expected.expand(2, 20, 6))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("d", [24, 64])
    def test_knn_resident_query_variant(dtype, d):
        """Q_RESIDENT (query rows loaded once; offered to bench tune) gives the launcher's result."""
        import dataclasses
        import importlib

        knn_module = importlib.import_module("nformer_kernels.triton.knn")
        x = features(2, 70, d, dtype, 4)
        base = knn_module.choose_variant(dtype, 5)
        resident = dataclasses.replace(base, constexprs={**base.constexprs, "Q_RESIDENT": True, "BLOCK_D": 64})
        idx = torch.empty(2, 70, 5, dtype=torch.int64)
        resident.launch((triton.cdiv(70, resident.constexprs["BLOCK_M"]), 2), x, idx, 70, d, 5)
        assert torch.equal(idx, nt.knn.knn(x, 5))
        assert_knn_valid(idx, x, 5)

    def test_knn_rejects_bad_input():
        x = features(1, 70, 8, torch.float32, seed=0)
        with pytest.raises(ValueError):
            nt.knn.knn(x, 65)  # above the triton limit; the wrapper falls back
        with pytest.raises(ValueError):
            nt.knn.knn(x, 71)
        with pytest.raises(TypeError):
            nt.knn.knn(x.double(), 5)

    # ------------------------------------------------------------------ reciprocal / reverse
    def neighbour_lists(b, n, k, seed):
        """knn lists of random features, and random lists (distinct, not self-first)."""
        knn_idx = reference.knn(features(b, n, 12, torch.float32, seed), k)
        g = torch.Generator().manual_seed(seed)
        rand_idx = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n)])
                                for _ in range(b)])
        return knn_idx, rand_idx

    @pytest.mark.parametrize("b,n,k", [(1, 1, 1), (2, 37, 1), (2, 37, 5), (1, 70, 16),
                                       (2, 37, 37), (1, 70, 70)])
    def test_reciprocal_mask_and_reverse_index(b, n, k):
        for idx in neighbour_lists(b, n, k, seed=n * k):
            keep = nt.reciprocal.reciprocal_mask(idx)
            assert torch.equal(keep, reference.reciprocal_mask(idx))
            assert torch.equal(nt.reciprocal.reverse_index(idx, keep), reference.reverse_index(idx, keep))
            some = keep & (torch.rand(keep.shape, generator=torch.Generator().manual_seed(k)) < 0.5)
            assert torch.equal(nt.reciprocal.reverse_index(idx, some), reference.reverse_index(idx, some))

    # ------------------------------------------------------------------ sparse attention
    def attention_inputs(b, n, h, l, dv, k, dtype, seed, magnitude=2.0):
        g = torch.Generator().manual_seed(seed)
        idx = reference.knn(features(b, n, 12, torch.float32, seed), k)
        keep = reference.reciprocal_mask(idx)
        P = magnitude * torch.randn(b, n, h, l, generator=g)
        R = magnitude * torch.randn(b, n, h, l, generator=g)
        v = torch.randn(b, n, h * dv, generator=g).to(dtype)
        grad_out = torch.randn(b, n, h * dv, generator=g).to(dtype)
        return P, R, v, idx, keep, grad_out

    ATTENTION_SHAPES = [  # b, n, h, l, dv, k
        (1, 1, 1, 1, 8, 1), (2, 37, 2, 5, 16, 5), (1, 70, 2, 5, 8, 16), (2, 37, 1, 1, 16, 37),
        (1, 70, 1, 5, 8, 70), (1, 37, 2, 5, 80, 20)]

    @pytest.mark.parametrize("shape", ATTENTION_SHAPES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_sparse_attention_forward_and_backward(shape, dtype):
        b, n, h, l, dv, k = shape
        P, R, v, idx, keep, grad_out = attention_inputs(b, n, h, l, dv, k, dtype, seed=sum(shape))
        scale = (l * 4) ** -0.5
        out, probs = nt.sparse_attention.sparse_attention(P, R, v, idx, keep, scale)

        Pr, Rr, vr = (t.clone().requires_grad_(True) for t in (P, R, v))
        ref_out, ref_probs = reference.sparse_attention(Pr, Rr, vr, idx, keep, scale)
        assert_close(out, ref_out, LOW_PRECISION_TOL[dtype], "out")
        assert_close(probs, ref_probs, 1e-4, "probs")

        ref_out.backward(grad_out)
        rev = reference.reverse_index(idx, keep)
        dP, dR, dv_ = nt.sparse_attention.sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale)
        grad_tol = 1e-4 if dtype == torch.float32 else 1e-3
        assert_close(dP, Pr.grad, grad_tol, "dP")
        assert_close(dR, Rr.grad, grad_tol, "dR")
        assert_close(dv_, vr.grad, LOW_PRECISION_TOL[dtype], "dv")

    def test_sparse_attention_large_affinity_and_empty_rows():
        # Scores far beyond the fp16 range stay fp32; rows with nothing kept give zeros, not NaN.
        P, R, v, idx, keep, _ = attention_inputs(2, 37, 2, 5, 16, 8, torch.float16, seed=5,
                                                 magnitude=300.0)
        keep[:, ::3] = False
        out, probs = nt.sparse_attention.sparse_attention(P, R, v, idx, keep, 1.0)
        ref_out, ref_probs = reference.sparse_attention(P, R, v, idx, keep, 1.0)
        assert_close(out, ref_out, LOW_PRECISION_TOL[torch.float16], "out")
        assert_close(probs, ref_probs, 1e-4, "probs")
        assert (probs[:, ::3] == 0).all() and (out[:, ::3] == 0).all()

    def test_sparse_attention_rejects_bad_input():
        P, R, v, idx, keep, grad_out = attention_inputs(1, 37, 2, 5, 8, 5, torch.float32, seed=0)
        with pytest.raises(TypeError):
            nt.sparse_attention.sparse_attention(P, R, v.double(), idx, keep, 1.0)
        with pytest.raises(TypeError):
            nt.sparse_attention.sparse_attention(P.half(), R, v, idx, keep, 1.0)
        with pytest.raises(ValueError):
            nt.sparse_attention.sparse_attention(P, R, v[..., :-1], idx, keep, 1.0)
        with pytest.raises(ValueError):
            nt.sparse_attention.sparse_attention(P, R, v, idx[..., :4], keep, 1.0)

    # ------------------------------------------------------------------ custom ops
    def test_custom_ops_match_launchers_and_fake_kernels():
        P, R, v, idx, keep, grad_out = attention_inputs(2, 37, 2, 5, 8, 5, torch.float32, seed=1)
        x = features(2, 37, 12, torch.float32, seed=1)
        ops = torch.ops.nformer
        assert torch.equal(ops.knn_triton(x, 5), nt.knn.knn(x, 5))
        assert torch.equal(ops.reciprocal_mask_triton(idx), keep)
        rev = ops.reverse_index_triton(idx, keep)
        assert torch.equal(rev, reference.reverse_index(idx, keep))
        out, probs = ops.sparse_attention_triton(P, R, v, idx, keep, 0.5)
        assert torch.equal(out, nt.sparse_attention.sparse_attention(P, R, v, idx, keep, 0.5)[0])
        grads = ops.sparse_attention_backward_triton(grad_out, P, R, v, idx, rev, probs, 0.5)
        assert [g.shape for g in grads] == [P.shape, R.shape, v.shape]

        checks = ("test_schema", "test_faketensor")
        torch.library.opcheck(ops.knn_triton.default, (x, 5), test_utils=checks)
        torch.library.opcheck(ops.reciprocal_mask_triton.default, (idx,), test_utils=checks)
        torch.library.opcheck(ops.reverse_index_triton.default, (idx, keep), test_utils=checks)
        torch.library.opcheck(ops.sparse_attention_triton.default, (P, R, v, idx, keep, 0.5),
                              test_utils=checks)
        torch.library.opcheck(ops.sparse_attention_backward_triton.default,
                              (grad_out, P, R, v, idx, rev, probs, 0.5), test_utils=checks)

    # ---- the public API on the triton backend (dispatch, custom ops, registered autograd) ----
    import nformer_kernels as nk

    def test_public_api_on_triton_backend():
        nk.set_backend("triton")
        try:
            g = torch.Generator().manual_seed(3)
            q, k, v = (torch.randn(2, 33, 16, generator=g, dtype=torch.float64).float().requires_grad_()
                       for _ in range(3))
            idx = nk.knn(q.detach(), 6)
            keep = nk.reciprocal_mask(idx)
            assert torch.equal(idx, reference.knn(torch.nn.functional.normalize(q.detach(), dim=-1), 6))
            assert torch.equal(keep, reference.reciprocal_mask(idx))
            landmarks = torch.tensor([1, 7, 30])
            out = nk.neighbor_attention(q, k, v, idx, keep, landmarks, 2)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
            ref = reference.neighbor_attention(qr, kr, vr, idx, keep, landmarks, 2)
            ref_grads = torch.autograd.grad(ref.square().sum(), (qr, kr, vr))
            assert_close(out, ref, 1e-4, "out")
            for name, a, b in zip("qkv", grads, ref_grads):
                assert_close(a, b, 1e-4, f"d{name}")
            model = nk.NFormer(dim=16, depth=2, topk=5, inference_chunk_rows=8).eval()
            lm = torch.tensor([[2, 9, 20], [0, 5, 32]])
            with torch.no_grad():  # triton kernels, rows projected and finished 8 at a time
                chunked = model(q.detach(), landmarks=lm)
            nk.set_backend("reference")
            one_pass = model(q.detach(), landmarks=lm).detach()
            assert_close(chunked, one_pass, 1e-4, "NFormer eval: chunked on triton vs one pass on reference")
        finally:
            nk.set_backend(None)

    # ---- bench/tune.py, the GPU tuning harness, on tiny inputs ----
    def test_bench_tune_harness(tmp_path):
        import json

        from nformer_bench import tune

        for kernel in ("knn", "attention"):
            path = tune.main(["--kernel", kernel, "--n", "40", "--d", "16", "--k", "5", "--dtype", "float32",
                              "--max-configs", "3", "--repeats", "1", "--out", str(tmp_path)])
            rows = json.loads(path.with_suffix(".json").read_text())["rows"]
            assert len(rows) == 3, kernel
            assert all(r["error"] is None and r["ms"] > 0 for r in rows), rows
            assert all(r["match"] >= 0.95 for r in rows), rows  # same result as the launcher's choice
            assert len({(r["variant"]) for r in rows}) == 3
            assert "| variant |" in path.with_suffix(".md").read_text()
