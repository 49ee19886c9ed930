"""Explicit kernel variants: the launchers pick from these lists and aot.py compiles every one.

No triton.autotune: every (constexprs, num_warps, num_stages) a launcher can choose is listed here
so that CI compiles exactly that set ahead of time for the GPU targets.
"""
from dataclasses import dataclass, field

import torch
from triton import knobs

# Triton pointer type of each tensor dtype the kernels accept.
POINTER_TYPE = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.uint8: "*u8",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: argument types, constexpr values and launch options."""

    kernel: object  # triton.JITFunction
    signature: dict  # runtime argument name -> triton type string ("*fp32", "i32", "fp32")
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # Integer arguments that are multiples of 16 in the NFormer configuration (d=256, dv=128).
    # The runtime specialises such values (enabling vector loads); aot.py compiles that case.
    aligned_ints: tuple = ()
    # The oldest GPU arch (major * 10 + minor) a launcher picks this variant for: aot.py compiles it
    # for the targets from there on (a Hopper tile needs more shared memory than sm_86 has).
    min_arch: int = 0

    @property
    def label(self) -> str:
        ptrs = ",".join(t[1:] for t in self.signature.values() if t.startswith("*"))
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{ptrs}|{consts}|w{self.num_warps}s{self.num_stages}]"

    def launch(self, grid, *args):
        check_grid(self.kernel.__name__, grid)
        return self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps,
                                 num_stages=self.num_stages)


# CUDA's grid limits per axis: a launch past them fails with an unspecific driver error (and the
# interpreter has none), so every launcher is checked here, as csrc/cuda's launchers check theirs.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(kernel: str, grid) -> None:
    """ValueError when grid exceeds CUDA's limits (axis 1 is the batch B in every launcher)."""
    for axis, (extent, most) in enumerate(zip(grid, GRID_LIMITS)):
        if extent > most:
            what, advice = ("the batch B", "; split the batch") if axis == 1 else (f"grid axis {axis}", "")
            raise ValueError(f"{what} is too large for the triton kernel {kernel}: {extent} > {most} "
                             f"(CUDA's grid limit){advice}")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the triton backend, "
                        f"got {t.dtype}")


def check_device(name: str, t: torch.Tensor) -> None:
    # The interpreter runs kernels on CPU tensors in numpy; compiled kernels need CUDA tensors.
    if knobs.runtime.interpret:
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor under TRITON_INTERPRET=1, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend, got {t.device}")


def check_int32_extent(name: str, extent: int) -> None:
    # Kernels index within one batch element with int32 offsets (the batch offset is int64).
    if extent >= 2**31:
        raise ValueError(f"{name} is too large for the triton kernels' int32 offsets "
                         f"({extent} elements per batch entry)")
