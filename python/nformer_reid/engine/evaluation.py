"""Feature extraction, NFormer refinement, mAP / CMC, and `compare`: the one evaluation pipeline of
the eval, features and demo commands."""
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from nformer_reid.config import KnnOptions
from nformer_reid.engine.device import autocast, resolve_device
from nformer_reid.metrics import compute_distance_matrix, evaluate_rank
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
def refine_features(nformer, qf: torch.Tensor, gf: torch.Tensor, mode: str = "official", seed: int = 0,
                    device=None, amp: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """NFormer refinement of query + gallery features as one set.

    mode "official": one joint query+gallery sequence (as the released code); "paper": the same
    with query-query isolation (queries never neighbour each other nor serve as landmarks).
    Inputs are L2-normalised first (as the official evaluation); landmarks come from a
    torch.Generator seeded with `seed`, so numbers are reproducible. Paper mode needs
    G >= min(topk, Q + G) - 1 gallery rows (each query's neighbours are itself and gallery rows).
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"mode must be 'official' or 'paper', got {mode!r}")
    qf, gf = as_features(qf, "qf"), as_features(gf, "gf")
    if qf.shape[1] != gf.shape[1] or qf.shape[1] != nformer.dim:
        raise ValueError(f"qf and gf must be (Q,{nformer.dim}) and (G,{nformer.dim}) for this NFormer, got "
                         f"{tuple(qf.shape)} and {tuple(gf.shape)}")
    seed = as_int(seed, "seed", minimum=0)
    if mode == "paper":
        check_paper_mode(nformer.topk, qf.shape[0], gf.shape[0])
    device = resolve_device(device)
    nformer = nformer.to(device).eval()
    x = torch.nn.functional.normalize(torch.cat([qf, gf]).float(), dim=1).to(device)
    query_mask = None
    if mode == "paper":
        query_mask = torch.arange(x.shape[0], device=device) < qf.shape[0]
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    with autocast(device, amp):
        out = nformer(x, generator=generator, query_mask=query_mask).float()
    logger.info("NFormer (%s) refined %d features on %s in %.1f s", mode, x.shape[0], device, time.time() - started)
    return out[: qf.shape[0]].cpu(), out[qf.shape[0]:].cpu()


def check_paper_mode(topk: int, num_query: int, num_gallery: int, topk_name: str = "topk") -> None:
    """ValueError unless paper mode (query-query isolation) can give every query its k - 1
    neighbours from the gallery, k = min(topk, Q + G)."""
    k = min(topk, num_query + num_gallery)
    if num_query and num_gallery < max(1, k - 1):
        raise ValueError(f"paper mode needs at least {max(1, k - 1)} gallery features for {topk_name} {topk}, got "
                         f"{num_gallery} (lower {topk_name}, or use mode official)")


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank: bool = False, max_rank: int = 50,
                      k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                      knn_precision: str = KnnOptions.knn_precision) -> Dict:
    """mAP / CMC of L2-normalised features (squared Euclidean), optionally k-reciprocal re-ranked
    (neighbour lists by nk.knn with precision=knn_precision)."""
    if rerank:
        dist = re_ranking_sparse(qf, gf, k1, k2, lambda_value, knn_precision=knn_precision)
    else:
        dist = compute_distance_matrix(qf, gf, "euclidean", normalize=True)
    cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    return {"mAP": mAP, "cmc": cmc, "R1": float(cmc[0]), "R5": float(cmc[min(4, len(cmc) - 1)]),
            "R10": float(cmc[min(9, len(cmc) - 1)])}


def format_result(name: str, res: Dict) -> str:
    return f"{name:<24} mAP {res['mAP']:6.1%}  R1 {res['R1']:6.1%}  R5 {res['R5']:6.1%}  R10 {res['R10']:6.1%}"


def summarize(results: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    """The scalar metrics of each result (what results.json holds)."""
    return {name: {m: res[m] for m in ("mAP", "R1", "R5", "R10")} for name, res in results.items()}


@dataclass
class Comparison:
    results: Dict[str, Dict]  # name -> evaluate_features result, in report order
    refined: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # mode -> (query, gallery)


def compare(qf: torch.Tensor, gf: torch.Tensor, ids: Sequence[torch.Tensor], *, nformer=None,
            modes: Sequence[str] = ("official",), rerank: bool = False, baseline: str = "baseline",
            title: str = "features", out_dir: Optional[str] = None, seed: int = 0, device=None,
            knn_precision: str = KnnOptions.knn_precision) -> Comparison:
    """mAP / CMC of the `baseline` features and, unless nformer is None, of their NFormer refinement
    in each of `modes`; with rerank, also the baseline and the first mode k-reciprocal re-ranked.

    ids = (q_pids, g_pids, q_camids, g_camids). knn_precision: nk.knn's precision for the
    re-ranking neighbour lists (the NFormer searches with its own knn_precision). Logs the table; with out_dir, writes cmc.png and
    results.json ({name: {mAP, R1, R5, R10}}) there.
    """
    if len(ids) != 4:
        raise ValueError(f"ids must be (q_pids, g_pids, q_camids, g_camids), got {len(ids)} arrays")
    unknown = [m for m in modes if m not in REFINE_MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty sequence of {REFINE_MODES}, got {list(modes)}")
    results = {baseline: evaluate_features(qf, gf, *ids)}
    if rerank:
        results[f"{baseline} + re-ranking"] = evaluate_features(qf, gf, *ids, rerank=True,
                                                                   knn_precision=knn_precision)
    refined = {}
    if nformer is not None:
        for mode in modes:
            refined[mode] = refine_features(nformer, qf, gf, mode, seed, device)
            results[f"NFormer ({mode})"] = evaluate_features(*refined[mode], *ids)
        if rerank:
            results["NFormer + re-ranking"] = evaluate_features(*refined[modes[0]], *ids, rerank=True,
                                                                knn_precision=knn_precision)
    logger.info("results on %s (%d query / %d gallery):", title, len(ids[0]), len(ids[1]))
    for name, res in results.items():
        logger.info("  %s", format_result(name, res))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        plot_cmc({k: (v["cmc"], v["mAP"]) for k, v in results.items()}, os.path.join(out_dir, "cmc.png"),
                 title=f"CMC, {title}")
        write_json(summarize(results), os.path.join(out_dir, "results.json"))
        logger.info("wrote %s and results.json", os.path.join(out_dir, "cmc.png"))
    return Comparison(results, refined)
