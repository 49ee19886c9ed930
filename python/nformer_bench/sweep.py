"""nformer-bench run: sweep N over the fused NFormer and its dense baselines, write JSON/Markdown/PNG.

Each (method, backend) runs at every N in increasing order until it fails: an out-of-memory
estimate above the CPU budget, an OOM, or a predicted time (from its last latency and the FLOP
ratio) above --timeout-s or the time left stops it at larger N. Rows are saved after every
configuration, so a run cut short still leaves them.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

from nformer_bench import arguments
from nformer_bench.analytic import BASELINE_BACKEND, DTYPE_NAMES, FUSED_METHODS, METHODS
from nformer_bench.arguments import BenchArgumentError, int_list, nonnegative_int, positive_int

# Relative to the working directory: results never go into the installed package.
RESULTS_DIR = Path("nformer_bench_results")
DEFAULT_N = (1000, 2000, 5000, 10000, 19281, 50000, 93820, 200000, 500000, 1000000)  # Market-1501, MSMT17


def add_arguments(run):
    run.add_argument("--n-list", type=int_list, default=list(DEFAULT_N),
                     help="comma-separated N values (default: log-spaced 1k..1M incl. 19281 and 93820)")
    run.add_argument("--max-n", type=positive_int, default=None, help="drop N values above this")
    run.add_argument("--methods", default=",".join(METHODS),
                     help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    run.add_argument("--backends", default=None,
                     help="nformer_kernels backends for the fused methods (default: every one with kernels "
                          "of its own available on the device; 'torch' and 'reference' only when named)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    run.add_argument("--repeats", type=positive_int, default=5, help="timed calls per configuration (at most)")
    run.add_argument("--repeat-budget-s", type=float, default=30.0,
                     help="stop timing a configuration once its timed calls took this long (>= 1 call)")
    run.add_argument("--warmup", type=nonnegative_int, default=None, help="untimed calls first (default: 2 GPU, 1 CPU)")
    run.add_argument("--mem-budget-gb", type=float, default=None,
                     help="CPU: skip N^2 methods whose estimated bytes exceed this (default: 70%% of "
                          "MemAvailable)")
    run.add_argument("--timeout-s", type=float, default=1800.0,
                     help="per configuration: a method whose next N is predicted (from its last latency "
                          "and the FLOP ratio) or seen to take longer is not tried at larger N")
    run.add_argument("--time-budget-s", type=float, default=None,
                     help="whole sweep: configurations that would start after this are skipped")
    run.add_argument("--threads", type=positive_int, default=None,
                     help="torch (and faiss) CPU threads in every configuration (default: torch's default)")
    run.add_argument("--check-n", type=positive_int, default=1000,
                     help="N of the fused-vs-dense-official agreement check (0 = skip)")
    run.add_argument("--d", type=positive_int, default=256)
    run.add_argument("--heads", type=positive_int, default=2)
    run.add_argument("--ffn", type=positive_int, default=1024)
    run.add_argument("--k", type=positive_int, default=20)
    run.add_argument("--landmarks", type=positive_int, default=5)
    run.add_argument("--depth", type=positive_int, default=4,
                     help="blocks of nformer, dense-official and dense-transformer (nformer-layer: 1)")
    run.add_argument("--out", type=Path, default=None,
                     help="directory for <timestamp>.json/.md/-latency.png/-memory.png "
                          "(default: <results-root>/<device-slug>)")
    run.add_argument("--results-root", type=Path, default=RESULTS_DIR,
                     help=f"default: ./{RESULTS_DIR} in the working directory")
    run.add_argument("--isolation", choices=("auto", "process", "none"), default="auto",
                     help="process: a fresh subprocess per configuration (CPU peak RSS, OOM kills); "
                          "none: all in this process; auto: process on CPU, none on CUDA (where "
                          "max_memory_allocated and OutOfMemoryError work in-process)")


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def method_backends(methods, device, backends):
    """(method, backend) pairs in the order they are run."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BenchArgumentError(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
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


class Sweep:
    """One sweep's settings, resolved from the parsed `run` arguments; iterate it for its results."""

    def __init__(self, args):
        import torch

        from nformer_bench.environment import environment, mem_available_bytes
        from nformer_bench.runner import kernel_backends

        self.args = args
        device = arguments.device(args.device)
        self.device = device
        self.warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
        self.isolated = args.isolation == "process" or (args.isolation == "auto" and device.type == "cpu")
        self.backends = args.backends.split(",") if args.backends else kernel_backends(device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        self.env = environment(device)
        self.n_list = sorted({n for n in args.n_list if args.max_n is None or n <= args.max_n})
        self.mem_budget = (args.mem_budget_gb * 1e9 if args.mem_budget_gb is not None
                           else 0.7 * mem_available_bytes())
        self.params = {"d": args.d, "heads": args.heads, "ffn": args.ffn, "k": args.k,
                       "landmarks": args.landmarks, "depth": args.depth}
        self.elem_size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        self.pairs = method_backends(self.methods, device, self.backends)

    def meta(self):
        from nformer_bench.analytic import PAPER_GFLOPS_PER_IMG

        a = self.args
        return {**self.env, "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "dtype": a.dtype,
                "params": self.params, "warmup": self.warmup, "repeats": a.repeats,
                "repeat_budget_s": a.repeat_budget_s, "backends": self.backends,
                "cpu_mem_budget_bytes": self.mem_budget, "isolated": self.isolated, "complete": False,
                "loadavg_start": os.getloadavg(), "command": "nformer-bench " + " ".join(a.argv),
                "paper_gflops_per_img": PAPER_GFLOPS_PER_IMG}

    def __iter__(self):
        """Yields ("agreement", result) for each backend's agreement check, then ("rows", row) for
        every configuration, in the order they ran."""
        from nformer_bench.analytic import dense_memory_bytes, method_flops
        from nformer_bench.runner import launch

        a, device, params = self.args, self.device, self.params
        t_start = time.monotonic()
        if a.check_n > 0 and any(m == "nformer" for m, _ in self.pairs):
            for backend in self.backends:
                cfg = {"backend": backend, "n": a.check_n, "device": str(device), "dtype": a.dtype,
                       "threads": a.threads, "params": params}
                yield "agreement", {"backend": backend, **launch("agree", cfg, a.timeout_s, self.isolated)}

        stopped, last_ok = {}, {}
        for n in self.n_list:
            for method, backend in self.pairs:
                row = {"method": method, "backend": backend, "n": n, "dtype": a.dtype, **params}
                if method == "nformer-layer":
                    row["depth"] = 1
                est = dense_memory_bytes(method, backend, n, a.heads, self.elem_size)
                row["est_mem_bytes"] = est
                flops = method_flops(method, n, a.d, a.heads, a.landmarks, min(a.k, n), a.ffn, row["depth"])
                left_s = (a.time_budget_s - (time.monotonic() - t_start) if a.time_budget_s is not None
                          else float("inf"))
                predicted_s = None
                if (method, backend) in last_ok:  # latency scales with the analytic FLOPs
                    prev_ms, prev_flops = last_ok[method, backend]
                    predicted_s = (self.warmup + 1) * prev_ms * 1e-3 * flops / prev_flops
                if (method, backend) in stopped:
                    row["status"] = f"skipped (stopped at N={stopped[method, backend]})"
                elif device.type == "cpu" and est is not None and est > self.mem_budget:
                    row["status"] = f"OOM (est. {est / 1e9:.1f} GB > budget {self.mem_budget / 1e9:.1f} GB)"
                elif predicted_s is not None and predicted_s > min(a.timeout_s, left_s):
                    limit = "timeout" if a.timeout_s <= left_s else "time budget left"
                    row["status"] = f"skipped (predicted {predicted_s:.0f} s > {limit})"
                elif left_s <= 0:
                    row["status"] = "skipped (time budget)"
                else:
                    cfg = {"method": method, "backend": backend, "n": n, "device": str(device),
                           "dtype": a.dtype, "warmup": self.warmup, "repeats": a.repeats,
                           "repeat_budget_s": a.repeat_budget_s, "threads": a.threads, "params": params}
                    row.update(launch("measure", cfg, a.timeout_s, self.isolated))
                if row["status"] == "ok":
                    last_ok[method, backend] = (row["latency_ms"], row["gflops"] * 1e9)
                elif row["status"] != "skipped (time budget)" and (method, backend) not in stopped:
                    stopped[method, backend] = n
                yield "rows", row


def run(args):
    """`nformer-bench run`: the sweep, saved as <results-root>/<device-slug>/<timestamp>.json (+ .md,
    -latency.png, -memory.png); returns the JSON path."""
    from nformer_bench import report

    t_start = time.monotonic()
    # SIGTERM (e.g. from `timeout`) -> SystemExit, so a running child process is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sweep = Sweep(args)
    budget_note = f", CPU memory budget {sweep.mem_budget / 1e9:.1f} GB" if sweep.device.type == "cpu" else ""
    print(f"nformer-bench on {sweep.env['device_name']}, {args.dtype}, backends {sweep.backends or 'none'}, "
          f"N {sweep.n_list}" + budget_note)
    if not sweep.backends and any(m in FUSED_METHODS for m in sweep.methods):
        print(f"no nformer_kernels backend runs on {sweep.device.type} here (is the extension built?): "
              "the fused methods are skipped")
    result = {"meta": sweep.meta(), "agreement": [], "rows": []}
    out_dir = args.out or args.results_root / sweep.env["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result['meta']['timestamp']}.json"

    def save():  # after every configuration, so a run cut short still leaves its rows
        json_path.write_text(json.dumps(result, indent=1) + "\n")

    for kind, item in sweep:
        result[kind].append(item)
        save()
        if kind == "agreement":
            print(f"agreement {item['backend']} N={args.check_n}: {item}")
        else:
            print(report.row_line(item), flush=True)
    result["meta"]["complete"] = True
    result["meta"]["wall_s"] = time.monotonic() - t_start
    result["meta"]["loadavg_end"] = os.getloadavg()
    save()
    print("\n" + report.write_run_files(result, json_path, overwrite=True))
    print(f"wrote {json_path} (+ .md, -latency.png, -memory.png)")
    return json_path
