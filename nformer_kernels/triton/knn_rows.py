"""knn_rows, fused: the canonical top-k of a subset of rows against every row, never rows x N.

It is the rescan of the rows a two-stage knn could not certify, so it must be exact by itself. One
program per BLOCK_M query rows (gathered through `rows`) walks every key tile: an fp32 similarity tile
by tl.dot ("ieee": FMA, no TF32), whose scores f are within beta of the canonical ones c
(canonical.score_error_bound). Each row keeps a buffer of k entries (c, id), unsorted, and a gate: the
c of its canonically worst entry minus beta. A key below the gate has c below that entry's and cannot
enter; the keys at or above it are taken best-f first, one per row per round, their canonical score
computed (16 lanes of exact fp64 products, folded: knn_rescore.fold_lanes) and compared by
(c desc, id asc). Rounds per tile: k while the buffer fills, then the keys within 2*beta of the
gate, a handful except for near-duplicate clusters. Self sits in slot 0 from the start.
"""
import torch
import triton
import triton.language as tl

from nformer_kernels import canonical
from nformer_kernels.triton.knn import sorted_ids
from nformer_kernels.triton.knn_rescore import fold_lanes
from nformer_kernels.triton.variants import (POINTER_TYPE, Variant, check_device, check_int32_extent,
                                             next_pow2)

MAX_K = 64
_NO_ID = tl.constexpr(2147483647)


@triton.jit
def _worst(c, ids, real):
    """Per row, the canonically worst real entry: (c, id) of (lowest c, then largest id)."""
    c_w = tl.min(tl.where(real, c, float("inf")), axis=1)
    id_w = tl.max(tl.where(real & (c == c_w[:, None]), ids, -1), axis=1)
    return c_w, id_w


@triton.jit
def _knn_rows_kernel(x_ptr, rows_ptr, beta_ptr, idx_ptr, N, D, R, K,
                     K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, LANES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * N * D
    rows_ptr += pid_b * R
    beta_ptr += pid_b * R
    idx_ptr += pid_b * R * K

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < R
    qid = tl.load(rows_ptr + r, mask=r_ok, other=0).to(tl.int32)
    beta = tl.load(beta_ptr + r, mask=r_ok, other=0.0)
    slots = tl.arange(0, K_PAD)[None, :]
    real = slots < K
    # Slot 0: self (+inf, never the worst). Empty real slots: -inf with distinct ids above any row
    # index (replaced first). Padding slots beyond k: +inf, never the worst.
    c = tl.where(real & (slots > 0), float("-inf"), float("inf")).to(tl.float64) + tl.zeros((BLOCK_M, K_PAD), tl.float64)
    ids = tl.where(slots == 0, qid[:, None], (_NO_ID - slots) + tl.zeros((BLOCK_M, K_PAD), tl.int32))
    c_w, id_w = _worst(c, ids, real)
    gate = c_w - beta

    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        sim = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            q = tl.load(x_ptr + qid[:, None] * D + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(x_ptr + cols[None, :] * D + dd[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            sim = tl.dot(q, kt, sim, input_precision="ieee")
        # Self is already in slot 0; padding rows/columns never enter.
        sim = tl.where((cols[None, :] == qid[:, None]) | ~(r_ok[:, None] & col_ok[None, :]), float("-inf"), sim)
        pending = (sim > float("-inf")) & (sim.to(tl.float64) >= gate[:, None])
        while tl.max(tl.sum(pending.to(tl.int32), axis=1), axis=0) > 0:
            cand = tl.where(pending, sim, float("-inf"))
            best_f = tl.max(cand, axis=1)
            best_id = tl.min(tl.where(pending & (cand == best_f[:, None]), cols[None, :], _NO_ID), axis=1)
            has = best_id < _NO_ID
            acc = tl.zeros((BLOCK_M, 1, LANES), tl.float64)
            for d0 in range(0, D, LANES):  # lane l adds feature d0 + l: the canonical order
                dd = d0 + tl.arange(0, LANES)
                ok = has[:, None] & (dd < D)[None, :]
                a = tl.load(x_ptr + qid[:, None] * D + dd[None, :], mask=ok, other=0.0)
                g = tl.load(x_ptr + best_id[:, None] * D + dd[None, :], mask=ok, other=0.0)
                acc += tl.reshape(a.to(tl.float64) * g.to(tl.float64), (BLOCK_M, 1, LANES))
            s = tl.reshape(fold_lanes(acc, BLOCK_M, 1, LANES), (BLOCK_M,))
            wins = has & ((s > c_w) | ((s == c_w) & (best_id < id_w)))
            swap = (ids == id_w[:, None]) & wins[:, None]
            c = tl.where(swap, s[:, None], c)
            ids = tl.where(swap, best_id[:, None], ids)
            c_w, id_w = _worst(c, ids, real)
            gate = c_w - beta
            pending = pending & (cols[None, :] != best_id[:, None]) & (sim.to(tl.float64) >= gate[:, None])

    out = sorted_ids(c, ids, real, slots, K, BLOCK_M, K_PAD)  # self (+inf) first
    tl.store(idx_ptr + r[:, None] * K + slots, out.to(tl.int64), mask=r_ok[:, None] & real)


_K_PADS = (16, 32, 64)


def _variant(k_pad: int) -> Variant:
    return Variant(
        _knn_rows_kernel,
        {"x_ptr": POINTER_TYPE[torch.float32], "rows_ptr": "*i64", "beta_ptr": "*fp64", "idx_ptr": "*i64",
         "N": "i32", "D": "i32", "R": "i32", "K": "i32"},
        {"K_PAD": k_pad, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 16, "LANES": canonical.LANES},
        num_warps=8, num_stages=2, aligned_ints=("D",))  # 4 warps: 255 registers and spills (sm_86)


def variants() -> list:
    """Every variant knn_rows() can launch on a GPU."""
    return [_variant(k_pad) for k_pad in _K_PADS]


def choose_variant(k: int) -> Variant:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k} is outside the triton knn_rows range [1, {MAX_K}]")
    return _variant(max(16, next_pow2(k)))


def knn_rows(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """(B,R,k) int64: the canonical top-k of rows `rows` (B,R) of x (B,N,d) against every row, self
    first (the contract's knn_rows; values taken as fp32, as the canonical score's input)."""
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be (B,N,d), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if rows.dtype != torch.int64 or rows.dim() != 2 or rows.shape[0] != b:
        raise ValueError(f"rows must be int64 (B,R) with B={b}, got {rows.dtype} {tuple(rows.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    for name, t in (("x", x), ("rows", rows)):
        check_device(name, t)
    check_int32_extent("x", n * max(d, k))
    variant = choose_variant(k)
    r = rows.shape[1]
    idx = torch.empty((b, r, k), dtype=torch.int64, device=x.device)
    if b * r == 0:
        return idx
    if bool(((rows < 0) | (rows >= n)).any()):
        raise ValueError(f"rows must lie in [0, N={n})")
    x = x.detach().to(torch.float32).contiguous()  # fp16/bf16 exactly, fp64 rounded
    rows = rows.contiguous()
    queries = torch.gather(x, 1, rows[:, :, None].expand(b, r, d))
    beta = canonical.score_error_bound(queries, torch.float32, canonical.row_norms(x).amax(dim=-1, keepdim=True))
    variant.launch((triton.cdiv(r, variant.constexprs["BLOCK_M"]), b), x, rows, beta.contiguous(), idx, n, d, r, k)
    return idx


@torch.library.custom_op("nformer::knn_rows_triton", mutates_args=())
def knn_rows_triton(x: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    return knn_rows(x, rows, k)
