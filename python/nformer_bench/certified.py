"""nformer-bench certified: nk.knn(precision="certified") vs precision="exact" vs chunked torch.mm + topk.

  nformer-bench certified [--device cpu|cuda] [--n-list 10000,19281,100000,1000000] [--d 256] [--k 20]
                          [--margin 12] [--margins 4,12,32,64] [--kinds gaussian,reid,near-duplicates]
                          [--time-budget-s S] [--out DIR]

fp32 input. Per data kind and N: the wall time of nk.knn precision="exact" and precision="certified"
(both on the selected backend), the certified path's stage split, timed by calling the pieces it
is made of with the inputs it builds (stage 1: fp16 rounding + the backend's knn kernel for
K' = k + margin candidates; stage 2: the score error bound + the backend's knn_rescore kernel;
fallback: the exact rescan (knn_rows, or one symmetric knn when most rows missed) of the rows stage 2
could not certify), the certified fraction and rows recomputed, and the chunked torch.mm + topk
baseline (nformer_bench.baselines, as `nformer-bench run` sets it up). Certified answers are compared
with exact ones (they must be identical: one canonical answer); the baseline by recall against exact.
--margins: the certified fraction of stage 1 + 2 at each of those margins too (which margin
certifies >= 0.99 of the rows).

Kinds: "gaussian" (i.i.d. N(0,1) rows), "reid" (Re-ID-like clustered features,
nformer_bench.runner.synthetic_features) and "near-duplicates" (1,000 cluster centres, members at
noise 1e-4: consecutive video frames; their neighbours differ far below fp32 resolution). Timing: nformer_bench.runner.time_call_ms (CUDA events on
the GPU, perf_counter on the CPU), median of up to --repeats calls after one warm-up call on the
first 2,048 rows. The certified path pays off where fp16 matmuls are faster than fp32 ones (GPU
tensor cores); on a CPU the stage costs and certified fractions are what it measures, and
N = 1e6 is for a GPU. Writes certified-<timestamp>.json and .md to --out (default
./nformer_bench_results).
"""
import json
import os
import statistics
import time
from pathlib import Path

from nformer_bench.knn import WARMUP_ROWS, recall
from nformer_bench import arguments
from nformer_bench.arguments import BenchArgumentError, int_list, nonnegative_int, positive_int
from nformer_bench.sweep import RESULTS_DIR

KINDS = ("gaussian", "reid", "near-duplicates")
DEFAULT_N = (10000, 19281, 100000, 1000000)


def add_arguments(p):
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--n-list", type=int_list, default=list(DEFAULT_N),
                   help="comma-separated N values (default: 10000,19281,100000,1000000)")
    p.add_argument("--d", type=positive_int, default=256)
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--margin", type=nonnegative_int, default=None,
                   help="extra stage-1 candidates per row (default: nk.knn's default margin)")
    p.add_argument("--margins", type=int_list, default=[],
                   help="comma-separated margins whose certified fractions are measured as well")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per measurement (at most)")
    p.add_argument("--repeat-budget-s", type=float, default=30.0,
                   help="stop timing a measurement once its timed calls took this long (>= 1 call)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="whole run: (kind, N) configurations that would start after this are skipped")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for certified-<timestamp>.json/.md (default: ./{RESULTS_DIR})")


def features(kind, n, d, device, seed=0):
    """(1, n, d) fp32 rows of data kind `kind` on `device`."""
    import torch

    from nformer_bench.runner import synthetic_features

    if kind == "reid":
        return synthetic_features(n, d, device, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed)
    if kind == "near-duplicates":
        centres = torch.randn(1000, d, generator=gen)
        members = torch.randint(0, 1000, (n,), generator=gen)
        return (centres[members] + 1e-4 * torch.randn(n, d, generator=gen))[None].to(device)
    return torch.randn(1, n, d, generator=gen).to(device)


def _median_ms(fn, on_gpu, repeats, budget_s):
    """Median wall ms of up to `repeats` calls of fn (stopping once they took budget_s), and the
    last call's result."""
    from nformer_bench.runner import time_call_ms

    out, times = [None], []

    def call():
        out[0] = fn()

    while len(times) < repeats and sum(times) < 1e3 * budget_s:
        times.append(time_call_ms(call, on_gpu)[0])
    return statistics.median(times), out[0]


def stage_pieces(x, k, margin):
    """The certified path's stages as separate calls (nformer_kernels.ops.knn's own), with the inputs
    it builds from x (1,N,d): (stage1, stage2, fallback, backend). stage1() -> candidates;
    stage2(candidates) -> (idx, certified); fallback(idx, certified) -> idx with the uncertified rows
    rescanned exactly."""
    from nformer_kernels import backends, canonical
    from nformer_kernels.ops.knn import rescan, rescore, stage_candidates

    xu = canonical.canonical_rows(x)
    kc = min(xu.shape[1], k + margin)
    backend = backends.resolve("knn", xu.device, k=kc)

    def stage1():
        with canonical.exact_fp32_matmul():
            return stage_candidates(xu, k, margin)

    def stage2(candidates):
        return rescore(xu, candidates, k)

    def fallback(idx, certified):
        with canonical.exact_fp32_matmul():
            return rescan(xu, idx, ~certified, k)

    return stage1, stage2, fallback, backend


def fp64_neighbours(x, k, rows):
    """(len(rows), k) top-k of those rows of x (1,N,d) from float64 cosines of the input values: how
    far the canonical (fp32-row) answer is from an fp64 one on near-ties."""
    import torch

    if rows.numel() == 0:
        return rows.new_empty((0, k))
    xu = torch.nn.functional.normalize(x[0].double(), dim=-1)
    rows = rows.to(xu.device)
    sims = xu[rows] @ xu.T
    sims[torch.arange(rows.numel(), device=xu.device), rows] = float("inf")
    return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k].cpu()


def certified_fraction(x, k, margin):
    """The fraction of rows stage 1 + 2 certify at this margin."""
    stage1, stage2, _, _ = stage_pieces(x, k, margin)
    return stage2(stage1())[1].float().mean().item()


def measure(kind, n, d, k, margin, device, repeats=3, repeat_budget_s=30.0, margins=()):
    """One result row: exact, certified (stage split, stats, agreement) and torch.mm + topk."""
    import torch

    import nformer_kernels as nk
    from nformer_bench.runner import method_call

    on_gpu = device.type == "cuda"
    k = min(k, n)
    x = features(kind, n, d, device)
    warm = x[:, :min(n, WARMUP_ROWS)]
    stage1, stage2, fallback, backend = stage_pieces(x, k, margin)
    baseline = method_call({"method": "knn-torch", "params": {"d": d, "k": k, "heads": 1, "landmarks": 1, "ffn": 1,
                                                          "depth": 1}}, x)

    def exact(t):
        return nk.knn(t, k, precision="exact")

    def certified(t):
        return nk.knn(t, k, precision="certified", margin=margin, return_stats=True)

    for fn in (exact, certified):  # warm-up: thread pools, kernels, allocator
        fn(warm)
    w1, w2, _, _ = stage_pieces(warm, k, margin)
    w2(w1())
    timed = lambda fn: _median_ms(fn, on_gpu, repeats, repeat_budget_s)  # noqa: E731
    exact_ms, idx_exact = timed(lambda: exact(x))
    certified_ms, (idx_cert, stats) = timed(lambda: certified(x))
    stage1_ms, candidates = timed(stage1)
    stage2_ms, (idx_stage, ok) = timed(lambda: stage2(candidates))
    rows_left = int((~ok).sum())
    fallback_ms, idx_stage = timed(lambda: fallback(idx_stage, ok)) if rows_left else (0.0, idx_stage)
    torch_ms, idx_torch = timed(baseline)
    idx_exact, idx_cert, idx_stage = idx_exact[0].cpu(), idx_cert[0].cpu(), idx_stage[0].cpu()
    differing = (idx_cert != idx_exact).any(1).nonzero().squeeze(1)
    truth = fp64_neighbours(x, k, differing)
    return {"status": "ok", "kind": kind, "n": n, "d": d, "k": k, "margin": margin,
            "candidates_per_row": min(n, k + margin), "backend": backend,
            "exact_ms": exact_ms, "certified_ms": certified_ms,
            "stage1_ms": stage1_ms, "stage2_ms": stage2_ms, "fallback_ms": fallback_ms,
            "torch_mm_topk_ms": torch_ms,
            "certified_rows": stats.certified_rows, "rows": stats.rows,
            "certified_fraction": stats.certified_rows / stats.rows, "rows_recomputed": stats.rows_recomputed,
            "candidates_rescored": stats.candidates_rescored,
            "stages_rows_recomputed": rows_left,
            "certified_equals_exact": bool(torch.equal(idx_cert, idx_exact)),
            "certified_rows_equal": (idx_cert == idx_exact).all(1).float().mean().item(),
            "stages_equal_certified": bool(torch.equal(idx_stage, idx_cert)),
            "rows_differing_from_exact": differing.numel(),
            "differing_rows_certified_as_fp64": int((idx_cert[differing] == truth).all(1).sum()),
            "differing_rows_exact_as_fp64": int((idx_exact[differing] == truth).all(1).sum()),
            "certified_recall": recall(idx_cert, idx_exact),
            "certified_fraction_by_margin": {str(m): certified_fraction(x, k, m) for m in margins},
            "torch_mm_topk_recall": recall(idx_torch.cpu(), idx_exact)}


def markdown(result):
    from nformer_bench.report import fmt_ms

    meta = result["meta"]
    commit = (meta["git_commit"] or "unknown")[:12] + (" (dirty)" if meta.get("git_dirty") else "")
    lines = [f"## nformer-bench certified: {meta['device_name']}, float32", "",
             f"d={meta['d']}, k={meta['k']}, margin {meta['margin']} (K' = k + margin candidates per row); "
             f"torch {meta['versions']['torch']}, {meta['torch_threads']} threads, commit {commit}, "
             f"{meta['timestamp']}; median of up to {meta['repeats']} calls after one warm-up call.",
             f"Command: `{meta['command']}`", "", meta["note"], "",
             "| kind | N | backend | exact | certified | stage 1 | stage 2 | fallback | certified rows "
             "| rows recomputed | rows != exact (fp64 agrees: certified / exact) | torch.mm+topk | its recall |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['kind']} | {r['n']} | | | | | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['kind']} | {r['n']} | {r['backend']} | {fmt_ms(r['exact_ms'])} | "
                     f"{fmt_ms(r['certified_ms'])} | {fmt_ms(r['stage1_ms'])} | {fmt_ms(r['stage2_ms'])} | "
                     f"{fmt_ms(r['fallback_ms'])} | {r['certified_fraction']:.4%} | {r['rows_recomputed']} | "
                     f"{r['rows_differing_from_exact']} ({r['differing_rows_certified_as_fp64']} / "
                     f"{r['differing_rows_exact_as_fp64']}) | {fmt_ms(r['torch_mm_topk_ms'])} | "
                     f"{r['torch_mm_topk_recall']:.6f} |")
    lines += ["", "exact / certified: nk.knn(x, k, precision=...). Stage 1: fp16 rounding + the backend's knn "
              "kernel for K' candidates; stage 2: the score error bound + knn_rescore; fallback: the exact rescan of "
              "the rows stage 2 could not certify (each timed alone, with the inputs the certified path builds). "
              "rows != exact: rows whose certified indices differ from precision=\"exact\" ones (0: both return "
              "the canonical answer), and of those the rows where each agrees with the top-k of float64 cosines. "
              "torch.mm+topk: "
              "nformer_bench.baselines.knn_torch_chunked, recall against exact."]
    margins = sorted({int(m) for r in result["rows"] for m in r.get("certified_fraction_by_margin", {})})
    if margins:
        lines += ["", "Certified fraction of the rows (stage 1 + 2) by margin m:", "",
                  "| kind | N | " + " | ".join(f"m = {m}" for m in margins) + " |",
                  "|---|---:|" + "---:|" * len(margins)]
        for r in result["rows"]:
            if r["status"] == "ok":
                by = r["certified_fraction_by_margin"]
                lines.append(f"| {r['kind']} | {r['n']} | " + " | ".join(
                    f"{by[str(m)]:.4f}" if str(m) in by else "" for m in margins) + " |")
    return "\n".join(lines) + "\n"


def run(args):
    """`nformer-bench certified`: the rows, printed as they come, saved as JSON + Markdown; returns
    the JSON path."""
    import torch

    from nformer_bench.environment import environment
    from nformer_bench.report import fmt_ms
    from nformer_kernels.ops.knn import DEFAULT_MARGIN

    t_start = time.monotonic()
    device = arguments.device(args.device)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise BenchArgumentError(f"--kinds: unknown {unknown}; choose from {','.join(KINDS)}")
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    note = ("GPU: the certified path runs its scan in fp16 on tensor cores." if device.type == "cuda" else
            f"CPU ({env['device_name']}): fp16 matmuls are not faster than fp32 ones here, so these are the "
            "stage costs and certified fractions as measured, not the speed-up; N = 1e6 is for a GPU.")
    result = {"meta": {**env, "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "dtype": "float32",
                       "d": args.d, "k": args.k, "margin": margin, "kinds": kinds, "repeats": args.repeats,
                       "repeat_budget_s": args.repeat_budget_s, "time_budget_s": args.time_budget_s,
                       "loadavg_start": os.getloadavg(), "complete": False, "note": note,
                       "command": "nformer-bench " + " ".join(getattr(args, "argv", ["certified"]))},
               "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"certified-{result['meta']['timestamp']}"

    def save():  # after every row, so a run cut short still leaves its rows
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"certified vs exact k-NN on {env['device_name']}, d={args.d} k={args.k} margin={margin}, "
          f"{torch.get_num_threads()} threads\n{note}")
    print(f"{'kind':<10}{'N':>9}{'exact':>11}{'certified':>11}{'stage 1':>11}{'stage 2':>11}{'fallback':>11}"
          f"{'certified':>11}{'torch.mm':>11}")
    with torch.inference_mode():
        for n in sorted(set(args.n_list)):
            for kind in kinds:
                elapsed = time.monotonic() - t_start
                if args.time_budget_s is not None and elapsed > args.time_budget_s:
                    row = {"status": "skipped (time budget)", "kind": kind, "n": n}
                else:
                    try:
                        row = measure(kind, n, args.d, args.k, margin, device, args.repeats, args.repeat_budget_s,
                                      args.margins)
                    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                        if not isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) \
                                and "out of memory" not in str(exc).lower():
                            raise
                        row = {"status": "OOM", "kind": kind, "n": n}
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                result["rows"].append(row)
                save()
                if row["status"] != "ok":
                    print(f"{kind:<10}{n:>9}  {row['status']}", flush=True)
                    continue
                print(f"{kind:<10}{n:>9}" + "".join(f"{fmt_ms(row[key]):>11}" for key in (
                    "exact_ms", "certified_ms", "stage1_ms", "stage2_ms", "fallback_ms")) +
                      f"{row['certified_fraction']:>11.4%}{fmt_ms(row['torch_mm_topk_ms']):>11}", flush=True)
    result["meta"].update(complete=True, wall_s=time.monotonic() - t_start, loadavg_end=os.getloadavg())
    save()
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.json (+ .md)")
    return stem.with_suffix(".json")
