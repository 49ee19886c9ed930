"""The CUDA kernels of csrc/cuda, run on the CPU under an emulation of the CUDA execution model.

tests/cuda_emulation/ compiles csrc/cuda/*_kernels.cuh with the host compiler:
- one std::thread per CUDA thread, blocks one after another;
- __syncthreads/__syncwarp as barriers, and warp votes/shuffles through per-warp slots;
- WMMA as 16x16 tile arithmetic, with its alignment rules asserted;
- dynamic shared memory as one static buffer.

emulated_ops.cpp launches the kernels with the grid, block, shared-memory and tile choices of csrc/cuda/*.cu.
The checks are tests/test_gpu.py's own, run here on CPU tensors.

What this covers: the kernels' indexing, tiling, barriers, and warp-level selection and reductions
(a collective reached by part of a warp deadlocks, so the child pytest runs under a timeout).

What it cannot cover: speed, races that the emulation's barriers hide, the real WMMA register
layouts, and the host launchers themselves. Those need a GPU (tests/test_gpu.py).
"""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATING = os.environ.get("NFORMER_CUDA_EMULATION") == "1"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

if not EMULATING:

    @pytest.mark.slow
    def test_cuda_kernels_under_emulation():
        """Builds the emulation and runs this file's tests in a child pytest (timeout: a deadlock fails)."""
        env = {**os.environ, "NFORMER_CUDA_EMULATION": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        print(child.stdout[-3000:])
        assert child.returncode == 0, child.stdout[-20000:] + child.stderr[-5000:]

else:
    from torch.utils.cpp_extension import load

    import tests.test_gpu as gpu_suite

    HERE = os.path.join(REPO, "tests", "cuda_emulation")

    @pytest.fixture(scope="module")
    def emu():
        build = os.path.join(REPO, "build", "cuda_emulation")
        os.makedirs(build, exist_ok=True)
        return load(name="nformer_cuda_emulation", sources=[os.path.join(HERE, "emulated_ops.cpp")],
                    extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(REPO, "csrc")],
                    extra_cflags=["-O1", "-std=c++20", "-UNDEBUG"], build_directory=build)

    @pytest.fixture
    def on_cpu(monkeypatch, emu):
        """tests/test_gpu.py's checks on CPU tensors, with its ops served by the emulated kernels."""
        monkeypatch.setattr(gpu_suite, "DEV", "cpu")
        ops = {"knn": lambda x, k: emu.knn(x, k, 0, 132), "reciprocal_mask": lambda idx: emu.reciprocal_mask(idx, 132),
               "reverse_index": lambda idx, keep: emu.reverse_index(idx, keep, 132), "sparse_attention": emu.sparse_attention,
               "sparse_attention_backward": emu.sparse_attention_backward}
        monkeypatch.setattr(gpu_suite, "op", lambda backend, name: ops[name])
        return emu

    # (B, N, d, k, rows per block: 0 = the launcher's choice for an H100, 128 = the 128-row WMMA tile)
    KNN_CASES = [(1, 1, 4, 1, 0), (2, 37, 16, 5, 0), (1, 37, 13, 37, 0), (1, 200, 40, 20, 0), (1, 300, 64, 20, 128),
                 (1, 150, 20, 64, 128)]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("B,N,d,k,bm", KNN_CASES)
    def test_knn(on_cpu, dtype, B, N, d, k, bm):
        if bm == 128 and dtype in (torch.float32, torch.float64):
            pytest.skip("the fp32/fp64 FMA kernel has one tile shape")
        x = gpu_suite.unit_rows((B, N, d), dtype, seed=N)
        gpu_suite.assert_knn(x, on_cpu.knn(x, k, bm, 132), k)

    @pytest.mark.parametrize("dtype", gpu_suite.DTYPES, ids=str)
    def test_knn_exact_ties(on_cpu, dtype):
        gpu_suite.test_knn_exact_ties_smaller_index_first("cuda", dtype)

    @pytest.mark.parametrize("B,N,k,source", [(1, 1, 1, "knn"), (3, 37, 5, "knn"), (2, 300, 20, "knn"),
                                              (3, 37, 37, "knn"), (2, 200, 9, "random"), (1, 64, 64, "random")])
    def test_reciprocal_mask_and_reverse_index(on_cpu, B, N, k, source):
        gpu_suite.test_reciprocal_mask_and_reverse_index("cuda", B, N, k, source)

    # (B, N, H, l, k, dv): one row, odd sizes, dv below/above a vector, H=1, k = 64
    ATTENTION_SHAPES = [(1, 1, 1, 1, 1, 8), (3, 37, 2, 5, 7, 16), (1, 67, 2, 5, 20, 128), (2, 29, 1, 3, 17, 5),
                        (1, 70, 4, 2, 64, 24)]

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}N{}H{}l{}k{}dv{}".format(*s))
    @pytest.mark.parametrize("keep_mode", ["reciprocal", "subset", "all"])
    def test_sparse_attention(on_cpu, dtype, shape, keep_mode):
        gpu_suite.test_sparse_attention_forward("cuda", dtype, shape, keep_mode)
        if keep_mode != "all":  # the gather-only backward needs keep within the reciprocal mask
            gpu_suite.test_sparse_attention_backward("cuda", dtype, shape, keep_mode)
