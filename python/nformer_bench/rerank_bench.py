"""nformer-bench rerank: wall time and peak RSS of k-reciprocal re-ranking (nformer_reid.rerank).

  nformer-bench rerank [--queries 11659] [--gallery 82161] [--dim 256] [--k1 20] [--k2 6] [--lambda 0.3]
                       [--topk R] [--device cpu|cuda] [--threads T]
                       [--dense] [--dense-queries 3368] [--dense-gallery 15913]
                       [--timeout-s 3600] [--out FILE.json]

Features: seeded Re-ID-like clusters (nformer_bench.runner.synthetic_features, ~16 images per
identity), queries first. Every measurement runs in a fresh child process (`python -m
nformer_bench.rerank_bench CONFIG`), which builds the features, calls the method once and
reports the call's wall time and its own peak RSS (getrusage ru_maxrss: measured, including the
features, torch and the result) and the RSS before the call. The default size is MSMT17's test
split (11,659 x 82,161; d = 256); the default result is the full (Q, G) float32 matrix (3.8 GB
there), --topk R asks re_ranking_sparse for the R nearest gallery items per query instead.

--dense: also the dense re_ranking (torchreid's algorithm, O(N^2) memory) and re_ranking_sparse at
--dense-queries x --dense-gallery (Market-1501's 3,368 x 15,913 by default), each in its own child,
the dense one on the float32 Euclidean distances of the unit features (computed in the child, not
timed), printing the speed-up and the largest difference between the two results.
The load average of the machine is printed and stored with every row: on a shared machine the
times are only comparable at similar load. --out writes the rows and the environment as JSON.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nformer_bench import RESULT_MARK

MSMT17 = (11659, 82161)
MARKET1501 = (3368, 15913)


def add_arguments(p):
    p.add_argument("--queries", type=int, default=MSMT17[0], help=f"Q (default {MSMT17[0]}, MSMT17)")
    p.add_argument("--gallery", type=int, default=MSMT17[1], help=f"G (default {MSMT17[1]}, MSMT17)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension d (default 256)")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.3)
    p.add_argument("--topk", type=int, default=None,
                   help="re_ranking_sparse(topk=R): the R nearest gallery items per query, not the (Q, G) matrix")
    p.add_argument("--device", default="cpu", help="where re_ranking_sparse runs: cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the child (default: torch's)")
    p.add_argument("--dense", action="store_true",
                   help="also dense re_ranking vs re_ranking_sparse at --dense-queries x --dense-gallery")
    p.add_argument("--dense-queries", type=int, default=MARKET1501[0],
                   help=f"Q of the dense comparison (default {MARKET1501[0]}, Market-1501)")
    p.add_argument("--dense-gallery", type=int, default=MARKET1501[1],
                   help=f"G of the dense comparison (default {MARKET1501[1]}, Market-1501)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per child process (default 3600)")
    p.add_argument("--out", type=Path, default=None, help="write the rows and the environment to this JSON file")


def _check(args):
    from nformer_reid.utils.errors import ReIDInputError

    for name in ("queries", "gallery", "dim", "k1", "k2", "dense_queries", "dense_gallery"):
        if getattr(args, name) < 1:
            raise ReIDInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for q, g, what in ((args.queries, args.gallery, ""), (args.dense_queries, args.dense_gallery, "dense-")):
        if max(args.k1 + 1, args.k2) > q + g:
            raise ReIDInputError(f"--k1 + 1 = {args.k1 + 1} and --k2 = {args.k2} must not exceed --{what}queries "
                                 f"+ --{what}gallery = {q + g}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise ReIDInputError(f"--lambda must be in [0, 1], got {args.lambda_value}")
    if args.topk is not None and args.topk < 1:
        raise ReIDInputError(f"--topk must be >= 1, got {args.topk}")
    if args.threads is not None and args.threads < 1:
        raise ReIDInputError(f"--threads must be >= 1, got {args.threads}")
    if args.timeout_s <= 0:
        raise ReIDInputError(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ReIDInputError(f"--device must be cpu or cuda, got {args.device!r}")


def measure(cfg):
    """Runs in the child: one call of cfg["method"] ("sparse" or "dense"); its result row. With
    cfg["save"], the result is also written there (np.save) for the parent's comparison."""
    import numpy as np
    import torch

    from nformer_bench.runner import synthetic_features
    from nformer_reid.rerank import re_ranking, re_ranking_sparse

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    q, g = cfg["queries"], cfg["gallery"]
    x = synthetic_features(q + g, cfg["dim"], "cpu", torch.float32, cfg.get("seed", 0))[0]
    params = (cfg["k1"], cfg["k2"], cfg["lambda_value"])
    if cfg["method"] == "dense":
        unit = torch.nn.functional.normalize(x, dim=1)
        q_g, q_q, g_g = (torch.cdist(a, b).numpy() for a, b in ((unit[:q], unit[q:]), (unit[:q], unit[:q]),
                                                                (unit[q:], unit[q:])))

        def call():
            return re_ranking(q_g, q_q, g_g, *params)
    else:
        device = torch.device(cfg.get("device", "cpu"))
        x = x.to(device)

        def call():
            out = re_ranking_sparse(x[:q], x[q:], *params, topk=cfg.get("topk"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"status": "ok", "method": cfg["method"], "queries": q, "gallery": g, "dim": cfg["dim"],
           "k1": cfg["k1"], "k2": cfg["k2"], "lambda": cfg["lambda_value"], "topk": cfg.get("topk"),
           "device": cfg.get("device", "cpu"), "torch_threads": torch.get_num_threads(), "wall_s": wall, "cpu_s": cpu,
           "rss_before_bytes": rss_before, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "loadavg_before": list(load), "loadavg_after": list(os.getloadavg())}
    if cfg.get("save"):
        np.save(cfg["save"], out if cfg.get("topk") is None else out[1])
    return row


def _child(cfg, timeout_s):
    """measure(cfg) in a fresh interpreter (its own peak RSS); status timeout / OOM / error on failure."""
    import nformer_reid

    roots = [str(Path(m.__file__).resolve().parent.parent) for m in (sys.modules["nformer_bench"], nformer_reid)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [*roots, env.get("PYTHONPATH")])))
    env["PYTHONWARNINGS"] = "ignore"
    failed = {"method": cfg["method"], "queries": cfg["queries"], "gallery": cfg["gallery"]}
    try:
        proc = subprocess.run([sys.executable, "-m", "nformer_bench.rerank_bench", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**failed, "status": f"timeout (> {timeout_s:g} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):  # SIGKILL: almost always the kernel's OOM killer
        return {**failed, "status": "OOM (killed)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {**failed, "status": f"error: {tail[:300]}"}


def _line(row):
    if row.get("status") != "ok":
        return f"  {row.get('method', '?'):<7}{row.get('queries', '')!s:>7} x {row.get('gallery', '')!s:<7}  " \
               f"{row['status']}"
    return (f"  {row['method']:<7}{row['queries']:>7} x {row['gallery']:<7}{row['wall_s']:>9.1f} s"
            f"{row['peak_rss_bytes'] / 1e9:>9.2f} GB  (RSS before the call {row['rss_before_bytes'] / 1e9:.2f} GB; "
            f"load {row['loadavg_before'][0]:.2f} -> {row['loadavg_after'][0]:.2f}; {row['torch_threads']} threads)")


def run(args):
    """The measurements of `nformer-bench rerank`; returns the result dict (also written to --out)."""
    from nformer_reid.utils.errors import ReIDInputError
    from nformer_reid.utils.io import write_json

    try:
        _check(args)
    except ReIDInputError as exc:
        print(f"nformer-bench rerank: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    base = {"dim": args.dim, "k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value, "threads": args.threads}
    import torch

    from nformer_bench.environment import environment

    result = {"command": "nformer-bench " + " ".join(getattr(args, "argv", ["rerank"])),
              "timestamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
              "environment": environment(torch.device(args.device)), "loadavg_start": list(os.getloadavg()),
              "rows": [], "dense_comparison": None}
    print(f"k-reciprocal re-ranking, d={args.dim} k1={args.k1} k2={args.k2} lambda={args.lambda_value}"
          f"{f' topk={args.topk}' if args.topk else ''}; each call in a fresh process; load average "
          f"{result['loadavg_start'][0]:.2f} on {os.cpu_count()} cores")
    print(f"  {'method':<7}{'size':>17}{'time':>11}{'peak RSS':>12}")
    row = _child({**base, "method": "sparse", "queries": args.queries, "gallery": args.gallery, "topk": args.topk,
                  "device": args.device}, args.timeout_s)
    result["rows"].append(row)
    print(_line(row), flush=True)
    if args.dense:
        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            size = {"queries": args.dense_queries, "gallery": args.dense_gallery}
            sparse = _child({**base, **size, "method": "sparse", "device": args.device,
                             "save": str(Path(tmp, "sparse.npy"))}, args.timeout_s)
            print(_line(sparse), flush=True)
            dense = _child({**base, **size, "method": "dense", "save": str(Path(tmp, "dense.npy"))}, args.timeout_s)
            print(_line(dense), flush=True)
            result["rows"] += [sparse, dense]
            if sparse.get("status") == dense.get("status") == "ok":
                diff = float(np.abs(np.load(Path(tmp, "sparse.npy")) - np.load(Path(tmp, "dense.npy"))).max())
                speedup = dense["wall_s"] / sparse["wall_s"]
                result["dense_comparison"] = {**size, "speedup": speedup, "max_abs_difference": diff}
                print(f"  re_ranking_sparse is {speedup:.1f}x faster than re_ranking at {args.dense_queries} x "
                      f"{args.dense_gallery}; largest difference {diff:.2e}")
    result["loadavg_end"] = list(os.getloadavg())
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(result, str(args.out))
        except (OSError, ReIDInputError) as exc:
            print(f"nformer-bench rerank: --out {args.out}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":  # the child process of one measurement: python -m nformer_bench.rerank_bench CONFIG
    print(RESULT_MARK + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
