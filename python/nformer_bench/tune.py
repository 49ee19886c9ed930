"""nformer-bench tune: time the Triton kernels over a grid of launch configurations, and the cuda
backend's knn over its row tiles.

  nformer-bench tune [--kernel knn|attention|cuda-knn] [--n 100000] [--dtype bfloat16] [--out DIR]

The launchers pick from fixed variant lists (nformer_kernels/triton/*.py, compiled ahead of time in
CI); this measures alternatives on the GPU at hand so those lists can be retuned from numbers:
every configuration runs the same inputs, is timed (median of --repeats after one warm-up) and
checked against the launcher's current choice. Configurations the GPU cannot run (shared memory,
registers) are recorded with their error. Writes tune-<kernel>-<dtype>-<stamp>.json and .md into
--out (default ./nformer_bench_results). Also runs on CPU tensors under TRITON_INTERPRET=1 (tiny
sizes; for testing the harness).
"""
import argparse
import dataclasses
import importlib
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from nformer_bench.analytic import attention_forward_bytes, knn_flops

# Grids around the launchers' current choices (knn: 64 x 64, or Q-resident 128 x 128 on sm_90+;
# attention: BLOCK_M 32|16, DV_BLOCK 64, 8 warps), timed in order of expected gain (knn_gain_order,
# attention_gain_order) so that a short run (--max-configs 8) measures the likely winners.
# knn streams the query rows in BLOCK_D chunks with every key tile; Q_RESIDENT variants (fp16/bf16,
# d <= 256, BLOCK_D = next_pow2(d)) load them once per program instead: half the L2 traffic at equal
# blocks, but more shared memory and an unpipelined key load. Only a GPU run can say which wins.
KNN_GRID = {"BLOCK_M": (64, 128), "BLOCK_N": (64, 128), "BLOCK_D": (32, 64, 128),
            "num_warps": (4, 8), "num_stages": (2, 3)}
KNN_GRID_RESIDENT = {"Q_RESIDENT": (True,), "BLOCK_M": (64, 128), "BLOCK_N": (64, 128),
                     "num_warps": (4, 8), "num_stages": (1, 2)}
KNN_GRID_FP32 = {**KNN_GRID, "BLOCK_D": (8, 16, 32)}  # "ieee" fp32 dots keep operands in registers
ATTENTION_GRID = {"BLOCK_M": (16, 32, 64), "DV_BLOCK": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2)}


def knn_gain_order(variant):
    """Sort key of the knn grid, the configurations expected to gain most first: query rows resident
    (each key tile loaded once per program, not once per d-chunk), then larger tiles (each loaded key
    serves more query rows: the L2 traffic of N = 1M falls with BLOCK_M), then deeper pipelines;
    within that, the 8-warp configurations before the 4-warp ones."""
    c = variant.constexprs
    return (not c.get("Q_RESIDENT"), -c["BLOCK_M"], -c["BLOCK_N"], -variant.num_stages, -variant.num_warps,
            -c["BLOCK_D"])


def attention_gain_order(variant):
    """Sort key of the attention grid: the gathers bound it, so wider value slices first (fewer passes
    over the neighbour lists per row), then more rows a program, then deeper pipelines."""
    c = variant.constexprs
    return (-c["DV_BLOCK"], -c["BLOCK_M"], -variant.num_stages, -variant.num_warps)


def _grid_variants(base, grids, limit, order):
    """base, then base with every combination of each grid's constexprs / launch options, sorted by
    `order` (expected gain first); the first `limit` of them when limit > 0."""
    out = []
    for grid in grids:
        keys = list(grid)
        for values in itertools.product(*(grid[key] for key in keys)):
            opts = dict(zip(keys, values))
            variant = dataclasses.replace(
                base, constexprs={**base.constexprs, **{k: v for k, v in opts.items() if k in base.constexprs}},
                num_warps=opts.get("num_warps", base.num_warps),
                num_stages=opts.get("num_stages", base.num_stages))
            if variant != base and variant not in out:
                out.append(variant)
    out = [base] + sorted(out, key=order)
    return out[:limit] if limit else out


def _time_variant(fn, on_gpu, repeats):
    from nformer_bench.runner import time_call_ms

    fn()  # warm-up (and compilation)
    return statistics.median(time_call_ms(fn, on_gpu)[0] for _ in range(repeats))


def tune_knn(n, d, k, dtype, device, repeats, limit):
    """Yields one row per knn launch configuration, the launcher's current choice first."""
    knn = importlib.import_module("nformer_kernels.triton.knn")
    import triton

    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1, n, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    base = knn.choose_variant(dtype, k, d=d, capability=knn.device_capability(device))
    if dtype == torch.float32:
        grids = [KNN_GRID_FP32]
    else:
        d_pad = max(16, 1 << (d - 1).bit_length())
        grids = [{**KNN_GRID, "Q_RESIDENT": (False,)}] + (
            [{**KNN_GRID_RESIDENT, "BLOCK_D": (d_pad,)}] if d_pad <= 256 else [])
    on_gpu, reference = device.type == "cuda", None
    for variant in _grid_variants(base, grids, limit, knn_gain_order):
        idx = torch.empty((1, n, k), dtype=torch.int64, device=device)
        blocks = triton.cdiv(n, variant.constexprs["BLOCK_M"])

        def call(variant=variant, idx=idx, blocks=blocks):
            variant.launch((blocks, 1), x, idx, n, d, k)

        row = _measure(variant, call, on_gpu, repeats, knn_flops(n, d), "TFLOP/s")
        if variant is base:
            reference = idx.clone()
        row["match"] = _match(idx, reference, row)
        yield row


CUDA_KNN_ROWS = ("auto", "128", "64")  # NFORMER_CUDA_KNN_ROWS of each cuda-knn row: the launcher's choice first


def tune_cuda_knn(n, d, k, dtype, device, repeats, limit):
    """Yields one row per WMMA row tile of the `cuda` backend's fp16/bf16 knn (the stage-1 kernel of
    the certified knn), forced through NFORMER_CUDA_KNN_ROWS; the launcher's choice first. The
    128-row tile halves the key traffic but runs 1 CTA per SM (200-208 registers), the 64-row one 2."""
    import os
    import types

    import nformer_kernels as nk

    why_not = nk.backends.unavailable_reason("cuda", device) or ("" if torch.cuda.is_available()
                                                                 else "no CUDA device is visible to torch")
    if why_not:  # one row saying why: the grid's other kernels still run
        yield {"variant": "cuda knn_mma_kernel", "constexprs": {}, "num_warps": 8, "num_stages": 1, "ms": None,
               "rate": None, "unit": "TFLOP/s", "error": f"not run: {why_not}", "match": None}
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1, n, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    kernel, reference = nk.backends.kernel("cuda", "knn"), None
    previous = os.environ.get("NFORMER_CUDA_KNN_ROWS")
    try:
        for rows in CUDA_KNN_ROWS[:limit or None]:
            variant = types.SimpleNamespace(label=f"cuda knn_mma_kernel rows={rows}", constexprs={"rows": rows},
                                            num_warps=8, num_stages=1)
            if rows == "auto":
                os.environ.pop("NFORMER_CUDA_KNN_ROWS", None)
            else:
                os.environ["NFORMER_CUDA_KNN_ROWS"] = rows
            out = {}

            def call(out=out):
                out["idx"] = kernel(x, k)

            row = _measure(variant, call, device.type == "cuda", repeats, knn_flops(n, d), "TFLOP/s")
            if rows == "auto" and not row["error"]:
                reference = out["idx"].clone()
            row["match"] = _match(out.get("idx"), reference, row)
            yield row
    finally:
        if previous is None:
            os.environ.pop("NFORMER_CUDA_KNN_ROWS", None)
        else:
            os.environ["NFORMER_CUDA_KNN_ROWS"] = previous


def tune_attention(n, d, k, heads, landmarks, dtype, device, repeats, limit):
    """Yields one row per sparse-attention forward launch configuration, the current choice first."""
    attn = importlib.import_module("nformer_kernels.triton.sparse_attention")
    import nformer_kernels as nk
    import triton

    gen = torch.Generator().manual_seed(0)
    # Neighbours of random 16-d points: scattered in memory, with a realistic reciprocal mask.
    idx = nk.knn(torch.randn(1, n, 16, generator=gen).to(device), k)
    keep = nk.reciprocal_mask(idx)
    P, R = (0.1 * torch.randn(1, n, heads, landmarks, generator=gen).to(device) for _ in range(2))
    v = torch.randn(1, n, d, generator=gen).to(device=device, dtype=dtype)
    dv = d // heads
    out = torch.empty_like(v)
    probs = torch.empty((1, n, heads, k), dtype=torch.float32, device=device)
    scalars = (n, heads, landmarks, dv, k, dv ** -0.5)
    bytes_fwd = attention_forward_bytes(n, d, heads, landmarks, k, v.element_size())
    on_gpu, reference = device.type == "cuda", None
    base = attn.choose_variants(dtype, k)[0]
    for variant in _grid_variants(base, [ATTENTION_GRID], limit, attention_gain_order):
        blocks = triton.cdiv(n, variant.constexprs["BLOCK_M"])

        def call(variant=variant, blocks=blocks):
            variant.launch((blocks, 1), P, R, v, idx, keep.view(torch.uint8), out, probs, *scalars)

        row = _measure(variant, call, on_gpu, repeats, bytes_fwd, "GB/s (analytic)")
        if variant is base:
            reference = out.clone()
        row["match"] = _match(out, reference, row)
        yield row


def _measure(variant, call, on_gpu, repeats, work, unit):
    row = {"variant": variant.label, "constexprs": variant.constexprs, "num_warps": variant.num_warps,
           "num_stages": variant.num_stages, "ms": None, "rate": None, "unit": unit, "error": None}
    try:
        row["ms"] = _time_variant(call, on_gpu, repeats)
        row["rate"] = work / (row["ms"] * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
    except Exception as exc:  # noqa: BLE001 - out of resources etc.: recorded, the sweep goes on
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def _match(got, reference, row):
    """Fraction of elements equal to the launcher's choice (None when either failed)."""
    if row["error"] or reference is None:
        return None
    if got.dtype == torch.int64:
        return float((got == reference).float().mean())
    return float(torch.isclose(got.float(), reference.float(), rtol=1e-2, atol=1e-3).float().mean())


def _cell(text):
    return text.replace("|", "\\|")  # variant labels use | as a separator


def markdown(result):
    meta = result["meta"]
    lines = [f"# Triton {meta['kernel']} tuning on {meta['device_name']}",
             "",
             f"{meta['dtype']}, N={meta['n']}, d={meta['d']}, k={meta['k']}; torch {meta['torch']}, triton "
             f"{meta['triton']}, commit {meta['commit']}, {meta['timestamp']}. First row: the launcher's "
             f"current choice. match: fraction of outputs equal to it.",
             "",
             "| variant | ms | rate | match |", "|---|---:|---:|---:|"]
    ok = sorted((r for r in result["rows"] if r["ms"] is not None), key=lambda r: r["ms"])
    current = result["rows"][0]["variant"]
    for r in [result["rows"][0]] + [r for r in ok if r["variant"] != current]:
        rate = f"{r['rate']:.1f} {r['unit']}" if r["rate"] is not None else "-"
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        match = f"{r['match']:.4f}" if r.get("match") is not None else "-"
        lines.append(f"| {_cell(r['variant'])} | {ms} | {rate} | {match} |")
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {_cell(r['variant'])} | failed: {_cell(r['error'].splitlines()[0][:80])} | | |")
    return "\n".join(lines) + "\n"


def add_arguments(parser):
    parser.add_argument("--kernel", choices=("knn", "attention", "cuda-knn"), default="knn",
                        help="knn, attention: the Triton kernels' launch grids; cuda-knn: the cuda backend's "
                             "WMMA knn row tiles (64, 128)")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--landmarks", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-configs", type=int, default=0, help="try at most this many (0: the whole grid)")
    parser.add_argument("--out", type=Path, default=Path("nformer_bench_results"))


def rows(args):
    """The grid of args.kernel, one row at a time, on the GPU (CPU tensors under TRITON_INTERPRET=1)."""
    dtype = getattr(torch, args.dtype)
    if args.kernel == "cuda-knn":
        return tune_cuda_knn(args.n, args.d, args.k, dtype, torch.device("cuda"), args.repeats, args.max_configs)
    import triton

    device = torch.device("cpu" if triton.knobs.runtime.interpret else "cuda")
    if args.kernel == "knn":
        return tune_knn(args.n, args.d, args.k, dtype, device, args.repeats, args.max_configs)
    return tune_attention(args.n, args.d, args.k, args.heads, args.landmarks, dtype, device, args.repeats,
                          args.max_configs)


def run(args):
    """Time args.kernel's grid; the result (meta + rows) for `write`."""
    import triton

    from nformer_bench.environment import environment

    env = environment(torch.device("cpu" if triton.knobs.runtime.interpret else "cuda"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return {"meta": {"kernel": args.kernel, "device_name": env["device_name"], "dtype": args.dtype,
                     "n": args.n, "d": args.d, "k": args.k, "torch": torch.__version__,
                     "triton": triton.__version__, "commit": (env["git_commit"] or "unknown")[:12],
                     "timestamp": stamp, "command": "nformer-bench tune " + " ".join(getattr(args, "argv", [])[1:])},
            "rows": list(rows(args))}


def write(result, out):
    """tune-<kernel>-<dtype>-<stamp>.json and .md in folder `out`; prints the table, returns the stem path."""
    meta = result["meta"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tune-{meta['kernel']}-{meta['dtype']}-{meta['timestamp']}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    path.with_suffix(".md").write_text(text)
    print(text)
    return path


def main(argv=None):
    """`nformer-bench tune ARGS` as a function: returns the path stem of the files written."""
    parser = argparse.ArgumentParser(prog="nformer-bench tune", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["tune", *(argv or [])]
    return write(run(args), args.out)
