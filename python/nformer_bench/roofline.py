"""The analytic roofline of every shipped kernel: FLOP and bytes at one size (default N = 1M, d = 256,
k = 20, the certified knn's K' = 32) beside their time floors on the GPUs users run, so that the first
measured numbers (`scripts/gpu_check.sh`) can be read against them.

    python -m nformer_bench.roofline [--n 1000000]          (the table in docs/design.md)

A floor is max(FLOP / peak rate of the units the kernel uses, minimum DRAM bytes / DRAM bandwidth),
from datasheet figures (dense, no sparsity). The knn scans are all-pairs: their DRAM minimum (read
the rows once) is far below what the tiles pull through L2, so their rows also give the L2 bytes of
the tile shape and the L2 bandwidth the kernel needs to stay at its compute floor; L2 bandwidth has
no datasheet figure, so no time is claimed for it. Gathers (rescore, reciprocal, attention) are
counted with no reuse from cache, the N = 1M case.
"""
import argparse
from dataclasses import dataclass
from typing import Optional

from nformer_bench.analytic import (attention_forward_bytes, attention_train_bytes, fused_attention_flops,
                                    knn_flops, linear_flops)

# Datasheet figures (NVIDIA H100 SXM5 and Ada GeForce RTX 4090): DRAM TB/s and peak TFLOP/s of the
# units the kernels use. "tensor": fp16/bf16 inputs with fp32 accumulation (the GeForce rate is half
# its fp16-accumulate rate); "fp32"/"fp64": non-tensor FMA units.
GPUS = {
    "H100 SXM": {"dram_tb_s": 3.35, "tensor": 989.4, "fp32": 66.9, "fp64": 33.5},
    "RTX 4090": {"dram_tb_s": 1.008, "tensor": 165.2, "fp32": 82.6, "fp64": 1.29},
}


@dataclass(frozen=True)
class Cost:
    kernel: str
    flop: float
    units: str  # the peak rate that bounds its arithmetic: "tensor", "fp32" or "fp64"
    dram_bytes: float  # the least it must move to or from DRAM
    l2_bytes: Optional[float] = None  # what its tiles pull through L2 (all-pairs scans only)


def scan_l2_bytes(n, d, elem, block_m, block_n, q_resident):
    """L2 bytes of an all-pairs scan: each program of block_m query rows streams every key row, and
    reloads its query tile once per key tile of block_n unless the query rows stay resident."""
    return n * n * d * elem * (1 / block_m + (0 if q_resident else 1 / block_n))


def costs(n=1_000_000, d=256, k=20, kc=32, heads=2, landmarks=5, ffn=1024):
    """The cost of each kernel (and of one NFormer block) at this size; bf16 features."""
    scan = knn_flops(n, d)
    half_in, fp32_in = n * d * 2 + n * kc * 8, n * d * 4 + n * kc * 8  # rows read once, candidates written
    rows = [
        Cost("knn stage 1, fp16: triton 64 x 64 (sm_80-89)", scan, "tensor", half_in,
             scan_l2_bytes(n, d, 2, 64, 64, False)),
        Cost("knn stage 1, fp16: triton Q-resident 128 x 128 (sm_90+)", scan, "tensor", half_in,
             scan_l2_bytes(n, d, 2, 128, 128, True)),
        Cost("knn stage 1, fp16: cuda WMMA, 128 rows", scan, "tensor", half_in, scan_l2_bytes(n, d, 2, 128, 128, False)),
        Cost("knn stage 1, fp16: cuda WMMA, 64 rows", scan, "tensor", half_in, scan_l2_bytes(n, d, 2, 64, 128, False)),
        Cost("knn stage 1, exact fp32: cuda FMA 64 x 128", scan, "fp32", fp32_in, scan_l2_bytes(n, d, 4, 64, 128, False)),
        Cost("knn stage 1, exact fp32: triton ieee 64 x 64", scan, "fp32", fp32_in, scan_l2_bytes(n, d, 4, 64, 64, False)),
        # K' candidate rows gathered per row, canonical fp64 dots; reads fp32 rows and candidates, writes k ids
        Cost(f"knn_rescore, K' = {kc}", 2 * n * kc * d, "fp64", n * kc * d * 4 + n * d * 4 + n * kc * 8 + n * k * 8),
        # each neighbour's list is gathered to look for the row: k lists of k ids per row
        Cost("reciprocal_mask", 0, "fp32", n * k * 8 + n * k * k * 8 + n * k),
        Cost("neighbor_attention forward, bf16 v", fused_attention_flops(n, d, heads, landmarks, k), "fp32",
             attention_forward_bytes(n, d, heads, landmarks, k, 2)),
        Cost("neighbor_attention forward + backward, bf16 v", 3 * fused_attention_flops(n, d, heads, landmarks, k),
             "fp32", attention_train_bytes(n, d, heads, landmarks, k, 2)),
        # QKV, output projection, FFN: each activation read and written once (bf16), weights negligible
        Cost("NFormer block linear layers, bf16", linear_flops(n, d, ffn), "tensor", n * 2 * (8 * d + 2 * ffn)),
    ]
    return rows


def floor_s(cost, gpu):
    """(seconds, bound): the larger of the compute and the DRAM time on GPU `gpu` (a GPUS entry)."""
    spec = GPUS[gpu]
    compute = cost.flop / (spec[cost.units] * 1e12)
    memory = cost.dram_bytes / (spec["dram_tb_s"] * 1e12)
    return (compute, cost.units) if compute >= memory else (memory, "DRAM")


def _fmt_time(seconds):
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _fmt_amount(value, unit):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def markdown(n=1_000_000, d=256, k=20, kc=32, heads=2, landmarks=5, ffn=1024):
    gpus = list(GPUS)
    lines = [f"N = {n:,}, d = {d}, k = {k}, K' = {kc}, {heads} heads, {landmarks} landmarks, FFN {ffn}. "
             "Floor: max(FLOP / peak of the units used, least DRAM bytes / DRAM bandwidth), datasheet figures "
             "(" + "; ".join(f"{g}: {s['dram_tb_s']:g} TB/s, {s['tensor']:g} TFLOP/s tensor (fp32 accumulation), "
                             f"{s['fp32']:g} fp32, {s['fp64']:g} fp64" for g, s in GPUS.items()) + "). "
             "For the all-pairs scans, L2 bytes of the tile shape and the L2 bandwidth that keeps the scan at "
             "its floor.", "",
             "| kernel | FLOP | least DRAM | L2 | " + " | ".join(f"{g} floor | {g} L2 needed" for g in gpus) + " |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(gpus)]
    for cost in costs(n, d, k, kc, heads, landmarks, ffn):
        cells = [cost.kernel, _fmt_amount(cost.flop, "FLOP") if cost.flop else "-",
                 _fmt_amount(cost.dram_bytes, "B"), _fmt_amount(cost.l2_bytes, "B") if cost.l2_bytes else "-"]
        for gpu in gpus:
            seconds, bound = floor_s(cost, gpu)
            cells.append(f"{_fmt_time(seconds)} ({bound})")
            cells.append(_fmt_amount(cost.l2_bytes / seconds, "B/s") if cost.l2_bytes else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nformer_bench.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    print(markdown(args.n, args.d, args.k), end="")


if __name__ == "__main__":
    main()
