"""nformer-bench: sweep N over the fused NFormer and its dense baselines, write JSON/Markdown/PNG.

  nformer-bench [run] [--n-list 1000,2000] [--max-n N] [--methods nformer,dense-official]
                [--device cpu|cuda] [--dtype float32] [--repeats 5] [--out DIR]
  nformer-bench report [--readme README.md]    # README section from bench/results/*/*.json
  nformer-bench tune [--kernel knn|attention] [--n 100000] [--dtype bfloat16]   # Triton launch configs (GPU)
(`python -m nformer_bench ...` is the same.) Run `nformer-bench run --help` for every option.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nformer_bench.environment import environment, mem_available_bytes

# Relative to the working directory: results never go into the installed package.
RESULTS_DIR = Path("nformer_bench_results")
DEFAULT_N = (1000, 2000, 5000, 10000, 19281, 50000, 93820, 200000, 500000, 1000000)  # Market-1501, MSMT17
RESULT_MARK = "NFORMER_BENCH_RESULT "


def _int_list(text):
    try:
        return [int(float(tok)) for tok in text.split(",") if tok]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser():
    from nformer_bench.runner import DTYPES, METHODS

    parser = argparse.ArgumentParser(prog="nformer-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{run,report}")
    run = sub.add_parser("run", help="sweep N and write results (the default command)")
    run.add_argument("--n-list", type=_int_list, default=list(DEFAULT_N),
                     help="comma-separated N values (default: log-spaced 1k..1M incl. 19281 and 93820)")
    run.add_argument("--max-n", type=int, default=None, help="drop N values above this")
    run.add_argument("--methods", default=",".join(METHODS),
                     help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    run.add_argument("--backends", default=None,
                     help="nformer_kernels backends for the fused methods (default: every one available "
                          "on the device among cuda, triton, cpu; 'reference' only when named)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    run.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (at most)")
    run.add_argument("--repeat-budget-s", type=float, default=30.0,
                     help="stop timing a configuration once its timed calls took this long (>= 1 call)")
    run.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 2 GPU, 1 CPU)")
    run.add_argument("--mem-budget-gb", type=float, default=None,
                     help="CPU: skip N^2 methods whose estimated bytes exceed this (default: 70%% of "
                          "MemAvailable)")
    run.add_argument("--timeout-s", type=float, default=1800.0,
                     help="per configuration: a method whose next N is predicted (from its last latency "
                          "and the FLOP ratio) or seen to take longer is not tried at larger N")
    run.add_argument("--time-budget-s", type=float, default=None,
                     help="whole sweep: configurations that would start after this are skipped")
    run.add_argument("--threads", type=int, default=None,
                     help="torch (and faiss) CPU threads in every configuration (default: torch's default)")
    run.add_argument("--check-n", type=int, default=1000,
                     help="N of the fused-vs-dense-official agreement check (0 = skip)")
    run.add_argument("--d", type=int, default=256)
    run.add_argument("--heads", type=int, default=2)
    run.add_argument("--ffn", type=int, default=1024)
    run.add_argument("--k", type=int, default=20)
    run.add_argument("--landmarks", type=int, default=5)
    run.add_argument("--depth", type=int, default=4,
                     help="blocks of nformer, dense-official and dense-transformer (nformer-layer: 1)")
    run.add_argument("--out", type=Path, default=None,
                     help="directory for <timestamp>.json/.md/-latency.png/-memory.png "
                          "(default: <results-root>/<device-slug>)")
    run.add_argument("--results-root", type=Path, default=RESULTS_DIR)
    run.add_argument("--isolation", choices=("auto", "process", "none"), default="auto",
                     help="process: a fresh subprocess per configuration (CPU peak RSS, OOM kills); "
                          "none: all in this process; auto: process on CPU, none on CUDA (where "
                          "max_memory_allocated and OutOfMemoryError work in-process)")
    report = sub.add_parser("report", help="write the README benchmark section from committed results")
    report.add_argument("--results-root", type=Path, default=Path("bench/results"))
    report.add_argument("--readme", type=Path, default=Path("README.md"))
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # internal: `_worker measure|agree <json config>` in a child process
        _worker(argv[1], json.loads(argv[2]))
        return
    if argv[:1] == ["tune"]:
        from nformer_bench.tune import main as tune_main

        tune_main(argv[1:])
        return
    if not argv or argv[0] not in ("run", "report", "-h", "--help"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.command == "report":
        from nformer_bench.report import update_readme

        update_readme(args.results_root, args.readme)
    else:
        run_sweep(args)


def _worker(kind, cfg):
    from nformer_bench import runner

    if kind == "measure":
        result = runner.measure(cfg)
    else:
        result = runner.agreement(cfg)
    print(RESULT_MARK + json.dumps(result), flush=True)


def available_backends(device):
    """nformer_kernels backends that run tensors on `device` (cuda, triton, cpu; never reference)."""
    import nformer_kernels as nk

    names = []
    for name in ("cuda", "triton", "cpu"):
        nk.set_backend(name)
        try:
            nk.get_backend(device)
            names.append(name)
        except RuntimeError:
            pass
    nk.set_backend(None)
    return names


# ----------------------------------------------------------------------------- sweep
def _import_roots():
    """The folders holding nformer_bench and nformer_kernels, so a child imports the same copies."""
    import nformer_kernels

    return list(dict.fromkeys(str(Path(m.__file__).resolve().parent.parent)
                              for m in (sys.modules[__package__], nformer_kernels)))


def _run_child(kind, cfg, timeout_s):
    """Run one worker in a fresh interpreter; returns its result dict (status OOM/timeout/error on failure)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*_import_roots(), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"  # e.g. the missing-extension warning, once per child
    cmd = [sys.executable, "-m", "nformer_bench", "_worker", kind, json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout_s:g} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):  # SIGKILL: almost always the kernel's OOM killer
        return {"status": "OOM (killed)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: {tail[:300]}"}


def _configs(args, device, backends):
    """(method, backend) pairs in the order they are run."""
    from nformer_bench.runner import BASELINE_BACKEND, FUSED_METHODS, METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    pairs = []
    for method in methods:
        if method in FUSED_METHODS:
            pairs += [(method, b) for b in backends]
        elif method == "knn-faiss" and device.type != "cpu":
            print("knn-faiss: CPU only, skipped on", device.type)
        elif method == "knn-faiss" and not _importable("faiss"):
            print("knn-faiss: faiss is not importable, skipped")
        else:
            pairs.append((method, BASELINE_BACKEND[method]))
    return pairs


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def run_sweep(args):
    import torch

    from nformer_bench import report
    from nformer_bench.analytic import PAPER_GFLOPS_PER_IMG, dense_memory_bytes, method_flops
    from nformer_bench.runner import FUSED_METHODS

    t_start = time.monotonic()
    # SIGTERM (e.g. from `timeout`) -> SystemExit, so subprocess.run kills the running child too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    isolated = args.isolation == "process" or (args.isolation == "auto" and device.type == "cpu")
    backends = args.backends.split(",") if args.backends else available_backends(device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(device)
    n_list = sorted({n for n in args.n_list if args.max_n is None or n <= args.max_n})
    budget = args.mem_budget_gb * 1e9 if args.mem_budget_gb is not None else 0.7 * mem_available_bytes()
    params = {"d": args.d, "heads": args.heads, "ffn": args.ffn, "k": args.k, "landmarks": args.landmarks,
              "depth": args.depth}
    elem_size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    pairs = _configs(args, device, backends)
    budget_note = f", CPU memory budget {budget / 1e9:.1f} GB" if device.type == "cpu" else ""
    print(f"nformer-bench on {env['device_name']}, {args.dtype}, backends {backends or 'none'}, N {n_list}"
          + budget_note)
    if not backends and any(m in FUSED_METHODS for m in args.methods.split(",")):
        print(f"no nformer_kernels backend runs on {device.type} here (is the extension built?): "
              "the fused methods are skipped")

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = args.out or args.results_root / env["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}.json"
    result = {"meta": {**env, "timestamp": stamp, "dtype": args.dtype, "params": params, "warmup": warmup,
                       "repeats": args.repeats, "repeat_budget_s": args.repeat_budget_s, "backends": backends,
                       "cpu_mem_budget_bytes": budget, "isolated": isolated, "complete": False,
                       "loadavg_start": os.getloadavg(),
                       "command": "nformer-bench " + " ".join(args.argv),
                       "paper_gflops_per_img": PAPER_GFLOPS_PER_IMG},
              "agreement": [], "rows": []}

    def save():  # after every configuration, so a run cut short still leaves its rows
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    def launch(kind, cfg, timeout_s):
        if isolated:
            return _run_child(kind, cfg, timeout_s)
        from nformer_bench import runner

        try:  # one failing backend must not end a sweep (a child process would just exit)
            if kind == "measure":
                return runner.measure(cfg, isolated=False)
            return runner.agreement(cfg)
        except Exception as exc:  # noqa: BLE001
            return {"status": f"error: {type(exc).__name__}: {exc}"[:300]}

    if args.check_n > 0 and any(m == "nformer" for m, _ in pairs):
        for backend in backends:
            cfg = {"backend": backend, "n": args.check_n, "device": str(device), "dtype": args.dtype,
                   "threads": args.threads, "params": params}
            res = launch("agree", cfg, args.timeout_s)
            result["agreement"].append({"backend": backend, **res})
            print(f"agreement {backend} N={args.check_n}: {res}")
            save()

    stopped, last_ok = {}, {}
    for n in n_list:
        for method, backend in pairs:
            row = {"method": method, "backend": backend, "n": n, "dtype": args.dtype, **params}
            if method == "nformer-layer":
                row["depth"] = 1
            est = dense_memory_bytes(method, backend, n, args.heads, elem_size)
            row["est_mem_bytes"] = est
            flops = method_flops(method, n, args.d, args.heads, args.landmarks, min(args.k, n), args.ffn,
                                 row["depth"])
            left_s = (args.time_budget_s - (time.monotonic() - t_start) if args.time_budget_s is not None
                      else float("inf"))
            predicted_s = None
            if (method, backend) in last_ok:  # latency scales with the analytic FLOPs
                prev_ms, prev_flops = last_ok[method, backend]
                predicted_s = (warmup + 1) * prev_ms * 1e-3 * flops / prev_flops
            if (method, backend) in stopped:
                row["status"] = f"skipped (stopped at N={stopped[method, backend]})"
            elif device.type == "cpu" and est is not None and est > budget:
                row["status"] = f"OOM (est. {est / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB)"
            elif predicted_s is not None and predicted_s > min(args.timeout_s, left_s):
                limit = "timeout" if args.timeout_s <= left_s else "time budget left"
                row["status"] = f"skipped (predicted {predicted_s:.0f} s > {limit})"
            elif left_s <= 0:
                row["status"] = "skipped (time budget)"
            else:
                cfg = {"method": method, "backend": backend, "n": n, "device": str(device), "dtype": args.dtype,
                       "warmup": warmup, "repeats": args.repeats, "repeat_budget_s": args.repeat_budget_s,
                       "threads": args.threads, "params": params}
                row.update(launch("measure", cfg, args.timeout_s))
            if row["status"] == "ok":
                last_ok[method, backend] = (row["latency_ms"], row["gflops"] * 1e9)
            elif row["status"] != "skipped (time budget)" and (method, backend) not in stopped:
                stopped[method, backend] = n
            result["rows"].append(row)
            save()
            print(report.row_line(row), flush=True)

    result["meta"]["complete"] = True
    result["meta"]["wall_s"] = time.monotonic() - t_start
    result["meta"]["loadavg_end"] = os.getloadavg()
    save()
    print("\n" + report.write_run_files(result, json_path, overwrite=True))
    print(f"wrote {json_path} (+ .md, -latency.png, -memory.png)")
    return json_path
