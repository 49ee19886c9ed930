"""Neighbour attention with the landmark affinity s = scale * <P_i, R_j>, over k neighbours per row.

One program per block of BLOCK_M rows, looping over heads; a row's k scores live in a (BLOCK_M,
K_PAD) fp32 tile (the affinity overflows fp16, so scores and softmax are fp32 for every input
dtype). V rows are gathered per neighbour, DV_BLOCK channels at a time, and accumulated in fp32.

Backward without atomics: a row kernel computes ds (stored (B,N,H,k) fp32) and dP; a column kernel
then gathers, for each row j, the (i, t) pairs that point at j through rev and computes dv and dR.
"""
import torch
import triton
import triton.language as tl

from nformer_kernels.triton.variants import (POINTER_TYPE, Variant, check_device, check_float,
                                             check_int32_extent, next_pow2)

MAX_K = 128
_K_PADS = (16, 32, 64, 128)
_DV_BLOCK = 64


@triton.jit
def _row_tiles(N, K, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr):
    """This program's BLOCK_M rows, their validity, the K_PAD neighbour slots and the valid (row, slot) tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ts = tl.arange(0, K_PAD)
    return rows, row_ok, ts, row_ok[:, None] & (ts < K)[None, :]


@triton.jit
def _attn_fwd_kernel(P_ptr, R_ptr, v_ptr, idx_ptr, keep_ptr, out_ptr, probs_ptr,
                     N, H, L, DV, K, scale,
                     K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, DV_BLOCK: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    P_ptr += pid_b * N * H * L
    R_ptr += pid_b * N * H * L
    v_ptr += pid_b * N * H * DV
    out_ptr += pid_b * N * H * DV
    idx_ptr += pid_b * N * K
    keep_ptr += pid_b * N * K
    probs_ptr += pid_b * N * H * K

    rows, row_ok, ts, tile_ok = _row_tiles(N, K, BLOCK_M, K_PAD)
    dcols = tl.arange(0, DV_BLOCK)

    for h in range(0, H):
        # Reloaded per head (L1 hits) so these tiles are dead during the V loop.
        nbr = tl.load(idx_ptr + rows[:, None] * K + ts[None, :], mask=tile_ok, other=0).to(tl.int32)
        kept = tl.load(keep_ptr + rows[:, None] * K + ts[None, :], mask=tile_ok, other=0) != 0
        s = tl.zeros((BLOCK_M, K_PAD), tl.float32)
        for m in range(0, L):
            p_m = tl.load(P_ptr + (rows * H + h) * L + m, mask=row_ok, other=0.0)
            r_m = tl.load(R_ptr + (nbr * H + h) * L + m, mask=kept, other=0.0)
            s += p_m[:, None] * r_m
        s = tl.where(kept, s * scale, float("-inf"))
        # Rows with nothing kept: shift by 0 so every exp is 0 and probs stay 0 (never NaN).
        row_max = tl.max(s, axis=1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        e = tl.exp(s - row_max[:, None])
        denom = tl.sum(e, axis=1)
        probs = e / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(probs_ptr + (rows[:, None] * H + h) * K + ts[None, :], probs, mask=tile_ok)

        for d0 in range(0, DV, DV_BLOCK):
            dd = d0 + dcols
            d_ok = dd < DV
            acc = tl.zeros((BLOCK_M, DV_BLOCK), tl.float32)
            for t in range(0, K):
                p_t = tl.sum(tl.where(ts[None, :] == t, probs, 0.0), axis=1)
                j_t = tl.load(idx_ptr + rows * K + t, mask=row_ok, other=0).to(tl.int32)
                # Masked-out neighbours (p = 0) cost no memory traffic.
                v_t = tl.load(v_ptr + (j_t[:, None] * H + h) * DV + dd[None, :],
                              mask=(p_t != 0.0)[:, None] & d_ok[None, :], other=0.0)
                acc += p_t[:, None] * v_t.to(tl.float32)
            tl.store(out_ptr + (rows[:, None] * H + h) * DV + dd[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_rows_kernel(go_ptr, R_ptr, v_ptr, idx_ptr, probs_ptr, ds_ptr, dP_ptr,
                          N, H, L, DV, K, scale,
                          K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, DV_BLOCK: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    go_ptr += pid_b * N * H * DV
    v_ptr += pid_b * N * H * DV
    R_ptr += pid_b * N * H * L
    dP_ptr += pid_b * N * H * L
    idx_ptr += pid_b * N * K
    probs_ptr += pid_b * N * H * K
    ds_ptr += pid_b * N * H * K

    rows, row_ok, ts, tile_ok = _row_tiles(N, K, BLOCK_M, K_PAD)
    dcols = tl.arange(0, DV_BLOCK)

    for h in range(0, H):
        probs = tl.load(probs_ptr + (rows[:, None] * H + h) * K + ts[None, :], mask=tile_ok, other=0.0)
        # da[t] = <grad_out[i,h], v[idx[i,t],h]>, needed only where probs != 0.
        da = tl.zeros((BLOCK_M, K_PAD), tl.float32)
        for d0 in range(0, DV, DV_BLOCK):
            dd = d0 + dcols
            d_ok = dd < DV
            g = tl.load(go_ptr + (rows[:, None] * H + h) * DV + dd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            for t in range(0, K):
                p_t = tl.load(probs_ptr + (rows * H + h) * K + t, mask=row_ok, other=0.0)
                j_t = tl.load(idx_ptr + rows * K + t, mask=row_ok, other=0).to(tl.int32)
                v_t = tl.load(v_ptr + (j_t[:, None] * H + h) * DV + dd[None, :],
                              mask=(p_t != 0.0)[:, None] & d_ok[None, :], other=0.0)
                da_t = tl.sum(g * v_t.to(tl.float32), axis=1)
                da = tl.where(ts[None, :] == t, da + da_t[:, None], da)
        ds = probs * (da - tl.sum(probs * da, axis=1)[:, None])
        tl.store(ds_ptr + (rows[:, None] * H + h) * K + ts[None, :], ds, mask=tile_ok)
        nbr = tl.load(idx_ptr + rows[:, None] * K + ts[None, :], mask=tile_ok, other=0).to(tl.int32)
        for m in range(0, L):
            r_m = tl.load(R_ptr + (nbr * H + h) * L + m, mask=probs != 0.0, other=0.0)
            tl.store(dP_ptr + (rows * H + h) * L + m, scale * tl.sum(ds * r_m, axis=1), mask=row_ok)


@triton.jit
def _attn_bwd_cols_kernel(go_ptr, P_ptr, idx_ptr, rev_ptr, probs_ptr, ds_ptr, dR_ptr, dv_ptr,
                          N, H, L, DV, K, scale,
                          K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, DV_BLOCK: tl.constexpr):
    pid_b = tl.program_id(1).to(tl.int64)
    go_ptr += pid_b * N * H * DV
    dv_ptr += pid_b * N * H * DV
    P_ptr += pid_b * N * H * L
    dR_ptr += pid_b * N * H * L
    idx_ptr += pid_b * N * K
    rev_ptr += pid_b * N * K
    probs_ptr += pid_b * N * H * K
    ds_ptr += pid_b * N * H * K

    # Row j of this block receives from every (i, t) with idx[i,t] = j and keep[i,t]; each such i
    # is some idx[j,t'] and t = rev[j,t'].
    rows, row_ok, ts, tile_ok = _row_tiles(N, K, BLOCK_M, K_PAD)
    dcols = tl.arange(0, DV_BLOCK)

    for h in range(0, H):
        src = tl.load(idx_ptr + rows[:, None] * K + ts[None, :], mask=tile_ok, other=0).to(tl.int32)
        src_t = tl.load(rev_ptr + rows[:, None] * K + ts[None, :], mask=tile_ok, other=-1).to(tl.int32)
        linked = src_t >= 0
        ds = tl.load(ds_ptr + (src * H + h) * K + src_t, mask=linked, other=0.0)
        for m in range(0, L):
            p_m = tl.load(P_ptr + (src * H + h) * L + m, mask=linked, other=0.0)
            tl.store(dR_ptr + (rows * H + h) * L + m, scale * tl.sum(ds * p_m, axis=1), mask=row_ok)
        for d0 in range(0, DV, DV_BLOCK):
            dd = d0 + dcols
            d_ok = dd < DV
            acc = tl.zeros((BLOCK_M, DV_BLOCK), tl.float32)
            for t in range(0, K):
                i_t = tl.load(idx_ptr + rows * K + t, mask=row_ok, other=0).to(tl.int32)
                rev_t = tl.load(rev_ptr + rows * K + t, mask=row_ok, other=-1).to(tl.int32)
                p_t = tl.load(probs_ptr + (i_t * H + h) * K + rev_t, mask=rev_t >= 0, other=0.0)
                g_t = tl.load(go_ptr + (i_t[:, None] * H + h) * DV + dd[None, :],
                              mask=(p_t != 0.0)[:, None] & d_ok[None, :], other=0.0)
                acc += p_t[:, None] * g_t.to(tl.float32)
            tl.store(dv_ptr + (rows[:, None] * H + h) * DV + dd[None, :],
                     acc.to(dv_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_INT_ARGS = {"N": "i32", "H": "i32", "L": "i32", "DV": "i32", "K": "i32", "scale": "fp32"}


def _constexprs(k_pad: int) -> dict:
    # Score tiles (BLOCK_M, K_PAD) of <= 2048 elements: <= 8 per thread at 8 warps; 8 warps keep
    # every variant within ~128 registers (few spills) for the many gathers in flight.
    return {"K_PAD": k_pad, "BLOCK_M": 32 if k_pad <= 64 else 16, "DV_BLOCK": _DV_BLOCK}


def _fwd_variant(v_dtype: torch.dtype, k_pad: int) -> Variant:
    vt = POINTER_TYPE[v_dtype]
    return Variant(_attn_fwd_kernel,
                   {"P_ptr": "*fp32", "R_ptr": "*fp32", "v_ptr": vt, "idx_ptr": "*i64",
                    "keep_ptr": "*u8", "out_ptr": vt, "probs_ptr": "*fp32", **_INT_ARGS},
                   _constexprs(k_pad), num_warps=8, num_stages=1, aligned_ints=("DV",))


def _bwd_rows_variant(v_dtype: torch.dtype, k_pad: int) -> Variant:
    vt = POINTER_TYPE[v_dtype]
    return Variant(_attn_bwd_rows_kernel,
                   {"go_ptr": vt, "R_ptr": "*fp32", "v_ptr": vt, "idx_ptr": "*i64",
                    "probs_ptr": "*fp32", "ds_ptr": "*fp32", "dP_ptr": "*fp32", **_INT_ARGS},
                   _constexprs(k_pad), num_warps=8, num_stages=1, aligned_ints=("DV",))


def _bwd_cols_variant(v_dtype: torch.dtype, k_pad: int) -> Variant:
    vt = POINTER_TYPE[v_dtype]
    return Variant(_attn_bwd_cols_kernel,
                   {"go_ptr": vt, "P_ptr": "*fp32", "idx_ptr": "*i64", "rev_ptr": "*i64",
                    "probs_ptr": "*fp32", "ds_ptr": "*fp32", "dR_ptr": "*fp32", "dv_ptr": vt,
                    **_INT_ARGS},
                   _constexprs(k_pad), num_warps=8, num_stages=1, aligned_ints=("DV",))


def variants() -> list:
    """Every variant sparse_attention() and sparse_attention_backward() can launch."""
    return [make(dt, kp) for make in (_fwd_variant, _bwd_rows_variant, _bwd_cols_variant)
            for dt in (torch.float32, torch.float16, torch.bfloat16) for kp in _K_PADS]


def choose_variants(v_dtype: torch.dtype, k: int) -> tuple:
    """(forward, backward rows, backward columns) variants for v of v_dtype and k neighbours."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} is outside the triton sparse_attention range [1, {MAX_K}]")
    k_pad = max(16, next_pow2(k))
    return (_fwd_variant(v_dtype, k_pad), _bwd_rows_variant(v_dtype, k_pad),
            _bwd_cols_variant(v_dtype, k_pad))


def _check_inputs(P, R, v, idx):
    check_float("v", v)
    for name, t in (("P", P), ("R", R)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the accumulation dtype), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B,N,H,l), got shape {tuple(t.shape)}")
    if R.shape != P.shape:
        raise ValueError(f"R must have P's shape {tuple(P.shape)}, got {tuple(R.shape)}")
    b, n, h, _ = P.shape
    if h < 1:
        raise ValueError(f"P must have at least one head, got shape {tuple(P.shape)}")
    if v.dim() != 3 or v.shape[:2] != (b, n) or v.shape[2] % h:
        raise ValueError(f"v must be (B,N,H*dv) = ({b},{n},{h}*dv), got shape {tuple(v.shape)}")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if idx.dim() != 3 or idx.shape[:2] != (b, n) or idx.shape[2] < 1:
        raise ValueError(f"idx must be (B,N,k) = ({b},{n},k), got shape {tuple(idx.shape)}")
    for name, t in (("P", P), ("R", R), ("v", v), ("idx", idx)):
        check_device(name, t)
    k = idx.shape[2]
    check_int32_extent("v", n * max(v.shape[2], h * P.shape[3], h * k))


def sparse_attention(P, R, v, idx, keep, scale):
    """(out (B,N,H*dv) in v.dtype, probs (B,N,H,k) fp32): softmax over kept neighbours of scale*<P_i,R_j>."""
    _check_inputs(P, R, v, idx)
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be bool, got {keep.dtype}")
    if keep.shape != idx.shape:
        raise ValueError(f"keep must have idx's shape {tuple(idx.shape)}, got {tuple(keep.shape)}")
    b, n, h, l = P.shape
    k = idx.shape[2]
    dv = v.shape[2] // h
    variant = choose_variants(v.dtype, k)[0]
    P, R, v, idx, keep = (t.contiguous() for t in (P, R, v, idx, keep))
    out = torch.empty_like(v)
    probs = torch.empty((b, n, h, k), dtype=torch.float32, device=v.device)
    if b and n:
        grid = (triton.cdiv(n, variant.constexprs["BLOCK_M"]), b)
        variant.launch(grid, P, R, v, idx, keep.view(torch.uint8), out, probs,
                       n, h, l, dv, k, float(scale))
    return out, probs


def sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale):
    """(dP, dR fp32, dv in v.dtype) of sparse_attention; rev from reverse_index(idx, keep)."""
    _check_inputs(P, R, v, idx)
    if rev.dtype != torch.int64:
        raise TypeError(f"rev must be int64, got {rev.dtype}")
    if rev.shape != idx.shape:
        raise ValueError(f"rev must have idx's shape {tuple(idx.shape)}, got {tuple(rev.shape)}")
    b, n, h, l = P.shape
    k = idx.shape[2]
    dv = v.shape[2] // h
    if grad_out.shape != v.shape:
        raise ValueError(f"grad_out must have v's shape {tuple(v.shape)}, got {tuple(grad_out.shape)}")
    if probs.dtype != torch.float32:
        raise TypeError(f"probs must be float32, got {probs.dtype}")
    if probs.shape != (b, n, h, k):
        raise ValueError(f"probs must have shape {(b, n, h, k)}, got {tuple(probs.shape)}")
    _, rows_variant, cols_variant = choose_variants(v.dtype, k)
    grad_out = grad_out.to(v.dtype).contiguous()
    P, R, v, idx, rev, probs = (t.contiguous() for t in (P, R, v, idx, rev, probs))
    dP = torch.empty_like(P)
    dR = torch.empty_like(R)
    dv_out = torch.empty_like(v)
    if not (b and n):
        return dP, dR, dv_out
    ds = torch.empty_like(probs)
    grid = (triton.cdiv(n, rows_variant.constexprs["BLOCK_M"]), b)
    rows_variant.launch(grid, grad_out, R, v, idx, probs, ds, dP, n, h, l, dv, k, float(scale))
    cols_variant.launch(grid, grad_out, P, idx, rev, probs, ds, dR, dv_out,
                        n, h, l, dv, k, float(scale))
    return dP, dR, dv_out


Tensor = torch.Tensor


@torch.library.custom_op("nformer::sparse_attention_triton", mutates_args=())
def sparse_attention_triton(P: Tensor, R: Tensor, v: Tensor, idx: Tensor, keep: Tensor,
                            scale: float) -> tuple[Tensor, Tensor]:
    return sparse_attention(P, R, v, idx, keep, scale)


@torch.library.custom_op("nformer::sparse_attention_backward_triton", mutates_args=())
def sparse_attention_backward_triton(grad_out: Tensor, P: Tensor, R: Tensor, v: Tensor, idx: Tensor,
                                     rev: Tensor, probs: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return sparse_attention_backward(grad_out, P, R, v, idx, rev, probs, scale)
