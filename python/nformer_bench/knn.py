"""nformer-bench knn: exact cosine k-NN, nk.knn (each backend) vs chunked torch.mm + topk vs faiss.

  nformer-bench knn [--n 50000] [--d 256] [--k 20] [--device cpu|cuda] [--dtype float32]
                    [--precision auto|exact|certified] [--methods knn,knn-torch,knn-faiss]
                    [--backends cpu] [--threads T]

Every method gets the same seeded features (nformer_bench.runner.synthetic_features) and one
warm-up call on the first 2,048 rows. On the CPU each method runs in a fresh process, so "peak" is
its own RSS growth and "CPU" the process CPU time of the call (all threads: the work done, when
other load inflates wall time); on CUDA all run in this process (peak: max_memory_allocated growth).
Recall: |neighbour set ∩ the truth's set| / k, averaged over SAMPLE_ROWS seeded rows; the truth is a
plain-PyTorch fp64 brute force of those rows against all N (never one of the kernels measured).
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
    p.add_argument("--precision", default="auto",  # checked in run(): the parser does not load nformer_kernels
                   help="nk.knn's precision: auto (certified on CUDA, exact on CPUs), exact or certified; "
                        "the answer is the same, the cost is not")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--backends", default=None,
                   help="nformer_kernels backends of the knn method (default: every one with kernels of "
                        "its own available on the device)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch (and faiss) CPU threads (default: torch's)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per method (at most)")
    p.add_argument("--repeat-budget-s", type=float, default=30.0,
                   help="stop timing a method once its timed calls took this long (>= 1 call)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per method, CPU (a child process)")


SAMPLE_ROWS = 2000  # rows whose fp64 truth is computed: ~1e12 fp64 FLOP at N = 1M, d = 256


def sample_rows(n, count=SAMPLE_ROWS, seed=0):
    """`count` distinct rows of n (all of them when n <= count), seeded, sorted."""
    import torch

    if n <= count:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def fp64_truth(x, rows, k, chunk=65536):
    """(len(rows), k) top-k by fp64 cosine of x[rows] against every row of x (N, d), self first: a
    brute force over key chunks, O(len(rows) * chunk) memory."""
    import torch

    rows = rows.to(x.device)
    q = torch.nn.functional.normalize(x[rows].double(), dim=1)
    best_s = torch.full((len(rows), 0), float("-inf"), dtype=torch.float64, device=x.device)
    best_i = torch.zeros((len(rows), 0), dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        keys = torch.nn.functional.normalize(x[start:start + chunk].double(), dim=1)
        s = q @ keys.T
        ids = torch.arange(start, start + keys.shape[0], device=x.device)
        s[rows[:, None] == ids[None]] = float("inf")  # self first
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, ids.expand(len(rows), -1)], 1)
        best_s, pos = s.topk(min(k, s.shape[1]), dim=1)
        best_i = i.gather(1, pos)
    return best_i.cpu()


def recall(found, truth, chunk=65536):
    """Mean over rows of |found[i] ∩ truth[i]| / k for (N,k) index tensors of distinct entries."""
    hits = 0
    for s in range(0, found.shape[0], chunk):
        a, b = found[s:s + chunk], truth[s:s + chunk]
        hits += (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum().item()
    return hits / found.numel()


def compare(n, d, k, device, dtype, methods=METHODS, backends=None, threads=None, repeats=3,
            repeat_budget_s=30.0, timeout_s=1800.0, isolated=None, precision="auto"):
    """Yields one result row per (method, backend), with recall against the fp64 truth of
    SAMPLE_ROWS rows. isolated: a child process per method (default: on the CPU, where it makes
    peak RSS per method). precision: nk.knn's, for the knn method (the baselines are fp32 or the
    input's dtype as they are)."""
    import torch

    from nformer_bench.runner import kernel_backends, launch, synthetic_features
    from nformer_bench.sweep import method_backends

    device = torch.device(device)
    isolated = device.type == "cpu" if isolated is None else isolated
    pairs = method_backends(list(methods), device, kernel_backends(device) if backends is None else backends)
    rows = sample_rows(n)
    truth = fp64_truth(synthetic_features(n, d, device, getattr(torch, dtype))[0], rows, min(k, n))
    truth_label = f"fp64 brute force, {len(rows)} rows"
    with tempfile.TemporaryDirectory() as tmp:
        for method, backend in pairs:
            out_path = Path(tmp) / f"{method}-{backend}.pt"
            cfg = {"method": method, "backend": backend, "n": n, "device": str(device), "dtype": dtype,
                   "warmup": 1, "warmup_n": min(n, WARMUP_ROWS), "repeats": repeats,
                   "repeat_budget_s": repeat_budget_s, "threads": threads, "save_output": str(out_path),
                   "params": {"d": d, "k": k, "heads": 1, "landmarks": 1, "ffn": 1, "depth": 1,
                              "precision": precision}}
            row = {"method": method, "backend": backend, "n": n, "d": d, "k": min(k, n), "dtype": dtype,
                   "precision": precision if method == "knn" else None,
                   **launch("measure", cfg, timeout_s, isolated)}
            if row["status"] == "ok" and out_path.exists():
                row["recall"], row["recall_vs"] = recall(torch.load(out_path)[rows], truth), truth_label
                out_path.unlink()
            yield row


def run(args):
    """`nformer-bench knn`: the comparison, printed as a table; returns the rows."""
    import torch

    from nformer_bench.report import fmt_mb, fmt_ms

    device = arguments.device(args.device).type
    if args.k > args.n:
        raise BenchArgumentError(f"--k {args.k} exceeds --n {args.n}")
    from nformer_kernels.ops.knn import PRECISIONS

    if args.precision not in PRECISIONS:
        raise BenchArgumentError(f"--precision must be one of {','.join(PRECISIONS)}, got {args.precision!r}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise BenchArgumentError(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    threads = args.threads or torch.get_num_threads()
    print(f"exact cosine k-NN, N={args.n} d={args.d} k={args.k} {args.dtype} (precision {args.precision}) on {device}, "
          f"{threads} threads, torch {torch.__version__}")
    print(f"{'method':<22}{'wall':>12}{'CPU':>12}{'peak':>10}{'recall':>10}")
    rows = []
    for row in compare(args.n, args.d, args.k, device, args.dtype, methods,
                       args.backends.split(",") if args.backends else None, args.threads, args.repeats,
                       args.repeat_budget_s, args.timeout_s, precision=args.precision):
        rows.append(row)
        label = f"{row['method']} ({row['backend']})"
        if row["status"] != "ok":
            print(f"{label:<22}{row['status']}")
            continue
        print(f"{label:<22}{fmt_ms(row['latency_ms']):>12}{fmt_ms(row['cpu_time_ms']):>12}"
              f"{fmt_mb(row['peak_mem_bytes']):>10}{row['recall']:>10.6f}", flush=True)
    return rows
