"""Fused streaming inner-product top-k: one program per block of query rows, never N x N.

Each program walks all key tiles: similarity tile by tl.dot (fp32 accumulation), then merges the
tile's best candidates into a per-row top-k buffer held in registers. The buffer is unsorted; it
only needs its worst entry (lowest score, then largest index), which each accepted candidate
replaces. A tile needs at most min(k, #candidates beating the current worst) merge rounds: k for
the first tiles, then a handful once the buffer holds good neighbours.
"""
from dataclasses import replace

import torch
import triton
import triton.language as tl

from nformer_kernels.triton.variants import (POINTER_TYPE, Variant, check_device, check_float,
                                             check_int32_extent, next_pow2)

MAX_K = 64
_NO_ID = tl.constexpr(2147483647)  # int32 max: larger than any row index


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def sorted_ids(vals, ids, real, slots, K, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr):
    """(BLOCK_M, K_PAD) int32: per row, the ids of the K real slots ordered by higher score first,
    then smaller id (slot t holds the t-th); the slots past K are 0."""
    vals = tl.where(real, vals, float("-inf"))
    ids = tl.where(real, ids, _NO_ID)
    out = tl.zeros((BLOCK_M, K_PAD), tl.int32)
    for t in range(0, K):
        best = tl.max(vals, axis=1)
        best_id = tl.min(tl.where(vals == best[:, None], ids, _NO_ID), axis=1)
        out = tl.where(slots == t, best_id[:, None], out)
        vals = tl.where(ids == best_id[:, None], float("-inf"), vals)
        ids = tl.where(ids == best_id[:, None], _NO_ID, ids)
    return out


@triton.jit
def _knn_kernel(x_ptr, idx_ptr, N, D, K,
                K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                Q_RESIDENT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * N * D
    idx_ptr += pid_b * N * K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots = tl.arange(0, K_PAD)[None, :]
    real_slot = slots < K
    # Empty real slots: -inf with distinct ids above any row index (they lose every tie and are
    # replaced first). Padding slots beyond k: +inf, so they are never the worst entry.
    vals = tl.where(real_slot, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, K_PAD), tl.float32)
    ids = (_NO_ID - slots) + tl.zeros((BLOCK_M, K_PAD), tl.int32)

    if Q_RESIDENT:  # the caller guarantees BLOCK_D >= D: query rows loaded once, not once per key tile
        dd = tl.arange(0, BLOCK_D)
        q_rows = tl.load(x_ptr + rows[:, None] * D + dd[None, :],
                         mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        sim = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if Q_RESIDENT:
            kt = tl.load(x_ptr + cols[None, :] * D + dd[:, None],
                         mask=col_ok[None, :] & (dd < D)[:, None], other=0.0)
            sim = _dot(q_rows, kt, sim, ALLOW_TF32, DOT_IN_FP32)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                q = tl.load(x_ptr + rows[:, None] * D + dd[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                kt = tl.load(x_ptr + cols[None, :] * D + dd[:, None],
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                sim = _dot(q, kt, sim, ALLOW_TF32, DOT_IN_FP32)
        # Self is forced first; padding rows/columns never enter a buffer.
        sim = tl.where(cols[None, :] == rows[:, None], float("inf"), sim)
        sim = tl.where(row_ok[:, None] & col_ok[None, :], sim, float("-inf"))

        worst = tl.min(vals, axis=1)
        # Tile indices exceed every index already buffered, so a tie with the worst never wins:
        # strict > counts exactly the candidates that can enter.
        n_better = tl.sum((sim > worst[:, None]).to(tl.int32), axis=1)
        n_rounds = tl.minimum(tl.max(n_better, axis=0), K)
        for _ in range(0, n_rounds):
            best = tl.max(sim, axis=1)
            best_id = tl.min(tl.where(sim == best[:, None], cols[None, :], _NO_ID), axis=1)
            worst = tl.min(vals, axis=1)
            worst_id = tl.max(tl.where(real_slot & (vals == worst[:, None]), ids, -1), axis=1)
            replace = (ids == worst_id[:, None]) & (best > worst)[:, None]
            vals = tl.where(replace, best[:, None], vals)
            ids = tl.where(replace, best_id[:, None], ids)
            sim = tl.where(cols[None, :] == best_id[:, None], float("-inf"), sim)

    out = sorted_ids(vals, ids, real_slot, slots, K, BLOCK_M, K_PAD)
    tl.store(idx_ptr + rows[:, None] * K + slots, out.to(tl.int64),
             mask=row_ok[:, None] & real_slot)


_K_PADS = (16, 32, 64)
# Q-resident variants load the query rows once per program (BLOCK_D = 256 >= d) instead of once per
# key tile: at N = 1M, d = 256 the non-resident 64 x 64 tiles stream ~16 TB through L2, the resident
# 128 x 128 tiles ~4 TB. Chosen on Hopper (sm_90+, 228 KB of shared memory per SM), where the L2 traffic
# rather than the tensor cores bounds the scan; from the AOT report (bench/results/aot): 128 x 128,
# 8 warps: 183-254 registers, 128 KB smem, 1 CTA/SM, no spills at K_PAD <= 32 (and 6 barriers in
# the PTX against 12-13 for the 64 x 64 8-warp tiles: a warpgroup holds whole rows, so the threshold
# test and the merge reduce within warps); K_PAD = 64 takes 64 x 64, 4 warps (214-217 registers,
# 64 KB, 2 CTAs/SM; 128 x 128 spills there). sm_80-sm_89 keep the 64 x 64 non-resident tiles (2 CTAs
# of 8 warps per SM in 100 KB; a resident tile leaves one): an RTX 4090's tensor cores (~165 TFLOP/s
# bf16 with fp32 accumulation) are as near a bound there as its L2, so only a measurement can move it
# (nformer-bench tune times the resident tiles first).
RESIDENT_D = 256
RESIDENT_MIN_CAPABILITY = (9, 0)


def _resident_variant(dtype: torch.dtype, k_pad: int) -> Variant:
    block, warps = (128, 8) if k_pad <= 32 else (64, 4)
    return Variant(
        _knn_kernel,
        {"x_ptr": POINTER_TYPE[dtype], "idx_ptr": "*i64", "N": "i32", "D": "i32", "K": "i32"},
        {"K_PAD": k_pad, "BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": RESIDENT_D,
         "ALLOW_TF32": False, "DOT_IN_FP32": False, "Q_RESIDENT": True},
        num_warps=warps, num_stages=2, aligned_ints=("D",),
        min_arch=10 * RESIDENT_MIN_CAPABILITY[0] + RESIDENT_MIN_CAPABILITY[1])


def _variant(dtype: torch.dtype, k_pad: int, allow_tf32: bool) -> Variant:
    # fp32 "ieee" runs the dot on FMA units with operands in registers: a short d-chunk keeps it
    # spill-free. TF32/fp16/bf16 feed tensor cores through shared memory: a deeper chunk.
    if dtype == torch.float32:
        block_d = 32 if allow_tf32 else 16
    else:
        block_d = 64
    return Variant(
        _knn_kernel,
        {"x_ptr": POINTER_TYPE[dtype], "idx_ptr": "*i64", "N": "i32", "D": "i32", "K": "i32"},
        {"K_PAD": k_pad, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": block_d,
         "ALLOW_TF32": allow_tf32, "DOT_IN_FP32": False, "Q_RESIDENT": False},
        num_warps=8, num_stages=2, aligned_ints=("D",))


def variants() -> list:
    """Every variant knn() can launch on a GPU."""
    return ([_variant(dtype, k_pad, tf32)
             for dtype, tf32 in ((torch.float32, False), (torch.float32, True),
                                 (torch.float16, False), (torch.bfloat16, False))
             for k_pad in _K_PADS]
            + [_resident_variant(dtype, k_pad) for dtype in (torch.float16, torch.bfloat16) for k_pad in _K_PADS])


def choose_variant(dtype: torch.dtype, k: int, allow_tf32: bool = False, d: int = 0,
                   capability=None) -> Variant:
    """The variant knn() launches for k neighbours of d-dimensional rows on a GPU of compute
    `capability` ((major, minor); None: the interpreter, which takes the sm_80-89 choice)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} is outside the triton knn range [1, {MAX_K}]")
    k_pad = max(16, next_pow2(k))
    if (dtype != torch.float32 and 0 < d <= RESIDENT_D and capability is not None
            and tuple(capability) >= RESIDENT_MIN_CAPABILITY):
        return _resident_variant(dtype, k_pad)
    return _variant(dtype, k_pad, bool(allow_tf32) and dtype == torch.float32)


def device_capability(device: torch.device):
    """(major, minor) of a CUDA device; None for CPU tensors (the interpreter)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def knn(x: torch.Tensor, k: int, allow_tf32: bool = False, capability=None) -> torch.Tensor:
    """idx (B,N,k) int64 of the inner-product top-k of rows of x (B,N,d), self first.

    allow_tf32 lets fp32 inputs use TF32 tensor cores (faster, may reorder near-ties).
    capability: the GPU's (major, minor) the variant is chosen for (default: x's device; tests run
    another GPU's choice under the interpreter).
    """
    check_float("x", x)
    check_device("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B,N,d), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    check_int32_extent("x", n * max(d, k))
    if capability is None:
        capability = device_capability(x.device)
    variant = choose_variant(x.dtype, k, allow_tf32, d, capability)
    if triton.knobs.runtime.interpret and x.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot returns garbage (triton 3.8); the upcast is exact
        # (bf16 products are exact in fp32), so only the GPU path differs in operand type.
        variant = replace(variant, constexprs={**variant.constexprs, "DOT_IN_FP32": True})
    x = x.contiguous()
    idx = torch.empty((b, n, k), dtype=torch.int64, device=x.device)
    if b:
        variant.launch((triton.cdiv(n, variant.constexprs["BLOCK_M"]), b), x, idx, n, d, k)
    return idx


@torch.library.custom_op("nformer::knn_triton", mutates_args=())
def knn_triton(x: torch.Tensor, k: int, allow_tf32: bool = False) -> torch.Tensor:
    return knn(x, k, allow_tf32)
