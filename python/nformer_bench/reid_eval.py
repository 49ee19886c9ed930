"""nformer-bench eval-features: Re-ID evaluation straight from features (nformer_reid.metrics.
evaluate_features, no Q x G matrix) at Market-1501 + 500k distractors size, against the full-matrix
path (evaluate_rank on compute_distance_matrix) at a size where that matrix fits.

  nformer-bench eval-features [--queries 3368] [--gallery 515913] [--dim 256] [--ids 750]
                              [--compare-gallery 40000] [--normalize | --no-normalize]
                              [--device cpu|cuda] [--threads T] [--out DIR]

Synthetic clustered features with ids like Market-1501's test split: --ids identities with a few
query images and ~17 gallery images each over 6 cameras (an identity centre, a camera bias and
noise), ~3.7 distractor images of pid 0 per identity, and the rest of the gallery distractors with
ids of their own (Market-1501: 3,368 queries, 15,913 gallery images without junk; + 500,000
distractors = 515,913). The split is a function of the sizes and --seed.

Each measurement runs in a fresh process: the wall and CPU time of the evaluation call (CPU time:
the work done, when other load inflates wall time), and the peak RSS of the call (measured, not
estimated: the kernel's high-water mark, reset once the features exist; where it cannot be reset,
the process's getrusage peak) next to the RSS the features and torch already took, so "work" =
what the evaluation itself added. The full-matrix comparison runs both paths on the
first --compare-gallery gallery images and checks that they give the same cmc / mAP / mINP bits.
Results: printed, and a JSON file in --out (default ./nformer_bench_results/reid_eval), with the
machine's load average before and after.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from nformer_bench import arguments
from nformer_bench.arguments import BenchArgumentError
from nformer_bench import RESULT_MARK

NUM_CAMS = 6
GALLERY_PER_ID = 17  # Market-1501: 13,120 identity images of 750 test ids in the gallery
ZERO_PER_ID = 3.724  # Market-1501: 2,793 distractors labelled 0


def add_arguments(p):
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=515913)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ids", type=int, default=750, help="test identities (each with queries and gallery images)")
    p.add_argument("--compare-gallery", type=int, default=40000,
                   help="gallery size of the full-matrix comparison (0: skip it)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="L2-normalise the features (squared Euclidean distance of unit vectors; default on)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--query-chunk", type=int, default=None)
    p.add_argument("--gallery-chunk", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per measurement (a child process)")
    p.add_argument("--out", type=Path, default=Path("nformer_bench_results") / "reid_eval")


def split_sizes(num_q, num_g, num_ids):
    """(identity gallery images, pid-0 distractors, own-id distractors) of a gallery of num_g."""
    ident = min(num_g, GALLERY_PER_ID * num_ids)
    zero = min(num_g - ident, round(ZERO_PER_ID * num_ids))
    return ident, zero, num_g - ident - zero


def market_like_split(num_q, num_g, dim, num_ids, seed=0, chunk=65536):
    """(qf, gf, q_pids, g_pids, q_camids, g_camids): float32 features and int64 ids (torch, CPU).

    Identity pids are 1..num_ids, pid-0 distractors and own-id distractors (num_ids + 1 + i) follow;
    the gallery is generated in chunks (no temporary of its full size)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_ids, dim, generator=g), dim=1)
    cam_bias = 0.35 * torch.nn.functional.normalize(torch.randn(NUM_CAMS, dim, generator=g), dim=1)
    noise = 1.6 / dim ** 0.5  # noise norm 1.6 x the centres': mAP ~0.83 on Market's own 15,913 images

    def images(pids, cams):
        out = torch.randn(len(pids), dim, generator=g) * noise + cam_bias[cams]
        ident = (pids >= 1) & (pids <= num_ids)
        out[ident] += centres[pids[ident] - 1]
        other = ~ident  # distractors: each image a person of its own
        out[other] += torch.nn.functional.normalize(torch.randn(int(other.sum()), dim, generator=g), dim=1)
        return out

    q_pids = torch.arange(num_q) % num_ids + 1
    q_cams = torch.randint(NUM_CAMS, (num_q,), generator=g)
    qf = images(q_pids, q_cams)
    ident, zero, own = split_sizes(num_q, num_g, num_ids)
    g_pids = torch.cat([torch.arange(ident) % num_ids + 1, torch.zeros(zero, dtype=torch.int64),
                        torch.arange(own) + num_ids + 1])
    g_cams = torch.randint(NUM_CAMS, (num_g,), generator=g)
    gf = torch.empty(num_g, dim)
    for s in range(0, num_g, chunk):
        gf[s:s + chunk] = images(g_pids[s:s + chunk], g_cams[s:s + chunk])
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: /proc/self/clear_refs "5"), so that the peak
    read afterwards is the evaluation's own, not the data generation's; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measure(cfg):
    """One evaluation in this process: {"status", "time_s", "peak_rss_bytes", "rss_data_bytes",
    "mAP", "mINP", "cmc"(first 20), ...}. cfg: queries, gallery, dim, ids, seed, path ("features" or
    "matrix"), normalize, device, threads, query_chunk, gallery_chunk."""
    import torch

    from nformer_reid.metrics import compute_distance_matrix, evaluate_features, evaluate_rank

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data = market_like_split(cfg["queries"], cfg["gallery"], cfg["dim"], cfg["ids"], cfg["seed"])
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        data = tuple(t.to(device) for t in data)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_data = _current_rss_bytes()
    reset = _reset_peak_rss()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if cfg["path"] == "features":
        cmc, mAP, mINP = evaluate_features(*data, metric="euclidean", normalize=cfg["normalize"], return_mINP=True,
                                           query_chunk=cfg.get("query_chunk"), gallery_chunk=cfg.get("gallery_chunk"),
                                           device=device)
    else:
        dist = compute_distance_matrix(data[0], data[1], "euclidean", normalize=cfg["normalize"])
        cmc, mAP, mINP = evaluate_rank(dist, *data[2:], return_mINP=True, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    call_peak = _peak_rss_since_reset() if reset else None
    out = {"status": "ok", "path": cfg["path"], "queries": cfg["queries"], "gallery": cfg["gallery"],
           "dim": cfg["dim"], "time_s": elapsed, "cpu_s": cpu_s, "process_peak_rss_bytes": _peak_rss_bytes(),
           "peak_rss_bytes": call_peak or _peak_rss_bytes(), "peak_rss_exact": call_peak is not None,
           "rss_data_bytes": rss_data,
           "threads": torch.get_num_threads(), "mAP": mAP, "mINP": mINP, "cmc": [float(c) for c in cmc[:20]],
           "cmc_bits": cmc.view("uint32").tolist()}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_child(cfg, timeout_s):
    """measure(cfg) in a fresh interpreter (its own peak RSS); status timeout / OOM / error on failure."""
    env = dict(os.environ)
    roots = [str(Path(m).resolve().parent.parent) for m in (sys.modules["nformer_bench"].__file__,)]
    import nformer_reid

    roots.append(str(Path(nformer_reid.__file__).resolve().parent.parent))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [*roots, env.get("PYTHONPATH")])))
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "nformer_bench.reid_eval", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout_s:g} s)", "path": cfg["path"], "gallery": cfg["gallery"]}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):
        return {"status": "OOM (killed)", "path": cfg["path"], "gallery": cfg["gallery"]}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: {tail[:300]}", "path": cfg["path"], "gallery": cfg["gallery"]}


def _row(r):
    mb = 1 << 20
    if r["status"] != "ok":
        return f"{r['path']:<9}{r['gallery']:>9}  {r['status']}"
    return (f"{r['path']:<9}{r['gallery']:>9}{r['time_s']:>10.1f}{r['cpu_s']:>9.1f}{r['peak_rss_bytes'] / mb:>10.0f}"
            f"{(r['peak_rss_bytes'] - r['rss_data_bytes']) / mb:>10.0f}{r['mAP']:>9.4f}{r['mINP']:>9.4f}"
            f"{r['cmc'][0]:>8.4f}")


def run(args):
    """`nformer-bench eval-features`: the measurements, printed and written as JSON; returns the result."""
    from nformer_reid.utils.errors import ReIDInputError
    from nformer_reid.utils.io import write_json

    arguments.device(args.device)
    for name in ("queries", "gallery", "dim", "ids"):
        if getattr(args, name) < 1:
            raise BenchArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    if args.compare_gallery < 0:
        raise BenchArgumentError("--compare-gallery must be >= 0")
    base = {"queries": args.queries, "dim": args.dim, "ids": args.ids, "seed": args.seed,
            "normalize": args.normalize, "device": args.device, "threads": args.threads,
            "query_chunk": args.query_chunk, "gallery_chunk": args.gallery_chunk}
    load_before = os.getloadavg()
    print(f"evaluate_features: Q={args.queries} G={args.gallery} d={args.dim} ids={args.ids} on {args.device}, "
          f"load average {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min), "
          f"{os.cpu_count()} CPUs")
    print(f"{'path':<9}{'G':>9}{'time s':>10}{'CPU s':>9}{'peak MB':>10}{'work MB':>10}{'mAP':>9}{'mINP':>9}"
          f"{'R1':>8}")
    rows = []
    plan = [dict(base, gallery=args.gallery, path="features")]
    if args.compare_gallery:
        small = min(args.compare_gallery, args.gallery)
        plan += [dict(base, gallery=small, path="matrix"), dict(base, gallery=small, path="features")]
    for cfg in plan:
        row = run_child(cfg, args.timeout_s)
        rows.append(row)
        print(_row(row), flush=True)
    load_after = os.getloadavg()
    meta = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": getattr(args, "argv", None),
            "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count()}
    result = {"meta": meta, "rows": rows}
    if args.compare_gallery and all(r["status"] == "ok" for r in rows[1:]):
        matrix, streamed = rows[1], rows[2]
        same = (matrix["cmc_bits"] == streamed["cmc_bits"] and matrix["mAP"] == streamed["mAP"]
                and matrix["mINP"] == streamed["mINP"])
        result["comparison_equal"] = same
        print(f"full matrix vs streamed at G={matrix['gallery']}: "
              f"{'identical' if same else 'DIFFERENT'} cmc / mAP / mINP")
    print(f"load average after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}")
    for r in rows:
        r.pop("cmc_bits", None)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        path = write_json(result, str(args.out / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"))
    except (OSError, ReIDInputError) as exc:
        raise BenchArgumentError(f"--out {args.out}: {exc}") from None
    print(f"wrote {path}")
    return result


if __name__ == "__main__":  # a measurement child: python -m nformer_bench.reid_eval '<json config>'
    config = json.loads(sys.argv[1])
    try:
        res = measure(config)
    except MemoryError:
        res = {"status": "OOM (MemoryError)", "path": config["path"], "gallery": config["gallery"]}
    print(RESULT_MARK + json.dumps(res), flush=True)
