"""Ahead-of-time compilation of every Triton kernel variant for sm_86 (RTX 3090) and sm_90 (H100).

triton.compile(ASTSource(...), target=GPUTarget(...)) needs no GPU, so CI catches kernels that the
interpreter accepts but the compiler rejects, and keeps ptxas register/spill figures in view
(printed with -s). The compile runs in a child process with TRITON_INTERPRET=0, because this test
session interprets the kernels when there is no GPU (tests/conftest.py). ~100 compiles on all cores.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from nformer_kernels.triton import knn, knn_rows, reciprocal, sparse_attention  # noqa: E402
from nformer_kernels.triton.aot import all_variants, format_table  # noqa: E402

# A few spilled bytes per thread are harmless; more means a configuration needs retuning.
MAX_SPILL_BYTES = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launchers_only_pick_listed_variants():
    listed = all_variants()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in range(1, knn.MAX_K + 1):
            for tf32 in (False, True):
                for d in (24, 256, 257, 2048):
                    for capability in (None, (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
                        variant = knn.choose_variant(dtype, k, tf32, d, capability)
                        assert variant in listed, (dtype, k, tf32, d, capability)
                        # Q-resident only where the rows fit one BLOCK_D, on sm_90 and later
                        resident = d <= knn.RESIDENT_D and capability is not None and capability >= (9, 0)
                        assert variant.constexprs["Q_RESIDENT"] == (resident and dtype != torch.float32)
        for k in range(1, sparse_attention.MAX_K + 1):
            for variant in sparse_attention.choose_variants(dtype, k):
                assert variant in listed, (dtype, k, variant.label)
    for k in range(1, knn_rows.MAX_K + 1):
        assert knn_rows.choose_variant(k) in listed, k
    for k in range(1, 300):
        for variant in reciprocal.choose_variants(k):
            assert variant in listed, (k, variant.label)
    with pytest.raises(ValueError):
        knn.choose_variant(torch.float32, knn.MAX_K + 1)
    with pytest.raises(ValueError):
        sparse_attention.choose_variants(torch.float32, sparse_attention.MAX_K + 1)


def test_launch_grids_past_cuda_limits_are_refused():
    """Every launcher goes through Variant.launch, which checks CUDA's grid limits (the interpreter
    has none; on a GPU the driver's error names nothing): B > 65,535 is a ValueError naming B."""
    from nformer_kernels import triton as nf_triton
    from nformer_kernels.backends import kernel
    from nformer_kernels.triton.variants import check_grid

    check_grid("k", (2**31 - 1, 65535))
    with pytest.raises(ValueError, match="grid axis 0"):
        check_grid("k", (2**31, 1))
    if not nf_triton.interpreted and not torch.cuda.is_available():
        pytest.skip("the triton kernels run neither interpreted nor compiled here")
    x = torch.randn(65536, 2, 4, device="cpu" if nf_triton.interpreted else "cuda")
    with pytest.raises(ValueError, match="the batch B is too large for the triton kernel"):
        kernel("triton", "knn")(x, 2)


def test_ctas_per_sm_takes_the_tightest_limit():
    from nformer_kernels.triton.aot import ctas_per_sm

    assert ctas_per_sm("sm_90", 32, 0, 4) == 16  # warps: 64 / 4
    assert ctas_per_sm("sm_90", 128, 8192, 8) == 2  # registers: 65536 / (128 * 32 * 8)
    assert ctas_per_sm("sm_86", 40, 60 * 1024, 4) == 1  # shared memory: 100 KiB / 61 KiB
    assert ctas_per_sm("sm_86", 33, 0, 2) == 16  # CTAs; 33 registers are allocated as 40 (per warp, units of 256)
    assert ctas_per_sm("sm_86", 255, 0, 4) == 2


@pytest.mark.slow
def test_every_variant_compiles_for_sm86_and_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))}
    child = subprocess.run([sys.executable, "-m", "nformer_kernels.triton.aot", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=1500)
    assert child.returncode == 0, child.stderr[-5000:]
    rows = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\ntriton {triton.__version__}\n" + format_table(rows))
    assert [(r["kernel"], r["target"]) for r in rows] == [(v.label, t) for v in all_variants()
                                                          for t in ("sm_86", "sm_90")
                                                          if int(t[3:]) >= v.min_arch]
    assert {r["target"] for r in rows if "Q_RESIDENT=True" in r["kernel"]} == {"sm_90"}  # Hopper tiles
    failed = [f"{r['kernel']} {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    assert all(r["regs"] for r in rows), "ptxas -v log not captured"
    assert all(r["ctas_per_sm"] >= 1 for r in rows), "a variant that cannot be resident"
    spilling = [f"{r['kernel']} {r['target']}: {r['spill_stores']} B" for r in rows
                if r["spill_stores"] > MAX_SPILL_BYTES]
    assert not spilling, "\n".join(spilling)


_MMA_PROBE = r"""
import json, re, torch
from triton.backends.compiler import GPUTarget
from nformer_kernels.triton import aot, knn
found = {}
for arch in (86, 90):
    variant = knn.choose_variant(torch.float16, 32, d=256, capability=divmod(arch, 10))
    ptx = aot._compile(variant, GPUTarget("cuda", arch, 32)).asm["ptx"]
    found[arch] = sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]+|mma\.sync[\w.]+)", ptx)))
print(json.dumps(found))
"""


def test_certified_stage_one_accumulates_fp16_products_in_fp32():
    """The certified bound (canonical.score_error_bound, docs/design.md) models stage 1 as fp16
    operands with an fp32 accumulator: the instructions the fp16 knn tiles compile to must say so
    (mma.sync ...f32.f16.f16.f32 on sm_86, wgmma ...f32.f16.f16 on sm_90), never an fp16 accumulator."""
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO]))}
    child = subprocess.run([sys.executable, "-c", _MMA_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["86"] == ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"]
    assert [m for m in found["90"] if m.startswith("wgmma.mma_async")] == [
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16"]
