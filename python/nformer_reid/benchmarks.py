"""Timings of evaluate_rank and re-ranking (synthetic features at Re-ID dataset sizes).

  python -m nformer_reid.benchmarks rank   [--threads 2] [--noise 1.0]  # Market size 3,368 x 15,913
  python -m nformer_reid.benchmarks rerank --num-query 3368 --num-gallery 15913 [--dense]
Prints one JSON line per measurement (device, threads, sizes, seconds, peak RSS).
"""
import argparse
import json
import resource
import time

import numpy as np
import torch

from nformer_reid.data.synthetic import make_feature_benchmark
from nformer_reid.metrics import compute_distance_matrix, evaluate_rank
from nformer_reid.rerank import re_ranking, re_ranking_sparse


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def market_sized_features(num_query=3368, num_gallery=15913, dim=256, noise=1.0, seed=0):
    """Synthetic query/gallery features at given sizes: 2 queries + 6 gallery images per identity
    (4 of 6 cameras x 2 images), the rest of the gallery distractors."""
    ids = max(1, num_query // 2)
    bench = make_feature_benchmark(num_train_ids=1, num_test_ids=ids, num_cams=6, images_per_cam=2, cams_per_id=4,
                                   dim=dim, noise=noise, num_distractors=max(0, num_gallery - 6 * ids), seed=seed)
    q, g = bench.query, bench.gallery
    return (q.feats[:num_query], q.pids[:num_query], q.camids[:num_query],
            g.feats[:num_gallery], g.pids[:num_gallery], g.camids[:num_gallery])


def bench_rank(repeats=3, noise=1.0):
    qf, qp, qc, gf, gp, gc = market_sized_features(noise=noise)
    cases = {"synthetic features": compute_distance_matrix(qf, gf).numpy(),
             "uniform random (worst case)": np.random.default_rng(0).random((qf.shape[0], gf.shape[0]),
                                                                            dtype=np.float32)}
    for name, dist in cases.items():
        times, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            cmc, mAP = evaluate_rank(dist, qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy())
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        print(json.dumps({"bench": "evaluate_rank", "distmat": name, "shape": list(dist.shape),
                          "threads": torch.get_num_threads(), "seconds_min": round(min(times), 3),
                          "seconds_all": [round(t, 3) for t in times], "cpu_seconds_min": round(min(cpu), 3),
                          "mAP": round(mAP, 4)}), flush=True)


def bench_rerank(num_query, num_gallery, dim=256, dense=False, k1=20, k2=6):
    qf, _, _, gf, _, _ = market_sized_features(num_query, num_gallery, dim)
    start, start_cpu = time.perf_counter(), time.process_time()
    sparse = re_ranking_sparse(qf, gf, k1, k2, 0.3)
    t_sparse = time.perf_counter() - start
    print(json.dumps({"bench": "re_ranking_sparse", "Q": num_query, "G": num_gallery, "dim": dim,
                      "threads": torch.get_num_threads(), "seconds": round(t_sparse, 2),
                      "cpu_seconds": round(time.process_time() - start_cpu, 2),
                      "peak_rss_gb": round(_peak_rss_gb(), 2)}), flush=True)
    if dense:
        q = torch.nn.functional.normalize(qf, dim=1).double()
        g = torch.nn.functional.normalize(gf, dim=1).double()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = re_ranking(torch.cdist(q, g).numpy(), torch.cdist(q, q).numpy(), torch.cdist(g, g).numpy(), k1, k2, 0.3)
        t_dense = time.perf_counter() - start
        print(json.dumps({"bench": "re_ranking (dense)", "Q": num_query, "G": num_gallery, "seconds": round(t_dense, 2),
                          "cpu_seconds": round(time.process_time() - start_cpu, 2),
                          "peak_rss_gb": round(_peak_rss_gb(), 2),
                          "max_abs_diff_vs_sparse": float(np.abs(out - sparse).max())}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nformer_reid.benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rank", "rerank"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--noise", type=float, default=1.0, help="feature noise (1.0: mAP ~95%%, 1.6: ~50%%)")
    parser.add_argument("--dense", action="store_true", help="also time the dense re_ranking (O(N^2) memory)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "rank":
        bench_rank(noise=args.noise)
    else:
        bench_rerank(args.num_query, args.num_gallery, args.dim, args.dense)


if __name__ == "__main__":
    main()
