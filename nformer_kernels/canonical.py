"""The canonical knn score: the one score every knn path ranks by (docs/design.md, "The canonical score").

    U        = canonical_rows(x)          fp32 rows: x / max|x_i|, then / ||.||_2 (cosine), computed
                                          in fp64 by elementwise IEEE operations only, then rounded
    c(i, j)  = canonical_scores(U_i, U_j) fp64: the exact products U_i[e] * U_j[e] summed in LANES
                                          interleaved lanes (lane l takes e = l, l+16, ... in order),
                                          the lanes then folded in halves (l += l + 8, + 4, + 2, + 1)

Every operation is a correctly rounded IEEE operation in a fixed order, and the product of two fp32
values is exact in fp64 (so FMA contraction cannot change a bit): c(i, j) has the same bits on every
device, compiler, thread count and BLAS, and c(i, j) == c(j, i). The top-k of a row is ordered by
(self first, c desc, index asc). Fast paths scan in fp32 or fp16 and only need the bound
score_error_bound() on |stage score - c|: entries further apart than twice the bound are ordered
by their stage scores, closer ones by c (never more than a handful per row).
"""
import contextlib
import math

import torch

LANES = 16  # the interleave of the canonical sum: one AVX-512 pair of fp64 registers, half a warp
_NORM_CHUNK = 1 << 20  # elements per fp64 block of canonical_rows


def _fold(s: torch.Tensor) -> torch.Tensor:
    """(..., LANES) -> (...): s_l += s_{l+h} for h = 8, 4, 2, 1 (fp64, fixed order)."""
    h = s.shape[-1] // 2
    while h:
        s = s[..., :h] + s[..., h:2 * h]
        h //= 2
    return s[..., 0]


def _lanes(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., T, LANES) fp64, zero padded (adding an exact zero changes no lane)."""
    d = t.shape[-1]
    pad = (-d) % LANES
    t = t.to(torch.float64)
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], t.shape[-1] // LANES, LANES)


def canonical_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c(a, b) (fp64) of fp32-valued rows a (..., d) and b (..., d) (broadcastable): exact fp64
    products summed lane by lane in index order, then the lanes folded (module docstring)."""
    a, b = _lanes(a), _lanes(b)
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    s = torch.zeros((*shape, LANES), dtype=torch.float64, device=a.device)
    for t in range(a.shape[-2]):
        s += a[..., t, :] * b[..., t, :]  # the product is exact: one rounding, the addition's
    return _fold(s)


def pair_scores(queries: torch.Tensor, keys: torch.Tensor, qi: torch.Tensor, kj: torch.Tensor,
                chunk_elements: int = 1 << 23) -> torch.Tensor:
    """c(queries[qi[p]], keys[kj[p]]) for every pair p (fp64 (P,)), gathered in bounded chunks."""
    d = max(1, queries.shape[-1])
    step = max(1, chunk_elements // d)
    out = torch.empty(qi.shape[0], dtype=torch.float64, device=queries.device)
    for p0 in range(0, qi.shape[0], step):
        out[p0:p0 + step] = canonical_scores(queries[qi[p0:p0 + step]], keys[kj[p0:p0 + step]])
    return out


def canonical_rows(x: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """The fp32 rows every knn path scores, the same bits on every device.

    cosine: each row divided by its max-abs (no overflow or underflow of the norm), then by its
    L2 norm (canonical order, IEEE sqrt), in fp64; zero rows stay zero. dot: one power of two per
    batch item brings the max-abs into [0.5, 1) (exact, order-preserving). Then rounded to fp32.
    Products of fp16/bf16/fp32 values are exact in fp64 either way.
    """
    xd = x.detach()
    if metric == "dot":
        peak = xd.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float64)
        _, exponent = torch.frexp(torch.where(peak > 0, peak, torch.ones_like(peak)))
        first = torch.div(-exponent, 2, rounding_mode="floor")  # two factors: 2^-exponent alone may overflow
        scaled = xd.to(torch.float64) * torch.exp2(first.double()) * torch.exp2((-exponent - first).double())
        return scaled.to(torch.float32).contiguous()
    out = torch.empty(xd.shape, dtype=torch.float32, device=xd.device)
    flat, dst = xd.reshape(-1, xd.shape[-1]), out.view(-1, xd.shape[-1])
    step = max(1, _NORM_CHUNK // max(1, xd.shape[-1]))
    for r0 in range(0, flat.shape[0], step):
        xa = flat[r0:r0 + step].to(torch.float64)
        peak = xa.abs().amax(dim=-1, keepdim=True)  # max is exact in any order
        xa = xa / torch.where(peak > 0, peak, torch.ones_like(peak))
        norm = row_norms(xa).unsqueeze(-1)
        dst[r0:r0 + step] = (xa / torch.where(norm > 0, norm, torch.ones_like(norm))).to(torch.float32)
    return out


def _gamma(d: int, unit: float) -> float:
    return d * unit / (1 - d * unit)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """(...,) fp64 L2 norms of rows (...,d): the squares summed in the canonical order, an IEEE
    sqrt (exact squares for fp32-valued rows; a fixed order for any rows)."""
    if not rows.shape[-1]:
        return rows.new_zeros(rows.shape[:-1], dtype=torch.float64)
    return canonical_scores(rows, rows).sqrt()


def score_error_bound(rows: torch.Tensor, stage_dtype: torch.dtype = torch.float32,
                      max_key_norm=None) -> torch.Tensor:
    """(...,) fp64 per row i: a bound on |s(i, j) - c(i, j)| for every key j, where s is a stage
    score of rows (fp32 canonical rows) scanned in stage_dtype with fp32 accumulation, any order.

    fp32 stage: gamma_d(2^-24) ||U_i|| M, M = max_key_norm (default: the largest norm of rows, whose
    last dim holds the keys). fp16/bf16 stage: rounding to it (u = 2^-11 / 2^-8; 2^-25 covers the
    fp16 subnormals) plus fp32 accumulation counted twice (tensor cores do not round to nearest).
    Plus c's own gamma_d(2^-53), 1% headroom. docs/design.md derives it; it decides which path
    runs (and how many scores are computed canonically), never the answer.
    """
    d = rows.shape[-1]
    norms = row_norms(rows)
    if max_key_norm is None:
        max_key_norm = norms.amax(dim=-1, keepdim=True) if norms.numel() else norms.new_zeros(())
    top = torch.as_tensor(max_key_norm, dtype=torch.float64, device=rows.device) * (1 + 2.0 ** -20)
    norms = norms * (1 + 2.0 ** -20)  # the norms' own rounding
    product = norms * top
    canonical = _gamma(d, 2.0 ** -53)
    if stage_dtype == torch.float32:
        bound = (_gamma(d, 2.0 ** -24) + canonical) * product
    elif stage_dtype in (torch.float16, torch.bfloat16):
        u = 2.0 ** -11 if stage_dtype == torch.float16 else 2.0 ** -8
        sub = 2.0 ** -25 if stage_dtype == torch.float16 else 0.0  # bf16 has fp32's exponent range
        bound = ((2 * u + u * u) + (2 * _gamma(d, 2.0 ** -24) + canonical) * (1 + u) ** 2) * product \
            + sub * (1 + u) * math.sqrt(d) * (norms + top) + d * sub * sub
    else:
        raise ValueError(f"stage_dtype must be float32, float16 or bfloat16, got {stage_dtype}")
    return bound * 1.01


def _fp32_precision_knobs():
    """The per-backend fp32 matmul precision settings (torch >= 2.9): cuBLAS and oneDNN."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    knobs = [torch.backends.cuda.matmul, getattr(mkldnn, "matmul", None)]
    try:
        return [knob for knob in knobs if knob is not None and isinstance(knob.fp32_precision, str)]
    except (AttributeError, RuntimeError):
        return []


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 matmuls inside the block are IEEE fp32 on every device: the TF32 (cuBLAS) and bf16
    (oneDNN) shortcuts a caller enabled (allow_tf32, set_float32_matmul_precision, fp32_precision)
    are off, then restored. Through the per-backend API where torch has it, so that a caller's own
    legacy flags stay readable (torch refuses to read a mix of the two). While torch.compile traces
    the block is left as it is (dynamo cannot trace the settings): a compiled caller keeps TF32 off."""
    if torch.compiler.is_compiling():
        yield
        return
    knobs = _fp32_precision_knobs()
    if knobs:
        saved = [knob.fp32_precision for knob in knobs]
        for knob in knobs:
            knob.fp32_precision = "ieee"
        try:
            yield
        finally:
            for knob, value in zip(knobs, saved):
                knob.fp32_precision = value
        return
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def fp32_matmul_is_exact() -> bool:
    """Whether an fp32 matmul here is IEEE fp32 right now (what exact_fp32_matmul guarantees)."""
    knobs = _fp32_precision_knobs()
    if knobs and all(knob.fp32_precision == "ieee" for knob in knobs):
        return True
    try:
        return torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32 \
            and all(knob.fp32_precision in ("ieee", "none") for knob in knobs)
    except RuntimeError:  # a mix of torch's legacy and per-backend settings: not known to be exact
        return False
