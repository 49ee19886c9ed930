"""nformer-bench distributed: per-rank time, bytes and peak memory of nformer_kernels.distributed.

  nformer-bench distributed [--n 20000,50000,100000] [--procs 1,2] [--ops knn,nformer] [--threads 1]
                            [--d 256] [--k 20] [--depth 4] [--heads 2] [--landmarks 5] [--ffn 1024]
                            [--timeout-s 1800] [--out FILE.json]
  nformer-bench distributed --plan [--n 10000000] [--halo-fraction A]    the analytic cost

Each (op, N, P) runs in a fresh gloo world of P CPU processes (torch.multiprocessing, `--threads`
threads each); every rank loads only its contiguous shard of the same seeded features
(runner.synthetic_features, ~16 images per identity, identities spread over all shards) and
times one call: knn = distributed.knn(x, k), nformer = distributed.nformer_forward of a seeded
NFormer on explicit landmarks (P = 1 is the single-process op and model), after an unmeasured call
on 512 rows per rank. Per rank: wall and CPU time, the seconds blocked on communication, bytes
sent and received by kind (distributed.traffic()), peak memory (peak RSS minus the RSS before the
call: the call's working memory) and the process's peak RSS (with its shard, torch and the model). For P > 1 the
byte counts are checked against the cost model below (ring_bytes, halo_rows, halo_bytes).

--plan prints the cost model (docs/distributed.md) for the two deployments in PLANS.
"""
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

from nformer_bench.analytic import fused_attention_flops, knn_flops, linear_flops
from nformer_bench.arguments import BenchArgumentError, int_list, positive_int

OPS = ("knn", "nformer")
DEFAULT_N = (20000, 50000, 100000)
PLAN_N = 10_000_000
FP32, BF16 = 4, 2
# A GPU of the H100/H200 SXM class: fp32 FMA rate (the exact knn's scores, tf32 off), HBM bandwidth.
GPU_FP32_FLOPS = 67e12
GPU_HBM_BYTES_PER_S = 4.8e12
# The two deployments of docs/distributed.md: ranks and the bandwidth of one ring hop, per direction.
PLANS = {"8 GPUs, NVLink": (8, 450e9), "8 nodes x 8 GPUs, 400 Gb/s": (64, 50e9)}
SCORE_BYTES = 8  # the torch top-k writes each fp32 score of a tile once and reads it once
WARMUP_ROWS = 512  # rows per rank of the unmeasured first call


# ------------------------------------------------------------------ the cost model
def shard_sizes(n, procs):
    """Contiguous shards, as even as possible, in rank order."""
    return [n // procs + (r < n % procs) for r in range(procs)]


def ring_bytes(n, counts, rank, d, elem):
    """Bytes rank `rank` sends around the knn ring: every block but the next rank's, once."""
    return (n - counts[(rank + 1) % len(counts)]) * d * elem


def halo_rows(counts, rank, sent_plan_bytes):
    """Halo rows of a rank from the ids its plan asked for (8 B each, after P-1 int64 counts)."""
    return (sent_plan_bytes - (len(counts) - 1) * 8) // 8


def halo_bytes(halo, heads, landmarks, d, elem):
    """Bytes a rank receives per NFormer block: one R row (H*l fp32) and one v row (d) per halo row."""
    return halo * (heads * landmarks * FP32 + d * elem)


def crossover_rows(d, elem, link_bytes_per_s, flops=GPU_FP32_FLOPS, hbm=GPU_HBM_BYTES_PER_S):
    """The shard size below which a ring step's transfer (n*d*elem / link) outlasts its top-k
    (n^2 * (2d / flops + SCORE_BYTES / hbm)): communication stops hiding behind compute."""
    return d * elem / link_bytes_per_s / (2 * d / flops + SCORE_BYTES / hbm)


def plan(n, d, k, heads, landmarks, depth, ffn, procs, link_bytes_per_s, elem=FP32, halo_fraction=1.0,
         flops=GPU_FP32_FLOPS, hbm=GPU_HBM_BYTES_PER_S):
    """Per-rank cost of knn + NFormer forward on N rows over `procs` ranks (even shards).

    halo_fraction: distinct halo rows / (n_local * (k-1)), 1 = every neighbour remote and distinct
    (capped at N - n_local)."""
    n_local = n / procs
    halo = min(halo_fraction * n_local * (k - 1), n - n_local)
    block = n_local * d * elem
    step_compute = n_local * n_local * (2 * d / flops + SCORE_BYTES / hbm)
    knn_flop = knn_flops(n, d) / procs
    block_flop = linear_flops(n_local, d, ffn) + fused_attention_flops(n_local, d, heads, landmarks, k)
    features = n_local * d * elem
    memory = {  # bytes held at the peak of each phase
        "knn": 2 * features + 2 * block + 2 * n_local * k * 12 + 16 * 2 ** 20,
        "nformer block": 2 * features + n_local * k * 9 + 2 * n_local * heads * landmarks * FP32
        + (n_local + halo) * (heads * landmarks * FP32 * 2 + 2 * d * elem + heads * k * FP32) + halo * k * 9,
    }
    return {
        "procs": procs, "n_local": n_local, "knn_flop": knn_flop, "nformer_flop": depth * block_flop,
        "knn_s": knn_flop / flops + SCORE_BYTES * n * n_local / hbm,
        "ring_bytes": (n - n_local) * d * elem, "block_bytes": block,
        "step_compute_s": step_compute, "step_comm_s": block / link_bytes_per_s,
        "crossover_rows": crossover_rows(d, elem, link_bytes_per_s, flops, hbm),
        "halo_rows": halo, "halo_bytes_per_block": halo_bytes(halo, heads, landmarks, d, elem),
        "halo_s_per_block": halo_bytes(halo, heads, landmarks, d, elem) / link_bytes_per_s,
        "neighbour_bytes": halo * k * 8, "memory_bytes": memory,
    }


def print_plan(args):
    for elem, name in ((FP32, "fp32"), (BF16, "bf16")):
        print(f"N={args.n[0]:,} d={args.d} k={args.k} depth={args.depth} heads={args.heads} "
              f"landmarks={args.landmarks}, {name} features, halo fraction {args.halo_fraction:g}")
        for label, (procs, link) in PLANS.items():
            p = plan(args.n[0], args.d, args.k, args.heads, args.landmarks, args.depth, args.ffn, procs, link, elem,
                     args.halo_fraction)
            print(f"  {label}: n_local {p['n_local']:,.0f}; knn {p['knn_flop']:.3g} FLOP/rank "
                  f"(~{p['knn_s']:.1f} s), NFormer blocks {p['nformer_flop']:.3g} FLOP/rank; ring "
                  f"{p['ring_bytes'] / 1e9:.2f} GB/rank in {procs - 1} blocks of {p['block_bytes'] / 1e9:.3f} GB "
                  f"(step: {p['step_comm_s'] * 1e3:.2f} ms transfer vs {p['step_compute_s']:.3f} s top-k; hidden "
                  f"while n_local > {p['crossover_rows']:,.0f}, P < {args.n[0] / p['crossover_rows']:,.0f}); halo "
                  f"{p['halo_rows']:,.0f} rows = {p['halo_bytes_per_block'] / 1e9:.3f} GB/block "
                  f"({p['halo_s_per_block'] * 1e3:.1f} ms), neighbour lists {p['neighbour_bytes'] / 1e9:.3f} GB; "
                  f"peak memory knn {p['memory_bytes']['knn'] / 1e9:.2f} GB, NFormer block "
                  f"{p['memory_bytes']['nformer block'] / 1e9:.2f} GB")


# ------------------------------------------------------------------ measurement
def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank, cfg, port, shard_dir, out_dir):
    import torch
    import torch.distributed as dist

    import nformer_kernels as nk
    from nformer_bench.runner import explicit_landmarks
    from nformer_kernels import distributed as nkd

    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg["procs"])
    try:
        x = torch.load(os.path.join(shard_dir, f"shard{rank}.pt"))
        torch.manual_seed(0)
        model = nk.NFormer(dim=cfg["d"], depth=cfg["depth"], num_heads=cfg["heads"], num_landmarks=cfg["landmarks"],
                           topk=cfg["k"], ffn_dim=cfg["ffn"]).eval()

        def call(rows, n):
            if cfg["op"] == "knn":
                return nkd.knn(rows, cfg["k"])
            return nkd.nformer_forward(model, rows, explicit_landmarks(n, cfg["depth"], cfg["landmarks"]))

        warm = x[:WARMUP_ROWS]  # libraries and thread pools load here, not in the measured call
        call(warm, sum(min(WARMUP_ROWS, c) for c in shard_sizes(cfg["n"], cfg["procs"])))
        dist.barrier()
        nkd.reset_traffic()
        rss_before = _rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        out = call(x, cfg["n"])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row = {"rank": rank, "rows": x.shape[0], "wall_s": wall, "cpu_s": cpu, "peak_bytes": rss_peak - rss_before,
               "rss_peak_bytes": rss_peak, "out_shape": list(out.shape), **nkd.traffic()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(cfg, shard_dir, timeout_s):
    """Every rank's row of one (op, N, P), or {"status": ...} when it failed or ran out of time."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_rank, args=(cfg, _free_port(), str(shard_dir), out_dir), nprocs=cfg["procs"],
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    return {"status": f"timeout (> {timeout_s:g} s)"}
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            return {"status": f"error: {str(exc).strip().splitlines()[-1][:300]}"}
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join(5)
        return {"status": "ok", "ranks": [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                                          for r in range(cfg["procs"])]}


def check_bytes(cfg, ranks):
    """Measured ring and halo bytes against ring_bytes / halo_bytes: a list of mismatches."""
    counts = [r["rows"] for r in ranks]
    bad = []
    for r in ranks:
        ring = ring_bytes(cfg["n"], counts, r["rank"], cfg["d"], FP32)
        if r["sent"].get("ring", 0) != ring:
            bad.append(f"rank {r['rank']}: ring sent {r['sent'].get('ring', 0)} != {ring}")
        if cfg["op"] == "nformer":
            halo = halo_rows(counts, r["rank"], r["sent"].get("plan", 0))
            r["halo_rows"] = halo
            want = cfg["depth"] * halo_bytes(halo, cfg["heads"], cfg["landmarks"], cfg["d"], FP32)
            if r["received"].get("halo", 0) != want:
                bad.append(f"rank {r['rank']}: halo received {r['received'].get('halo', 0)} != {want}")
            if r["received"].get("neighbours", 0) != halo * cfg["k"] * 8:
                bad.append(f"rank {r['rank']}: neighbour lists received {r['received'].get('neighbours', 0)} "
                           f"!= {halo * cfg['k'] * 8}")
    return bad


def measure(args):
    """Yields one result row per (N, P, op)."""
    import torch

    from nformer_bench.runner import synthetic_features

    for n in args.n:
        x = synthetic_features(n, args.d, "cpu", torch.float32)[0]
        for procs in args.procs:
            with tempfile.TemporaryDirectory() as shard_dir:
                start = 0
                for r, rows in enumerate(shard_sizes(n, procs)):
                    torch.save(x[start:start + rows].clone(), os.path.join(shard_dir, f"shard{r}.pt"))
                    start += rows
                for op in args.ops:
                    cfg = {"op": op, "n": n, "procs": procs, "threads": args.threads, "d": args.d, "k": args.k,
                           "depth": args.depth, "heads": args.heads, "landmarks": args.landmarks, "ffn": args.ffn}
                    row = {**cfg, **run_world(cfg, shard_dir, args.timeout_s)}
                    if row["status"] == "ok" and procs > 1:
                        row["byte_check"] = check_bytes(cfg, row["ranks"]) or "ok"
                    yield row


def _fmt_kinds(counts):
    return " ".join(f"{k}={v / 1e6:.2f}" for k, v in sorted(counts.items())) or "-"


def run(args):
    args.n = args.n or ([PLAN_N] if args.plan else list(DEFAULT_N))
    if args.plan:
        print_plan(args)
        return []
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        raise BenchArgumentError(f"--ops: unknown {unknown}; choose from {','.join(OPS)}")
    print(f"nformer_kernels.distributed on gloo CPU processes, {args.threads} thread(s) each: d={args.d} k={args.k} "
          f"NFormer depth={args.depth} heads={args.heads} landmarks={args.landmarks} ffn={args.ffn}")
    print(f"{'N':>8} {'P':>2} {'op':<8}{'rank':>5}{'rows':>8}{'wall s':>9}{'CPU s':>9}{'wait s':>8}"
          f"{'peak MB':>9}{'RSS MB':>8}  sent MB / received MB by kind")
    rows = []
    for row in measure(args):
        rows.append(row)
        head = f"{row['n']:>8} {row['procs']:>2} {row['op']:<8}"
        if row["status"] != "ok":
            print(f"{head}{row['status']}", flush=True)
            continue
        for r in row["ranks"]:
            print(f"{head}{r['rank']:>5}{r['rows']:>8}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}"
                  f"{sum(r['wait_s'].values()):>8.2f}{r['peak_bytes'] / 1e6:>9.1f}{r['rss_peak_bytes'] / 1e6:>8.0f}  "
                  f"{_fmt_kinds(r['sent'])} / {_fmt_kinds(r['received'])}"
                  + (f"  halo rows {r['halo_rows']}" if "halo_rows" in r else ""), flush=True)
        if "byte_check" in row:
            print(f"{'':>12}bytes vs the cost model: {row['byte_check']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


def add_arguments(p):
    p.add_argument("--n", type=int_list, default=None,
                   help="comma-separated N (default 20000,50000,100000; --plan: the first, default 10M)")
    p.add_argument("--procs", type=int_list, default=[1, 2], help="comma-separated process counts (default 1,2)")
    p.add_argument("--ops", type=lambda s: [t for t in s.split(",") if t], default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--d", type=positive_int, default=256)
    p.add_argument("--k", type=positive_int, default=20)
    p.add_argument("--depth", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=2)
    p.add_argument("--landmarks", type=positive_int, default=5)
    p.add_argument("--ffn", type=positive_int, default=1024)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per (op, N, P) world")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--plan", action="store_true", help="print the analytic cost instead of measuring")
    p.add_argument("--halo-fraction", type=float, default=1.0,
                   help="--plan: distinct halo rows / (n_local*(k-1)) (1 = worst case)")
