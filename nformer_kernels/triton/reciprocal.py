"""Reciprocal mask and reverse index: one program per block of rows, O(k^2) gathers per row.

Neighbour columns are processed in chunks of K_BLOCK, so any k works with a fixed register tile.
The gathered rows idx[j, :] are k contiguous int64s, re-read across the inner loop from L1/L2.
"""
import torch
import triton
import triton.language as tl

from nformer_kernels.triton.variants import Variant, check_device, check_int32_extent

_BLOCK_M = 32
_K_BLOCKS = (16, 32)


@triton.jit
def _lookup_kernel(idx_ptr, keep_ptr, out_ptr, N, K,
                   BLOCK_M: tl.constexpr, K_BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """For every entry (i, t) with j = idx[i,t], look i up in row j of idx.

    REVERSE=False: out (uint8) = 1 where i is listed in row j (the reciprocal mask; keep unused).
    REVERSE=True: out (int64) = first position t2 with idx[j,t2] == i and keep[j,t2], else -1.
    """
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    idx_ptr += pid_b * N * K
    keep_ptr += pid_b * N * K
    out_ptr += pid_b * N * K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    for c0 in range(0, K, K_BLOCK):
        ts = c0 + tl.arange(0, K_BLOCK)
        tile_ok = row_ok[:, None] & (ts < K)[None, :]
        offs = rows[:, None] * K + ts[None, :]
        nbr = tl.load(idx_ptr + offs, mask=tile_ok, other=0).to(tl.int32)
        pos = tl.full((BLOCK_M, K_BLOCK), -1, tl.int32)
        for t2 in range(0, K):
            match = tl.load(idx_ptr + nbr * K + t2, mask=tile_ok, other=-1) == rows[:, None]
            if REVERSE:
                match = match & (tl.load(keep_ptr + nbr * K + t2, mask=tile_ok, other=0) != 0)
            pos = tl.where((pos < 0) & match, t2, pos)
        if REVERSE:
            tl.store(out_ptr + offs, pos.to(tl.int64), mask=tile_ok)
        else:
            tl.store(out_ptr + offs, (pos >= 0).to(tl.uint8), mask=tile_ok)


def _variant(k_block: int, reverse: bool) -> Variant:
    return Variant(_lookup_kernel,
                   {"idx_ptr": "*i64", "keep_ptr": "*u8", "out_ptr": "*i64" if reverse else "*u8",
                    "N": "i32", "K": "i32"},
                   {"BLOCK_M": _BLOCK_M, "K_BLOCK": k_block, "REVERSE": reverse}, num_warps=4, num_stages=1)


def variants() -> list:
    """Every variant reciprocal_mask() and reverse_index() can launch."""
    return [_variant(kb, reverse) for reverse in (False, True) for kb in _K_BLOCKS]


def choose_variants(k: int) -> tuple:
    """(reciprocal_mask variant, reverse_index variant) for k neighbours."""
    k_block = 16 if k <= 16 else 32
    return _variant(k_block, False), _variant(k_block, True)


def _check_idx(idx: torch.Tensor) -> None:
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.dim() != 3 or idx.shape[2] < 1:
        raise ValueError(f"idx must be (B,N,k) with k >= 1, got shape {tuple(idx.shape)}")
    check_device("idx", idx)
    check_int32_extent("idx", idx.shape[1] * idx.shape[2])


def reciprocal_mask(idx: torch.Tensor) -> torch.Tensor:
    """keep (B,N,k) bool: keep[b,i,t] = i in idx[b, idx[b,i,t], :]."""
    _check_idx(idx)
    idx = idx.contiguous()
    b, n, k = idx.shape
    keep = torch.empty((b, n, k), dtype=torch.bool, device=idx.device)
    if keep.numel():
        variant = choose_variants(k)[0]
        mask_out = keep.view(torch.uint8)  # also passed as the (unread) keep argument
        variant.launch((triton.cdiv(n, _BLOCK_M), b), idx, mask_out, mask_out, n, k)
    return keep


def reverse_index(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """rev (B,N,k) int64: rev[b,j,t'] = t with idx[b,i,t] == j and keep[b,i,t], i = idx[b,j,t']; else -1."""
    _check_idx(idx)
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be bool, got {keep.dtype}")
    if keep.shape != idx.shape:
        raise ValueError(f"keep must have idx's shape {tuple(idx.shape)}, got {tuple(keep.shape)}")
    check_device("keep", keep)
    idx = idx.contiguous()
    keep = keep.contiguous()
    b, n, k = idx.shape
    rev = torch.empty((b, n, k), dtype=torch.int64, device=idx.device)
    if rev.numel():
        variant = choose_variants(k)[1]
        variant.launch((triton.cdiv(n, _BLOCK_M), b), idx, keep.view(torch.uint8), rev, n, k)
    return rev


@torch.library.custom_op("nformer::reciprocal_mask_triton", mutates_args=())
def reciprocal_mask_triton(idx: torch.Tensor) -> torch.Tensor:
    return reciprocal_mask(idx)


@torch.library.custom_op("nformer::reverse_index_triton", mutates_args=())
def reverse_index_triton(idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return reverse_index(idx, keep)
