"""Feature extraction, NFormer refinement, mAP / mINP / CMC (`score`), and `compare`: the one
evaluation pipeline of the eval, features and demo commands (and results.json)."""
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

import nformer_kernels as nk
from nformer_reid.config import KnnOptions, RerankOptions
from nformer_reid.engine.device import autocast, describe_device, resolve_device
from nformer_reid.metrics import evaluate_features, evaluate_rank
from nformer_reid.plotting import plot_cmc
from nformer_reid.rerank import re_ranking_sparse
from nformer_reid.utils.checks import as_features, as_int
from nformer_reid.utils.io import write_json
from nformer_reid.utils.logging import progress

logger = logging.getLogger(__name__)

REFINE_MODES = ("official", "paper")


@torch.no_grad()
def extract_features(backbone, loader, flip: bool = False, device=None,
                     amp: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode backbone features (after BNNeck), optionally averaged with the flipped image."""
    device = resolve_device(device)
    backbone = backbone.to(device).eval()
    feats, pids, camids = [], [], []
    for imgs, pid, cam in progress(loader, "features"):
        imgs = imgs.to(device, non_blocking=True)
        with autocast(device, amp):
            f = backbone(imgs).float()
            if flip:
                f = (f + backbone(imgs.flip(3)).float()) / 2
        feats.append(f.cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(cam))
    return torch.cat(feats), torch.cat(pids).long(), torch.cat(camids).long()


@torch.no_grad()
def refine(nformer, feats: torch.Tensor, *, seed: int = 0, device=None, amp: str = "none",
           query_mask: Optional[torch.Tensor] = None, neighbors: bool = False):
    """NFormer refinement of one set of features (no labels needed): the eval-mode NFormer on the
    L2-normalised feats (N, nformer.in_dim), landmarks drawn by a torch.Generator seeded with
    `seed` (so numbers are reproducible). query_mask (N,) bool: those rows never neighbour each
    other nor serve as landmarks (paper mode). Returns the refined (N, nformer.dim) float32 CPU
    features, and with neighbors=True also the (N, min(topk, N)) int64 neighbour lists of the
    NFormer's search (self first; nk.knn on the projected features, as the NFormer's forward)."""
    feats = as_features(feats, "feats")
    in_dim = getattr(nformer, "in_dim", nformer.dim)
    if feats.shape[1] != in_dim:
        raise ValueError(f"feats must be (N,{in_dim}) for this NFormer (in_dim={in_dim}), got {tuple(feats.shape)}")
    seed = as_int(seed, "seed", minimum=0)
    device = resolve_device(device)
    nformer = nformer.to(device).eval()
    x = torch.nn.functional.normalize(feats.float(), dim=1).to(device)
    if query_mask is not None:
        query_mask = query_mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    with autocast(device, amp):
        out = nformer(x, generator=generator, query_mask=query_mask).float().cpu()
        if not neighbors:
            return out
        projected = nformer.project(x) if hasattr(nformer, "project") else x
        idx = nk.ops.knn(projected, min(nformer.topk, x.shape[0]), query_mask=query_mask,
                         precision=nformer.knn_precision)
    return out, idx.long().cpu()


@torch.no_grad()
def refine_shard(nformer, feats_shard: torch.Tensor, *, seed: int = 0, device=None,
                 query_mask: Optional[torch.Tensor] = None, neighbors: bool = False, group=None):
    """`refine` of rows sharded across the ranks of a process group: on every rank, refine(nformer,
    feats_all, seed=seed, query_mask=query_mask_all)[my rows] (within 1e-5 relative, fp32), where
    feats_all is every rank's contiguous block of rows in rank order (uneven or empty blocks too).

    feats_shard: (n_local, nformer.in_dim) this rank's rows; query_mask: (n_local,) bool, this
    rank's part of the mask. The NFormer runs by nformer_kernels.distributed.nformer_forward (the
    landmarks drawn on rank 0 from a torch.Generator seeded with `seed`, as `refine` draws them, and
    sent to every rank), in fp32 on `device` (NCCL: this rank's GPU). Returns this rank's refined
    (n_local, nformer.dim) float32 CPU rows, and with neighbors=True also their (n_local, k) int64
    neighbour lists as global row ids (self first, k = min(topk, N); nformer_kernels.distributed.knn
    of the projected rows: exact fp32 scores). group: as nformer_forward's (None: the default
    group; without one, a world of one). Every rank must call it; an argument error on one rank
    raises on all of them."""
    from nformer_kernels import distributed as nkd

    seed = as_int(seed, "seed", minimum=0)  # the same on every rank: fails on all of them alike
    device = resolve_device(device)
    nformer = nformer.to(device).eval()
    # Row-wise, so each rank normalises its own rows; the shape / finiteness checks are
    # nformer_forward's, compared across ranks before any other communication.
    x = torch.nn.functional.normalize(torch.as_tensor(feats_shard).float(), dim=1).to(device)
    if query_mask is not None:
        query_mask = query_mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    out = nkd.nformer_forward(nformer, x, generator=generator, group=group, query_mask=query_mask).float().cpu()
    if not neighbors:
        return out
    shards, _ = nkd.gather_checked(lambda: (x.shape[0], x.device, None), group)
    projected = nformer.project(x) if hasattr(nformer, "project") else x
    idx = nkd.knn(projected, min(nformer.topk, shards.total), group, query_mask=query_mask)
    return out, idx.long().cpu()


@torch.no_grad()
def refine_features(nformer, qf: torch.Tensor, gf: torch.Tensor, mode: str = "official", seed: int = 0,
                    device=None, amp: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """NFormer refinement of query + gallery features as one set (see `refine`).

    mode "official": one joint query+gallery sequence (as the released code); "paper": the same
    with query-query isolation (queries never neighbour each other nor serve as landmarks).
    Inputs are L2-normalised first (as the official evaluation); landmarks come from a
    torch.Generator seeded with `seed`, so numbers are reproducible. Paper mode needs
    G >= min(topk, Q + G) - 1 gallery rows (each query's neighbours are itself and gallery rows).
    Features are nformer.in_dim wide (the NFormer projects them to its dim when they differ).
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"mode must be 'official' or 'paper', got {mode!r}")
    qf, gf = as_features(qf, "qf"), as_features(gf, "gf")
    in_dim = getattr(nformer, "in_dim", nformer.dim)
    if qf.shape[1] != gf.shape[1] or qf.shape[1] != in_dim:
        raise ValueError(f"qf and gf must be (Q,{in_dim}) and (G,{in_dim}) for this NFormer (in_dim={in_dim}), got "
                         f"{tuple(qf.shape)} and {tuple(gf.shape)}")
    seed = as_int(seed, "seed", minimum=0)
    if mode == "paper":
        check_paper_mode(nformer.topk, qf.shape[0], gf.shape[0])
    device = resolve_device(device)
    query_mask = None
    if mode == "paper":
        query_mask = torch.arange(qf.shape[0] + gf.shape[0]) < qf.shape[0]
    started = time.time()
    out = refine(nformer, torch.cat([qf, gf]), seed=seed, device=device, amp=amp, query_mask=query_mask)
    logger.info("NFormer (%s) refined %d features on %s in %.1f s", mode, out.shape[0], device, time.time() - started)
    return out[: qf.shape[0]], out[qf.shape[0]:]


def check_paper_mode(topk: int, num_query: int, num_gallery: int, topk_name: str = "topk") -> None:
    """ValueError unless paper mode (query-query isolation) can give every query its k - 1
    neighbours from the gallery, k = min(topk, Q + G)."""
    k = min(topk, num_query + num_gallery)
    if num_query and num_gallery < max(1, k - 1):
        raise ValueError(f"paper mode needs at least {max(1, k - 1)} gallery features for {topk_name} {topk}, got "
                         f"{num_gallery} (lower {topk_name}, or use mode official)")


@dataclass(frozen=True)
class RerankParams:
    """k-reciprocal re-ranking parameters (rerank.re_ranking_sparse's k1, k2, lambda_value)."""
    k1: int = RerankOptions.rerank_k1
    k2: int = RerankOptions.rerank_k2
    lambda_value: float = RerankOptions.rerank_lambda

    @classmethod
    def of(cls, cfg) -> "RerankParams":
        """The parameters of a command config (its rerank_k1 / rerank_k2 / rerank_lambda)."""
        return cls(cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda)


def _metrics(cmc, mAP: float, mINP: float) -> Dict:
    cmc = np.asarray(cmc, dtype=np.float64)
    return {"mAP": float(mAP), "mINP": float(mINP), "R1": float(cmc[0]), "R5": float(cmc[min(4, len(cmc) - 1)]),
            "R10": float(cmc[min(9, len(cmc) - 1)]), "cmc": cmc}


def score_distances(dist, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> Dict:
    """mAP, mINP, R1 / R5 / R10 and the CMC (numpy, to min(max_rank, G)) of a query x gallery
    distance matrix (metrics.evaluate_rank: torchreid's protocol)."""
    max_rank = min(max_rank, len(dist[0]) if len(dist) else max_rank)  # a small gallery: its length, no warning
    cmc, mAP, mINP = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, return_mINP=True)
    return _metrics(cmc, mAP, mINP)


def score(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank: bool = False, max_rank: int = 50,
          params: RerankParams = RerankParams(), knn_precision: str = KnnOptions.knn_precision) -> Dict:
    """mAP, mINP, R1 / R5 / R10 and the CMC of query features qf against gallery features gf:
    squared Euclidean distances of the L2-normalised features (metrics.evaluate_features, which
    streams them: no Q x G matrix), or with rerank their k-reciprocal re-ranking
    (rerank.re_ranking_sparse with `params`, neighbour lists by nk.knn with
    precision=knn_precision; that (Q, G) matrix is rerank's output)."""
    if rerank:
        dist = re_ranking_sparse(qf, gf, params.k1, params.k2, params.lambda_value, knn_precision=knn_precision)
        return score_distances(dist, q_pids, g_pids, q_camids, g_camids, max_rank)
    return _score_plain(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank)


def _score_plain(qf, gf, q_pids, g_pids, q_camids, g_camids, max_rank):
    # streamed: no Q x G matrix (the same numbers as evaluate_rank on compute_distance_matrix)
    max_rank = min(max_rank, len(gf)) if len(gf) else max_rank  # a small gallery: its length, no warning
    cmc, mAP, mINP = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric="euclidean",
                                       normalize=True, max_rank=max_rank, return_mINP=True)
    return _metrics(cmc, mAP, mINP)


def score_distributed(qf_shard, gf_shard, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                      group=None) -> Dict:
    """`score` (without re-ranking) of queries and a gallery sharded across the ranks of a process
    group: on every rank the same mAP, mINP, R1 / R5 / R10 and CMC as score(qf_all, gf_all, ...)
    on all ranks' rows in rank order, bit for bit (nformer_reid.distributed.evaluate_features_distributed:
    squared Euclidean distances of the L2-normalised rows, gallery blocks passed round the ring).
    Shards as that function takes them: contiguous blocks (possibly empty) with their ids, on one
    device per rank (CUDA for NCCL). The CMC runs to min(max_rank, G), G all ranks' gallery rows."""
    from nformer_kernels import distributed as nkd
    from nformer_reid.distributed import evaluate_features_distributed

    gallery_rows = gf_shard.shape[0] if hasattr(gf_shard, "shape") else len(gf_shard)
    device = gf_shard.device if isinstance(gf_shard, torch.Tensor) else torch.device("cpu")
    shards, _ = nkd.gather_checked(lambda: (gallery_rows, device, None), group)
    max_rank = min(max_rank, shards.total) if shards.total else max_rank  # a small gallery: its length, no warning
    cmc, mAP, mINP = evaluate_features_distributed(qf_shard, gf_shard, q_pids, g_pids, q_camids, g_camids,
                                                   metric="euclidean", normalize=True, max_rank=max_rank,
                                                   return_mINP=True, group=group)
    return _metrics(cmc, mAP, mINP)


def format_result(name: str, res: Dict) -> str:
    return (f"{name:<24} mAP {res['mAP']:6.1%}  mINP {res['mINP']:6.1%}  R1 {res['R1']:6.1%}  R5 {res['R5']:6.1%}  "
            f"R10 {res['R10']:6.1%}")


def summarize(results: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    """The scalar metrics of each result (mAP, mINP, R1, R5, R10)."""
    return {name: {m: res[m] for m in ("mAP", "mINP", "R1", "R5", "R10")} for name, res in results.items()}


def versions() -> Dict[str, str]:
    """Versions of what produced the numbers: nformer_kernels, torch, numpy, python, triton (if installed)."""
    import platform
    from importlib import metadata

    import nformer_kernels

    out = {"nformer_kernels": nformer_kernels.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        out["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        pass
    return out


def results_document(results: Dict[str, Dict], *, device=None, timings: Optional[Dict] = None,
                     run_info: Optional[Mapping] = None) -> Dict:
    """What results.json holds: {"methods": {name: {mAP, mINP, R1, R5, R10, cmc (list to max_rank)}},
    "config", "command" (from run_info: the effective options and the argv), "versions", "device",
    "timings" (seconds per stage)}, and "distributed" ({"processes": P, "backend": ...}) when
    run_info has it (a run sharded over P processes; "device" is then rank 0's)."""
    methods = {name: {**{k: v for k, v in res.items() if k != "cmc"}, "cmc": [float(c) for c in res["cmc"]]}
               for name, res in results.items()}
    run_info = dict(run_info or {})
    document = {"methods": methods, "config": run_info.get("config"), "command": run_info.get("command"),
                "versions": versions(), "device": describe_device(device), "timings": dict(timings or {})}
    if run_info.get("distributed"):
        document["distributed"] = dict(run_info["distributed"])
    return document


@dataclass
class Comparison:
    results: Dict[str, Dict]  # name -> score result, in report order
    refined: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # mode -> (query, gallery)
    timings: Dict[str, object] = field(default_factory=dict)  # seconds per stage (as in results.json)


class _Stopwatch:
    """Accumulates seconds per stage name into a dict."""

    def __init__(self, timings: Dict):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, *keys: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            target = self.timings
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = round(target.get(keys[-1], 0.0) + elapsed, 4)


def compare(qf: torch.Tensor, gf: torch.Tensor, ids: Sequence[torch.Tensor], *, nformer=None,
            modes: Sequence[str] = ("official",), rerank: bool = False, baseline: str = "baseline",
            title: str = "features", out_dir: Optional[str] = None, seed: int = 0, device=None,
            knn_precision: str = KnnOptions.knn_precision, rerank_params: RerankParams = RerankParams(),
            max_rank: int = 50, timings: Optional[Mapping] = None, run_info: Optional[Mapping] = None) -> Comparison:
    """mAP / mINP / CMC of the `baseline` features and, unless nformer is None, of their NFormer
    refinement in each of `modes`; with rerank, also the baseline and the first mode k-reciprocal
    re-ranked (rerank.re_ranking_sparse with rerank_params).

    ids = (q_pids, g_pids, q_camids, g_camids). knn_precision: nk.knn's precision for the
    re-ranking neighbour lists (the NFormer searches with its own knn_precision). Logs the table;
    with out_dir, writes cmc.png and results.json there (results_document: every method's metrics
    and full CMC, run_info's "config" and "command", versions, device, and the timings: those
    given, e.g. {"features": s}, plus "refinement" {mode: s}, "evaluation" and "re-ranking").
    """
    if len(ids) != 4:
        raise ValueError(f"ids must be (q_pids, g_pids, q_camids, g_camids), got {len(ids)} arrays")
    unknown = [m for m in modes if m not in REFINE_MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty sequence of {REFINE_MODES}, got {list(modes)}")
    if not isinstance(rerank_params, RerankParams):
        raise TypeError(f"rerank_params must be a RerankParams, got {type(rerank_params).__name__}")
    stages = dict(timings or {})
    clock = _Stopwatch(stages)

    def reranked(q, g):
        with clock("re-ranking"):
            return score(q, g, *ids, rerank=True, max_rank=max_rank, params=rerank_params,
                         knn_precision=knn_precision)

    def plain(q, g):
        with clock("evaluation"):
            return score(q, g, *ids, max_rank=max_rank)

    results = {baseline: plain(qf, gf)}
    if rerank:
        results[f"{baseline} + re-ranking"] = reranked(qf, gf)
    refined = {}
    if nformer is not None:
        for mode in modes:
            with clock("refinement", mode):
                refined[mode] = refine_features(nformer, qf, gf, mode, seed, device)
            results[f"NFormer ({mode})"] = plain(*refined[mode])
        if rerank:
            results["NFormer + re-ranking"] = reranked(*refined[modes[0]])
    logger.info("results on %s (%d query / %d gallery):", title, len(ids[0]), len(ids[1]))
    for name, res in results.items():
        logger.info("  %s", format_result(name, res))
    if out_dir is not None:
        write_results(out_dir, results, title=title, device=device, timings=stages, run_info=run_info)
    return Comparison(results, refined, stages)


def write_results(out_dir: str, results: Dict[str, Dict], *, title: str, device=None,
                  timings: Optional[Mapping] = None, run_info: Optional[Mapping] = None) -> None:
    """cmc.png and results.json (results_document) of `results` into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    plot_cmc({k: (v["cmc"], v["mAP"]) for k, v in results.items()}, os.path.join(out_dir, "cmc.png"),
             title=f"CMC, {title}")
    write_json(results_document(results, device=device, timings=timings, run_info=run_info),
               os.path.join(out_dir, "results.json"))
    logger.info("wrote %s and results.json", os.path.join(out_dir, "cmc.png"))
