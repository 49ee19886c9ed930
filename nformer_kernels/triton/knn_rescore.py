"""knn_rescore, stage 2 of the two-stage knn, fused: canonical scores, top-k selection, certificate.

One program per BLOCK_M rows: the rows' K' candidate rows are gathered LANES features at a time as
one (BLOCK_M, K'_PAD, LANES) tile, and their exact fp64 products added lane by lane: the canonical
score (nformer_kernels.canonical), the lanes folded in halves at the end, the same bits as every
other backend. Each candidate's rank in the order (score desc, id asc, slot asc) is counted over a
(BLOCK_M, K'_PAD, K'_PAD) comparison, and the candidates ranked below k are stored straight to their
slot. Certificate: (K' >= N) | (c(last candidate) + margin < c_(k)) (docs/design.md, "Two-stage knn").
"""
import torch
import triton
import triton.language as tl

from nformer_kernels.canonical import LANES
from nformer_kernels.triton.variants import POINTER_TYPE, Variant, check_device, check_int32_extent, next_pow2

MAX_CANDIDATES = 64  # the triton knn's MAX_K: stage 1 never hands this backend more
_NO_ID = tl.constexpr(2147483647)


@triton.jit
def fold_lanes(acc, M: tl.constexpr, C: tl.constexpr, LANES: tl.constexpr):
    """(M, C, LANES) fp64 lane sums -> (M, C) canonical scores: lane l += lane l + h, h = 8, 4, 2, 1
    (each tl.sum adds two numbers: one correctly rounded addition, the documented order)."""
    h: tl.constexpr = LANES // 2
    acc = tl.sum(tl.reshape(acc, (M, C, 2, h)), axis=2)
    acc = tl.sum(tl.reshape(acc, (M, C, 2, h // 2)), axis=2)
    acc = tl.sum(tl.reshape(acc, (M, C, 2, h // 4)), axis=2)
    s = tl.sum(tl.reshape(acc, (M, C, 2, h // 8)), axis=2)
    return tl.reshape(s, (M, C))


@triton.jit
def _knn_rescore_kernel(x_ptr, cand_ptr, margin_ptr, idx_ptr, cert_ptr, N, D, KC, K,
                        KC_PAD: tl.constexpr, BLOCK_M: tl.constexpr, LANES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * N * D
    cand_ptr += pid_b * N * KC
    margin_ptr += pid_b * N
    idx_ptr += pid_b * N * K
    cert_ptr += pid_b * N

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    slots = tl.arange(0, KC_PAD)
    ok = row_ok[:, None] & (slots < KC)[None, :]
    cand = tl.load(cand_ptr + rows[:, None] * KC + slots[None, :], mask=ok, other=0).to(tl.int32)
    acc = tl.zeros((BLOCK_M, KC_PAD, LANES), tl.float64)
    for d0 in range(0, D, LANES):  # lane l adds feature d0 + l: the canonical order
        dd = d0 + tl.arange(0, LANES)
        d_ok = dd < D
        q = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(x_ptr + cand[:, :, None] * D + dd[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
        acc += q.to(tl.float64)[:, None, :] * g.to(tl.float64)  # exact products: one rounding, the sum's
    s = fold_lanes(acc, BLOCK_M, KC_PAD, LANES)

    last = tl.max(tl.where(slots[None, :] == KC - 1, s, float("-inf")), axis=1)
    s = tl.where(cand == rows[:, None], float("inf"), s)  # self first
    s = tl.where(ok, s, float("-inf"))  # padding ranks after every candidate
    ids = tl.where(ok, cand, _NO_ID)
    sa = s[:, :, None]
    sb = s[:, None, :]
    ia = ids[:, :, None]
    ib = ids[:, None, :]
    before = (sb > sa) | ((sb == sa) & ((ib < ia) | ((ib == ia) & (slots[None, None, :] < slots[None, :, None]))))
    rank = tl.sum(before.to(tl.int32), axis=2)
    chosen = ok & (rank < K)
    tl.store(idx_ptr + rows[:, None] * K + rank, cand.to(tl.int64), mask=chosen)
    kth = tl.max(tl.where(ok & (rank == K - 1), s, float("-inf")), axis=1)
    margin = tl.load(margin_ptr + rows, mask=row_ok, other=0.0)
    cert = (KC >= N) | (last + margin < kth)
    tl.store(cert_ptr + rows, cert.to(tl.uint8), mask=row_ok)


# K'_PAD -> BLOCK_M: BLOCK_M * K'_PAD = 128 (row, candidate) pairs per program, so the gathered tile
# is 2K elements (16 fp64 accumulators per thread) and the rank comparison 2-8K, over 128 threads.
_BLOCK_M = {16: 8, 32: 4, 64: 2}


def _variant(kc_pad: int) -> Variant:
    return Variant(
        _knn_rescore_kernel,
        {"x_ptr": POINTER_TYPE[torch.float32], "cand_ptr": "*i64", "margin_ptr": "*fp64",
         "idx_ptr": "*i64", "cert_ptr": "*u8", "N": "i32", "D": "i32", "KC": "i32", "K": "i32"},
        {"KC_PAD": kc_pad, "BLOCK_M": _BLOCK_M[kc_pad], "LANES": LANES},
        num_warps=4, num_stages=1, aligned_ints=("D",))


def variants() -> list:
    """Every variant knn_rescore() can launch on a GPU."""
    return [_variant(kc_pad) for kc_pad in _BLOCK_M]


def choose_variant(kc: int) -> Variant:
    if not 1 <= kc <= MAX_CANDIDATES:
        raise ValueError(f"K'={kc} candidates is outside the triton knn_rescore range [1, {MAX_CANDIDATES}]")
    return _variant(max(16, next_pow2(kc)))


def knn_rescore(x: torch.Tensor, candidates: torch.Tensor, k: int, margin: torch.Tensor):
    """(idx (B,N,k) int64, certified (B,N) bool): the contract's knn_rescore (torch_ops.rescore_candidates)."""
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    x = x.detach().to(torch.float32)  # the canonical score's input: fp16/bf16 exactly, fp64 rounded
    if x.dim() != 3:
        raise ValueError(f"x must be (B,N,d), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if candidates.dtype != torch.int64 or candidates.dim() != 3 or tuple(candidates.shape[:2]) != (b, n):
        raise ValueError(f"candidates must be int64 (B,N,K') = ({b},{n},K'), got {candidates.dtype} "
                         f"{tuple(candidates.shape)}")
    kc = candidates.shape[2]
    if not 1 <= k <= kc:
        raise ValueError(f"need 1 <= k <= K', got k={k}, K'={kc}")
    if margin.dtype != torch.float64 or tuple(margin.shape) != (b, n):
        raise ValueError(f"margin must be ({b},{n}) float64, got {margin.dtype} {tuple(margin.shape)}")
    for name, t in (("x", x), ("candidates", candidates), ("margin", margin)):
        check_device(name, t)
    check_int32_extent("x", n * max(d, kc))
    variant = choose_variant(kc)
    idx = torch.empty((b, n, k), dtype=torch.int64, device=x.device)
    certified = torch.empty((b, n), dtype=torch.bool, device=x.device)
    if b * n:
        variant.launch((triton.cdiv(n, variant.constexprs["BLOCK_M"]), b), x.contiguous(), candidates.contiguous(),
                       margin.contiguous(), idx, certified.view(torch.uint8), n, d, kc, k)
    return idx, certified


@torch.library.custom_op("nformer::knn_rescore_triton", mutates_args=())
def knn_rescore_triton(x: torch.Tensor, candidates: torch.Tensor, k: int,
                       margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return knn_rescore(x, candidates, k, margin)
