"""Ahead-of-time compilation of every Triton kernel variant for sm_86 (RTX 3090) and sm_90 (H100).

triton.compile(ASTSource(...), target=GPUTarget(...)) needs no GPU, so CI catches kernels that the
interpreter accepts but the compiler rejects, and keeps ptxas register/spill figures in view
(printed with -s). Run: pytest -s tests/test_triton_compile.py  (~100 compiles, ~2 min on 2 cores).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import importlib  # noqa: E402

from nformer_kernels.triton.aot import all_variants, compile_all, format_table  # noqa: E402

# import_module: the package's knn / sparse_attention attributes are the launcher functions.
knn = importlib.import_module("nformer_kernels.triton.knn")
reciprocal = importlib.import_module("nformer_kernels.triton.reciprocal")
sparse_attention = importlib.import_module("nformer_kernels.triton.sparse_attention")

# A few spilled bytes per thread are harmless; more means a configuration needs retuning.
MAX_SPILL_BYTES = 64

pytestmark = pytest.mark.skipif(
    triton.knobs.runtime.interpret,
    reason="TRITON_INTERPRET=1 in this process: kernels are interpreted, not compilable")


def test_launchers_only_pick_listed_variants():
    listed = all_variants()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in range(1, knn.MAX_K + 1):
            for tf32 in (False, True):
                assert knn.choose_variant(dtype, k, tf32) in listed, (dtype, k, tf32)
        for k in range(1, sparse_attention.MAX_K + 1):
            for variant in sparse_attention.choose_variants(dtype, k):
                assert variant in listed, (dtype, k, variant.label)
    for k in range(1, 300):
        for variant in reciprocal.choose_variants(k):
            assert variant in listed, (k, variant.label)
    with pytest.raises(ValueError):
        knn.choose_variant(torch.float32, knn.MAX_K + 1)
    with pytest.raises(ValueError):
        sparse_attention.choose_variants(torch.float32, sparse_attention.MAX_K + 1)


@pytest.mark.slow
def test_every_variant_compiles_for_sm86_and_sm90():
    rows = compile_all()
    print(f"\ntriton {triton.__version__}\n" + format_table(rows))
    assert len(rows) == 2 * len(all_variants())
    failed = [f"{r['kernel']} {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    assert all(r["regs"] for r in rows), "ptxas -v log not captured"
    spilling = [f"{r['kernel']} {r['target']}: {r['spill_stores']} B" for r in rows
                if r["spill_stores"] > MAX_SPILL_BYTES]
    assert not spilling, "\n".join(spilling)
