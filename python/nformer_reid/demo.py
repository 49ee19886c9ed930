"""End-to-end NFormer demo on the synthetic feature benchmark (no downloads, CPU friendly).

Trains the NFormer stage on synthetic train features, then reports mAP / CMC of the test set
before NFormer, after NFormer (official joint query+gallery sequence and paper query-query
isolation, seeded landmarks), and with k-reciprocal re-ranking; saves CMC and loss plots plus
results.json. Needs no torchvision.
"""
import logging
import os
import time
from typing import Dict, Mapping, Optional

import torch

import nformer_kernels as nk
from nformer_reid.config import DemoConfig
from nformer_reid.data.synthetic import make_feature_benchmark
from nformer_reid.engine.evaluation import compare, summarize
from nformer_reid.engine.nformer_training import train_nformer
from nformer_reid.plotting import plot_losses

logger = logging.getLogger(__name__)

# Sized so the whole demo takes well under a minute on 2 CPU cores: 1500 train identities keep the
# NFormer from memorising them (it must learn to aggregate neighbours to lower the loss).
DEMO_BENCHMARK = dict(num_train_ids=1500, num_test_ids=300, num_cams=6, images_per_cam=3, cams_per_id=4,
                      dim=128, noise=1.5, num_distractors=500)
DEMO_NFORMER = dict(depth=2, num_heads=2, num_landmarks=5, topk=20)
# --quick: a seconds-long smoke run of the same pipeline (numbers not meaningful).
QUICK_BENCHMARK = dict(DEMO_BENCHMARK, num_train_ids=60, num_test_ids=30, num_distractors=20)


def run_demo(config: DemoConfig = DemoConfig(), run_info: Optional[Mapping] = None) -> Dict[str, Dict[str, float]]:
    """Run the demo with `config` (the `nformer-reid demo` options); returns {name: {mAP, mINP, R1,
    R5, R10}}. run_info ({"config", "command"}) goes into results.json (engine.evaluation.compare)."""
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig, got {type(config).__name__}")
    start = time.time()
    timings = {}
    benchmark = QUICK_BENCHMARK if config.quick else DEMO_BENCHMARK
    torch.manual_seed(config.seed)  # the NFormer's initial weights
    os.makedirs(config.out, exist_ok=True)
    bench = make_feature_benchmark(seed=config.seed, **benchmark)
    q, g = bench.query, bench.gallery
    logger.info("synthetic benchmark: %d train features (%d ids), %d query / %d gallery (dim %d); "
                "nformer_kernels backend: %s", bench.train.feats.shape[0], benchmark["num_train_ids"],
                q.feats.shape[0], g.feats.shape[0], benchmark["dim"], nk.get_backend("cpu"))
    nformer = nk.NFormer(dim=benchmark["dim"], num_classes=benchmark["num_train_ids"],
                         knn_precision=config.knn_precision, **DEMO_NFORMER)
    started = time.time()
    history = train_nformer(nformer, bench.train.feats, bench.train.pids, out_dir=config.out, steps=config.steps,
                            seq_len=config.seq_len, batch_size=2, lr=config.lr, seed=config.seed, amp="none",
                            device=config.device, log_period=max(1, config.steps // 4), save_last=False)
    timings["training"] = round(time.time() - started, 4)
    results = compare(q.feats, g.feats, (q.pids, g.pids, q.camids, g.camids), nformer=nformer,
                      modes=("official", "paper"), rerank=not config.no_rerank, baseline="baseline",
                      title="synthetic benchmark, test identities unseen in training", out_dir=config.out,
                      seed=config.seed, device=config.device, knn_precision=config.knn_precision, timings=timings,
                      run_info=run_info).results
    gain = results["NFormer (official)"]["mAP"] - results["baseline"]["mAP"]
    logger.info("NFormer changes mAP by %+.1f%% over the input features", 100 * gain)
    plot_losses({"NFormer stage 2": history}, os.path.join(config.out, "loss.png"))
    logger.info("plots: %s, %s; total %.0f s", os.path.join(config.out, "cmc.png"),
                os.path.join(config.out, "loss.png"), time.time() - start)
    return summarize(results)
