"""nformer-bench knn: exact cosine k-NN, nk.knn (each backend) vs chunked torch.mm + topk vs faiss.

  nformer-bench knn [--n 50000] [--d 256] [--k 20] [--device cpu|cuda] [--dtype float32]
                    [--methods knn,knn-torch,knn-faiss] [--backends cpu] [--threads T]

Every method gets the same seeded features (nformer_bench.runner.synthetic_features) and one
warm-up call on the first 2,048 rows. On the CPU each method runs in a fresh process, so "peak" is
its own RSS growth and "CPU" the process CPU time of the call (all threads: the work done, when
other load inflates wall time); on CUDA all run in this process (peak: max_memory_allocated growth).
Recall: |neighbour set ∩ the first method's set| / k, averaged over rows (exact methods agree up to ties).
"""
import tempfile
from pathlib import Path

from nformer_bench import arguments
from nformer_bench.analytic import DTYPE_NAMES
from nformer_bench.arguments import BenchArgumentError, positive_int

METHODS = ("knn", "knn-torch", "knn-faiss")
WARMUP_ROWS = 2048


def add_arguments(p):
    p.add_argument("--n", type=positive_int, default=50000)
    p.add_argument("--d", type=positive_int, default=256)
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--backends", default=None,
                   help="nformer_kernels backends of the knn method (default: every one with kernels of "
                        "its own available on the device)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch (and faiss) CPU threads (default: torch's)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per method (at most)")
    p.add_argument("--repeat-budget-s", type=float, default=30.0,
                   help="stop timing a method once its timed calls took this long (>= 1 call)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per method, CPU (a child process)")


def recall(found, truth, chunk=65536):
    """Mean over rows of |found[i] ∩ truth[i]| / k for (N,k) index tensors of distinct entries."""
    hits = 0
    for s in range(0, found.shape[0], chunk):
        a, b = found[s:s + chunk], truth[s:s + chunk]
        hits += (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum().item()
    return hits / found.numel()


def compare(n, d, k, device, dtype, methods=METHODS, backends=None, threads=None, repeats=3,
            repeat_budget_s=30.0, timeout_s=1800.0, isolated=None):
    """Yields one result row per (method, backend), with recall against the first method that ran.
    isolated: a child process per method (default: on the CPU, where it makes peak RSS per method)."""
    import torch

    from nformer_bench.runner import kernel_backends, launch
    from nformer_bench.sweep import method_backends

    device = torch.device(device)
    isolated = device.type == "cpu" if isolated is None else isolated
    pairs = method_backends(list(methods), device, kernel_backends(device) if backends is None else backends)
    truth = truth_label = None
    with tempfile.TemporaryDirectory() as tmp:
        for method, backend in pairs:
            out_path = Path(tmp) / f"{method}-{backend}.pt"
            cfg = {"method": method, "backend": backend, "n": n, "device": str(device), "dtype": dtype,
                   "warmup": 1, "warmup_n": min(n, WARMUP_ROWS), "repeats": repeats,
                   "repeat_budget_s": repeat_budget_s, "threads": threads, "save_output": str(out_path),
                   "params": {"d": d, "k": k, "heads": 1, "landmarks": 1, "ffn": 1, "depth": 1}}
            row = {"method": method, "backend": backend, "n": n, "d": d, "k": min(k, n), "dtype": dtype,
                   **launch("measure", cfg, timeout_s, isolated)}
            if row["status"] == "ok" and out_path.exists():
                found = torch.load(out_path)
                if truth is None:
                    truth, truth_label = found, f"{method} ({backend})"
                row["recall"], row["recall_vs"] = recall(found, truth), truth_label
                out_path.unlink()
            yield row


def run(args):
    """`nformer-bench knn`: the comparison, printed as a table; returns the rows."""
    import torch

    from nformer_bench.report import fmt_mb, fmt_ms

    device = arguments.device(args.device).type
    if args.k > args.n:
        raise BenchArgumentError(f"--k {args.k} exceeds --n {args.n}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise BenchArgumentError(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    threads = args.threads or torch.get_num_threads()
    print(f"exact cosine k-NN, N={args.n} d={args.d} k={args.k} {args.dtype} on {device}, "
          f"{threads} threads, torch {torch.__version__}")
    print(f"{'method':<22}{'wall':>12}{'CPU':>12}{'peak':>10}{'recall':>10}")
    rows = []
    for row in compare(args.n, args.d, args.k, device, args.dtype, methods,
                       args.backends.split(",") if args.backends else None, args.threads, args.repeats,
                       args.repeat_budget_s, args.timeout_s):
        rows.append(row)
        label = f"{row['method']} ({row['backend']})"
        if row["status"] != "ok":
            print(f"{label:<22}{row['status']}")
            continue
        print(f"{label:<22}{fmt_ms(row['latency_ms']):>12}{fmt_ms(row['cpu_time_ms']):>12}"
              f"{fmt_mb(row['peak_mem_bytes']):>10}{row['recall']:>10.6f}", flush=True)
    return rows
