"""CPU exact k-NN (inner product on L2-normalised rows): torch.ops.nformer.knn vs faiss vs torch.

  python bench/knn_cpu.py --n 50000 --d 256 --k 20 [--methods nformer,faiss,torch] [--threads T]

Each method runs in its own subprocess on the same seeded data, so "peak RSS growth" is that
method's own high-water mark (ru_maxrss after the call minus before it, after a small warm-up).
"CPU s" is the process CPU time of the call (all threads): on a shared machine it shows the
work done when wall time is inflated by other load.
Recall is |neighbour set ∩ nformer's set| / k averaged over rows (exact methods agree up to ties).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

METHODS = ("nformer", "faiss", "torch")


def make_data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def knn_nformer(x, k):
    import nformer_kernels  # noqa: F401  (registers torch.ops.nformer)

    return torch.ops.nformer.knn(x[None], k)[0]


def knn_faiss(x, k):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x.numpy())
    return torch.from_numpy(index.search(x.numpy(), k)[1])


def knn_torch(x, k, chunk=1024):
    """Chunked dense baseline: chunk x N similarities at a time, self forced first."""
    out = torch.empty(x.shape[0], k, dtype=torch.int64)
    for start in range(0, x.shape[0], chunk):
        sim = x[start:start + chunk] @ x.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = float("inf")
        out[start:start + chunk] = sim.topk(k, dim=1).indices
    return out


def worker(args):
    """One method in this process: prints a JSON line with wall and CPU seconds and peak RSS growth."""
    fn = {"nformer": knn_nformer, "faiss": knn_faiss, "torch": knn_torch}[args.worker]
    x = make_data(args.n, args.d, args.seed)
    fn(x[: min(args.n, 2048)].contiguous(), min(args.k, 2048))  # warm up libraries and thread pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    idx = fn(x, args.k)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    np.save(args.save, idx.numpy())
    print(json.dumps({"method": args.worker, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "rss_growth_mb": growth_mb}))


def recall(a, b):
    k = a.shape[1]
    a_sorted, b_sorted = np.sort(a, axis=1), np.sort(b, axis=1)
    hits = sum(np.intersect1d(ra, rb, assume_unique=True).size for ra, rb in zip(a_sorted, b_sorted))
    return hits / (a.shape[0] * k)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL/torch threads (default: all cores)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if "faiss" in methods:
        try:
            import faiss  # noqa: F401
        except ImportError:
            print("faiss is not importable: skipping it")
            methods.remove("faiss")
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))

    print(f"exact k-NN, N={args.n} d={args.d} k={args.k} fp32, {platform.processor() or platform.machine()}, "
          f"{args.threads or os.cpu_count()} threads, torch {torch.__version__}")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            save = os.path.join(tmp, f"{method}.npy")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--save", save,
                   "--n", str(args.n), "--d", str(args.d), "--k", str(args.k), "--seed", str(args.seed)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"{method}: failed\n{res.stderr}")
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            results[method] = np.load(save)
    base = "nformer" if "nformer" in results else next(iter(results), None)
    print(f"{'method':<10}{'wall s':>10}{'CPU s':>10}{'peak RSS growth (MB)':>24}{f'recall vs {base}':>22}")
    for row in rows:
        r = recall(results[row["method"]], results[base])
        print(f"{row['method']:<10}{row['seconds']:>10.2f}{row['cpu_seconds']:>10.2f}{row['rss_growth_mb']:>24.1f}"
              f"{r:>22.6f}")


if __name__ == "__main__":
    main()
