"""The `cuda-emulated` backend: csrc/cuda's kernels run on CPU tensors, for machines without a GPU.

emulated_ops.cpp compiles csrc/cuda/*_kernels.cuh with the host compiler (emu.h):
- one std::thread per CUDA thread, blocks one after another;
- __syncthreads/__syncwarp as barriers, warp votes/shuffles through per-warp slots;
- WMMA as 16x16 tile arithmetic, with its alignment rules asserted;
- dynamic shared memory as one static buffer; the device properties are an H100's.
Its launchers take their grid, block, shared-memory and tile choices from the kernel headers'
constexpr helpers, as csrc/cuda/*.cu do. `register()` builds it and registers it as a backend:
torch.library ops nformer_emulated::<op>, with the sparse_attention autograd of the real backends.

Covered: the kernels' indexing, tiling, barriers, and warp-level selection and reductions.
Not covered: speed, races that the emulation's barriers hide, the real WMMA register layouts, and
the host launchers themselves (tests on the `cuda` backend, with a GPU).
"""
import functools
import os

import torch
from torch.utils.cpp_extension import load

from nformer_kernels import backends
from nformer_kernels.ops.attention import register_autograd

NAME = "cuda-emulated"
# An H100 SXM's, unless NFORMER_EMULATED_SM_COUNT says otherwise: the GPU check's dry run sets 2, so
# its two-item batch takes the knn's 128-row tiles as a GPU's one-item-per-SM batch does.
SM_COUNT = int(os.environ.get("NFORMER_EMULATED_SM_COUNT", "132"))
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@functools.lru_cache(maxsize=None)
def build():
    """The compiled emulation module (cached in build/cuda_emulation; ~1-2 min the first time)."""
    out = os.path.join(REPO, "build", "cuda_emulation")
    os.makedirs(out, exist_ok=True)
    return load(name="nformer_cuda_emulation", sources=[os.path.join(HERE, "emulated_ops.cpp")],
                extra_include_paths=[os.path.join(HERE, "include"), HERE, os.path.join(REPO, "csrc")],
                extra_cflags=["-O1", "-std=c++20", "-UNDEBUG"], build_directory=out)


Tensor = torch.Tensor


@functools.lru_cache(maxsize=None)
def register() -> str:
    """Builds the emulation and registers the backend (once); returns its name."""
    emu = build()

    @torch.library.custom_op("nformer_emulated::knn", mutates_args=())
    def knn(x: Tensor, k: int) -> Tensor:
        return emu.knn(x.contiguous(), k, 0, SM_COUNT)

    @torch.library.custom_op("nformer_emulated::knn_rescore", mutates_args=())
    def knn_rescore(x: Tensor, candidates: Tensor, k: int, margin: Tensor) -> tuple[Tensor, Tensor]:
        # As the CUDA launcher: the values as fp32 (the canonical score's input).
        idx, certified = emu.knn_rescore(x.float().contiguous(), candidates.contiguous(), k,
                                         margin.contiguous())
        return idx, certified

    @torch.library.custom_op("nformer_emulated::knn_rows", mutates_args=())
    def knn_rows(x: Tensor, rows: Tensor, k: int) -> Tensor:
        return emu.knn_rows(x, rows, k)

    @torch.library.custom_op("nformer_emulated::reciprocal_mask", mutates_args=())
    def reciprocal_mask(idx: Tensor) -> Tensor:
        return emu.reciprocal_mask(idx.contiguous(), SM_COUNT)

    @torch.library.custom_op("nformer_emulated::reverse_index", mutates_args=())
    def reverse_index(idx: Tensor, keep: Tensor) -> Tensor:
        return emu.reverse_index(idx.contiguous(), keep.contiguous(), SM_COUNT)

    @torch.library.custom_op("nformer_emulated::sparse_attention", mutates_args=())
    def sparse_attention(P: Tensor, R: Tensor, v: Tensor, idx: Tensor, keep: Tensor,
                         scale: float) -> tuple[Tensor, Tensor]:
        out, probs = emu.sparse_attention(*(t.contiguous() for t in (P, R, v, idx, keep)), scale)
        return out, probs

    @torch.library.custom_op("nformer_emulated::sparse_attention_backward", mutates_args=())
    def sparse_attention_backward(grad_out: Tensor, P: Tensor, R: Tensor, v: Tensor, idx: Tensor, rev: Tensor,
                                  probs: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        dP, dR, dv = emu.sparse_attention_backward(
            *(t.contiguous() for t in (grad_out.to(v.dtype), P, R, v, idx, rev, probs)), scale)
        return dP, dR, dv

    def available(device):
        return "" if device.type == "cpu" else f"the CUDA emulation runs CPU tensors, not {device.type}"

    backends.register_backend(backends.Backend(
        NAME, available, lambda: {name: getattr(torch.ops.nformer_emulated, name) for name in backends.KERNELS},
        gather_backward=True))
    register_autograd(NAME)
    return NAME


def knn_with_tile(x: torch.Tensor, k: int, rows_per_block: int) -> torch.Tensor:
    """The emulated knn with its WMMA row tile forced (64 or 128), to test both tile shapes."""
    return build().knn(x.contiguous(), k, rows_per_block, SM_COUNT)
