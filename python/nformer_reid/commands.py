"""What each nformer-reid command does, given its config dataclass (nformer_reid.config).

Imports are inside the commands so that each pulls in only what it needs: train and eval the
image pipeline (torchvision), features / demo / datasets not.
"""
import dataclasses
import logging
import os

import torch

import nformer_kernels as nk

logger = logging.getLogger(__name__)


def _load_dataset(cfg):
    from nformer_reid.data import Market1501, build_dataset, make_synthetic_market

    if cfg.data == "synthetic":
        root = cfg.root or os.path.join(cfg.out, "synthetic_market")
        make_synthetic_market(root, size=cfg.size, seed=cfg.seed)
        return Market1501(root)
    if not cfg.root:
        raise SystemExit("nformer-reid: --root is required for real datasets")
    return build_dataset(cfg.data, cfg.root)


def _evaluate_model(cfg, model, dataset, device):
    from nformer_reid.data.loader import build_test_loader
    from nformer_reid.engine import compare, extract_features

    feats = [extract_features(model.backbone, build_test_loader(items, cfg.size, cfg.test_batch, cfg.workers),
                              cfg.flip, device, cfg.amp) for items in (dataset.query, dataset.gallery)]
    (qf, q_pids, q_cams), (gf, g_pids, g_cams) = feats
    return compare(qf, gf, (q_pids, g_pids, q_cams, g_cams), nformer=None if cfg.mode == "none" else model.nformer,
                   modes=(cfg.mode,), rerank=cfg.rerank, baseline="backbone", title=dataset.name, out_dir=cfg.out,
                   seed=cfg.seed, device=device).results


def train(cfg):
    from nformer_reid.data.loader import build_test_loader, build_train_loader
    from nformer_reid.engine import (extract_features, load_checkpoint, resolve_device, save_checkpoint,
                                     train_backbone, train_nformer)
    from nformer_reid.model import ReIDModel
    from nformer_reid.plotting import plot_losses

    torch.manual_seed(cfg.seed)
    logger.info("nformer-reid train %s", dataclasses.asdict(cfg))
    device = resolve_device(cfg.device)
    dataset = _load_dataset(cfg)
    model = ReIDModel(dataset.num_train_pids, arch=cfg.arch, feat_dim=cfg.feat_dim, pretrained=cfg.pretrained,
                      nformer_depth=cfg.nformer_depth, nformer_landmarks=cfg.nformer_landmarks,
                      nformer_topk=cfg.nformer_topk)
    if cfg.weights:
        load_checkpoint(cfg.weights, model)
        logger.info("loaded weights from %s", cfg.weights)
    histories = {}
    if cfg.stage in ("1", "both"):
        loader = build_train_loader(dataset.train, cfg.size, cfg.batch_size, cfg.num_instances, cfg.workers, cfg.seed)
        histories["stage 1"] = train_backbone(
            model, loader, dataset.num_train_pids, out_dir=cfg.out, epochs=cfg.epochs, max_steps=cfg.max_steps,
            lr=cfg.lr, milestones=cfg.milestones, warmup_epochs=cfg.warmup_epochs, amp=cfg.amp, device=device,
            resume=cfg.resume if cfg.stage == "1" else None)
    if cfg.stage == "2" and not (cfg.weights or cfg.resume):
        logger.warning("--stage 2 without --weights trains the NFormer on features of an untrained backbone")
    if cfg.stage in ("2", "both"):
        loader = build_test_loader(dataset.train, cfg.size, cfg.test_batch, cfg.workers)
        feats, pids, _ = extract_features(model.backbone, loader, False, device, cfg.amp)
        histories["stage 2"] = train_nformer(
            model, feats, pids, out_dir=cfg.out, epochs=cfg.nformer_epochs, steps=cfg.nformer_steps,
            seq_len=cfg.seq_len, batch_size=cfg.nformer_batch, lr=cfg.nformer_lr, amp=cfg.amp, device=device,
            seed=cfg.seed, resume=cfg.resume if cfg.stage == "2" else None)
    final = save_checkpoint(os.path.join(cfg.out, "model_final.pth"), model, stage=2 if cfg.stage != "1" else 1,
                            epoch=cfg.epochs)
    plot_losses(histories, os.path.join(cfg.out, "loss.png"))
    logger.info("saved %s and %s", final, os.path.join(cfg.out, "loss.png"))
    if cfg.eval:
        _evaluate_model(cfg, model, dataset, device)


def evaluate(cfg):
    from nformer_reid.engine import load_model, resolve_device
    from nformer_reid.model import load_official_checkpoint

    if bool(cfg.weights) == bool(cfg.official):
        raise SystemExit("nformer-reid eval: give exactly one of --weights (ours) or --official (nformer_model.pth)")
    device = resolve_device(cfg.device)
    dataset = _load_dataset(cfg)
    if cfg.official:
        model = load_official_checkpoint(cfg.official)
        logger.info("loaded the official release %s (ResNet-50 without stem ReLU, as the official code)", cfg.official)
    else:
        try:
            model = load_model(cfg.weights, "ReIDModel")
        except ValueError as exc:
            raise SystemExit(f"nformer-reid eval: {exc}") from None
    return _evaluate_model(cfg, model, dataset, device)


def _load_nformer(cfg):
    """The NFormer of --official or --weights."""
    from nformer_reid.engine import load_model

    if cfg.official:
        return nk.NFormer.from_official(torch.load(cfg.official, map_location="cpu", weights_only=False),
                                        num_landmarks=cfg.nformer_landmarks, topk=cfg.nformer_topk)
    try:
        return load_model(cfg.weights, "NFormer")
    except ValueError:
        raise SystemExit(f"nformer-reid features: {cfg.weights} is not an NFormer saved by this command") from None


def features(cfg):
    from nformer_reid.data import load_features
    from nformer_reid.engine import compare, resolve_device, save_checkpoint, train_nformer
    from nformer_reid.plotting import plot_losses

    if sum(bool(a) for a in (cfg.train, cfg.weights, cfg.official)) != 1:
        raise SystemExit("nformer-reid features: give exactly one of --train (train a new NFormer), --weights or "
                         "--official")
    device = resolve_device(cfg.device)
    try:
        query, gallery = load_features(cfg.query, "query"), load_features(cfg.gallery, "gallery")
        train = load_features(cfg.train, "train", need_camids=False) if cfg.train else None
    except (ValueError, OSError) as exc:
        raise SystemExit(f"nformer-reid features: {exc}") from None
    dim = query.feats.shape[1]
    if gallery.feats.shape[1] != dim:
        raise SystemExit(f"nformer-reid features: query features are {dim}-d, gallery {gallery.feats.shape[1]}-d")
    if train is None:
        nformer = _load_nformer(cfg)
    else:
        if train.feats.shape[1] != dim:
            raise SystemExit(f"nformer-reid features: train features are {train.feats.shape[1]}-d, query {dim}-d")
        labels = torch.unique(train.pids, return_inverse=True)[1]  # any pid values -> 0..C-1
        config = dict(dim=dim, depth=cfg.nformer_depth, num_landmarks=cfg.nformer_landmarks,
                      topk=cfg.nformer_topk, num_classes=int(labels.max()) + 1)
        nformer = nk.NFormer(**config)
        history = train_nformer(nformer, train.feats, labels, out_dir=cfg.out, steps=cfg.nformer_steps,
                                seq_len=cfg.seq_len, batch_size=cfg.nformer_batch, lr=cfg.nformer_lr, amp=cfg.amp,
                                device=device, seed=cfg.seed)
        plot_losses({"NFormer": history}, os.path.join(cfg.out, "loss.png"))
        path = save_checkpoint(os.path.join(cfg.out, "nformer.pth"), nformer, stage=2, epoch=0, history=history,
                               extra={"step": len(history)}, config=config)
        logger.info("saved %s (reuse it with --weights)", path)
    if nformer.dim != dim:
        raise SystemExit(f"nformer-reid features: the NFormer is {nformer.dim}-d but the features are {dim}-d")
    comparison = compare(query.feats, gallery.feats, (query.pids, gallery.pids, query.camids, gallery.camids),
                         nformer=nformer, modes=(cfg.mode,), rerank=cfg.rerank, baseline="input features",
                         title=f"{dim}-d precomputed features", out_dir=cfg.out, seed=cfg.seed, device=device)
    qn, gn = comparison.refined[cfg.mode]
    torch.save({"query": qn, "gallery": gn}, os.path.join(cfg.out, "refined_features.pt"))
    logger.info("wrote %s", os.path.join(cfg.out, "refined_features.pt"))
    return comparison.results


def demo(cfg):
    from nformer_reid.demo import run_demo

    return run_demo(cfg)


def datasets(cfg):
    from nformer_reid.data import DATASETS, DatasetLayoutError, Market1501, build_dataset, make_synthetic_market

    if cfg.name == "synthetic":
        make_synthetic_market(cfg.root)
        print(Market1501(cfg.root, verbose=False).statistics_table())
        return
    names = [cfg.name] if cfg.name else list(DATASETS)
    found = 0
    for name in names:
        try:
            print(build_dataset(name, cfg.root, verbose=False).statistics_table())
            found += 1
        except DatasetLayoutError as exc:
            if cfg.name:
                raise SystemExit(f"nformer-reid: {exc}")
    if not found:
        raise SystemExit(f"nformer-reid: no known dataset layout under {cfg.root!r} "
                         f"(looked for {', '.join(DATASETS)}); try --name <dataset> for the expected layout")


RUNNERS = {"train": train, "eval": evaluate, "features": features, "demo": demo, "datasets": datasets}
