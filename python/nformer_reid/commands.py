"""What each nformer-reid command does, given its config dataclass (nformer_reid.config).

Every command first checks everything it can without writing (options that go together, input
files readable and of the right layout, the device present, the dataset parsed, the output
folder free to write: `_start_run`), then works. A user error is a ReIDInputError naming the
file or option; the CLI prints it as one line (exit 2).

Imports are inside the commands so that each pulls in only what it needs: train and eval the
image pipeline (torchvision), features / demo / datasets not.
"""
import contextlib
import dataclasses
import logging
import os
from typing import Dict, Iterable, Optional

import torch

import nformer_kernels as nk
from nformer_reid.utils.checks import as_device
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.io import check_input_file, check_outputs, load_torch, save_torch
from nformer_reid.utils.logging import setup_logging

logger = logging.getLogger(__name__)
OFFICIAL_TOPK, OFFICIAL_LANDMARKS, OFFICIAL_DEPTH = 20, 5, 4  # nk.NFormer / official release defaults


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def _user_error(prefix: str = ""):
    """Library argument errors (ValueError / TypeError) raised inside as ReIDInputError."""
    try:
        yield
    except ReIDInputError:
        raise
    except (ValueError, TypeError) as exc:
        raise ReIDInputError(prefix + " ".join(str(exc).split())) from exc


def _device(cfg) -> torch.device:
    with _user_error():
        return as_device(cfg.device, "--device")


def _input_files(cfg, names: Iterable[str]) -> Dict[str, Optional[str]]:
    """{--flag: path} of the given file options, each checked to be a readable regular file."""
    files = {}
    for name in names:
        value = getattr(cfg, name, None)
        if value:
            files[_flag(name)] = check_input_file(value, _flag(name))
    return files


def _start_run(cfg, outputs: Iterable[str], inputs: Dict[str, Optional[str]]) -> None:
    """The last check before any write (check_outputs), then create --out and log to <out>/log.txt."""
    check_outputs(cfg.out, outputs, inputs, cfg.overwrite)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        raise ReIDInputError(f"--out {cfg.out}: cannot create the folder: {exc.strerror or exc}") from None
    setup_logging(os.path.join(cfg.out, "log.txt"))


def _check_root(cfg) -> None:
    if cfg.data == "synthetic":
        if cfg.root and os.path.exists(cfg.root) and not os.path.isdir(cfg.root):
            raise ReIDInputError(f"--root {cfg.root}: exists and is not a folder")
        return
    if not cfg.root:
        raise ReIDInputError("--root is required for real datasets (the folder holding the dataset)")
    _check_folder(cfg.root)


def _check_folder(root: str) -> None:
    path = os.path.expanduser(root)
    if not os.path.exists(path):
        raise ReIDInputError(f"--root {root}: no such folder")
    if not os.path.isdir(path):
        raise ReIDInputError(f"--root {root}: exists and is not a folder")


def _parse_dataset(cfg):
    """The real dataset of cfg (None for synthetic: generated once the run has started)."""
    from nformer_reid.data import build_dataset

    return None if cfg.data == "synthetic" else build_dataset(cfg.data, cfg.root)


def _synthetic_dataset(cfg):
    from nformer_reid.data import Market1501, make_synthetic_market

    root = cfg.root or os.path.join(cfg.out, "synthetic_market")
    make_synthetic_market(root, size=cfg.size, seed=cfg.seed)
    return Market1501(root)


def _check_test_split(cfg, q_pids, g_pids, q_cams, g_cams, where: str, topk: int) -> None:
    """Before any work: the query/gallery split can be evaluated (a valid match exists) and paper
    mode has gallery neighbours enough."""
    from nformer_reid.engine.evaluation import check_paper_mode
    from nformer_reid.metrics import count_valid_queries

    if not count_valid_queries(q_pids, g_pids, q_cams, g_cams):
        raise ReIDInputError(f"{where}: no query has a valid match in the gallery (same pid in another camera, pid "
                             "not -1/0): check the pids / camids")
    if getattr(cfg, "mode", None) == "paper":
        with _user_error(f"{where}: "):
            check_paper_mode(topk, len(q_pids), len(g_pids), "--nformer-topk")


def _check_dataset_split(cfg, dataset, topk: int) -> None:
    def ids(items, i):
        return torch.tensor([x[i] for x in items], dtype=torch.long)

    _check_test_split(cfg, ids(dataset.query, 1), ids(dataset.gallery, 1), ids(dataset.query, 2),
                      ids(dataset.gallery, 2), f"{dataset.name} (--root {dataset.root})", topk)


def _evaluate_model(cfg, model, dataset, device):
    from nformer_reid.data.loader import build_test_loader
    from nformer_reid.engine import compare, extract_features

    feats = [extract_features(model.backbone, build_test_loader(items, cfg.size, cfg.test_batch, cfg.workers),
                              cfg.flip, device, cfg.amp) for items in (dataset.query, dataset.gallery)]
    (qf, q_pids, q_cams), (gf, g_pids, g_cams) = feats
    return compare(qf, gf, (q_pids, g_pids, q_cams, g_cams), nformer=None if cfg.mode == "none" else model.nformer,
                   knn_precision=cfg.knn_precision,
                   modes=(cfg.mode,), rerank=cfg.rerank, baseline="backbone", title=dataset.name, out_dir=cfg.out,
                   seed=cfg.seed, device=device).results


MODEL_FLAGS = {"num_classes": "the dataset's train identities", "arch": "--arch", "feat_dim": "--feat-dim",
               "nformer_depth": "--nformer-depth"}


def _train_outputs(cfg):
    outputs = ["model_final.pth", "loss.png"]
    outputs += ["stage1_last.pth"] if cfg.stage in ("1", "both") else []
    outputs += ["stage2_last.pth"] if cfg.stage in ("2", "both") else []
    return outputs + (["cmc.png", "results.json"] if cfg.eval else [])


def _check_resume(cfg, dataset_size: Optional[int]):
    """The --resume checkpoint continues the asked stage and has work left: returns its dict."""
    from nformer_reid.engine.checkpoints import read_checkpoint

    state = read_checkpoint(cfg.resume, "--resume")
    if state["kind"] != "ReIDModel" or state.get("optimizer") is None or state["stage"] != int(cfg.stage):
        raise ReIDInputError(f"--resume {cfg.resume} is not a stage-{cfg.stage} *_last.pth checkpoint with optimizer "
                             f"state (it is stage {state['stage']}{', a final checkpoint' if state.get('optimizer') is None else ''}); "
                             "start from a final checkpoint with --weights instead")
    if cfg.stage == "1" and state["epoch"] >= cfg.epochs:
        raise ReIDInputError(f"--resume {cfg.resume} is at epoch {state['epoch']} of --epochs {cfg.epochs}: "
                             "nothing to train (raise --epochs)")
    if cfg.stage == "2" and dataset_size is not None:
        total = cfg.nformer_steps or cfg.nformer_epochs * max(1, dataset_size // 30 // cfg.nformer_batch)
        if int(state["extra"].get("step", 0)) >= total:
            raise ReIDInputError(f"--resume {cfg.resume} is at step {state['extra'].get('step')} of {total} "
                                 "stage-2 steps: nothing to train (raise --nformer-steps / --nformer-epochs)")
    return state


def _check_train_dataset(cfg, dataset) -> None:
    pids_per_batch = cfg.batch_size // cfg.num_instances
    if cfg.stage in ("1", "both") and dataset.num_train_pids < pids_per_batch:
        raise ReIDInputError(f"{dataset.name}: {dataset.num_train_pids} train identities cannot fill batches of "
                             f"{pids_per_batch} identities (--batch-size {cfg.batch_size} / --num-instances "
                             f"{cfg.num_instances})")
    if cfg.stage in ("2", "both") and len(dataset.train) < 2:
        raise ReIDInputError(f"{dataset.name}: stage 2 needs at least 2 train images, got {len(dataset.train)}")
    if cfg.eval:
        _check_dataset_split(cfg, dataset, cfg.nformer_topk)


def train(cfg):
    from nformer_reid.utils.deps import import_torchvision

    import_torchvision()
    from nformer_reid.data.loader import build_test_loader, build_train_loader
    from nformer_reid.engine import extract_features, save_checkpoint, train_backbone, train_nformer
    from nformer_reid.engine.checkpoints import check_architecture, load_weights, read_checkpoint
    from nformer_reid.model import ReIDModel
    from nformer_reid.plotting import plot_losses

    device = _device(cfg)
    inputs = _input_files(cfg, ("pretrained", "weights", "resume"))
    _check_root(cfg)
    weights = read_checkpoint(cfg.weights, "--weights") if cfg.weights else None
    if weights is not None and weights["kind"] != "ReIDModel":
        raise ReIDInputError(f"--weights {cfg.weights} holds a bare NFormer (of 'nformer-reid features'), not a "
                             "Re-ID model")
    resume = _check_resume(cfg, None) if cfg.resume and cfg.stage == "1" else None
    dataset = _parse_dataset(cfg)

    def prepare():
        """Dataset-dependent checks, then the model (--pretrained, --weights and --resume checked against it)."""
        _check_train_dataset(cfg, dataset)
        state = _check_resume(cfg, len(dataset.train)) if cfg.resume and cfg.stage == "2" else resume
        torch.manual_seed(cfg.seed)
        with _user_error():
            model = ReIDModel(dataset.num_train_pids, arch=cfg.arch, feat_dim=cfg.feat_dim, pretrained=cfg.pretrained,
                              nformer_depth=cfg.nformer_depth, nformer_landmarks=cfg.nformer_landmarks,
                              nformer_topk=cfg.nformer_topk, knn_precision=cfg.knn_precision)
        for option, checkpoint in (("--weights", weights), ("--resume", state)):
            if checkpoint is not None:
                check_architecture(checkpoint, model.config, getattr(cfg, option[2:]), option, MODEL_FLAGS)
        if weights is not None:
            load_weights(model, weights, cfg.weights, "--weights")
            logger.info("loaded weights from %s", cfg.weights)
        return model

    model = prepare() if dataset is not None else None  # a real dataset: everything checked before any write
    _start_run(cfg, _train_outputs(cfg), inputs)
    logger.info("nformer-reid train %s", dataclasses.asdict(cfg))
    if dataset is None:  # synthetic: generated under --out (or --root) first
        dataset = _synthetic_dataset(cfg)
        model = prepare()
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
    if bool(cfg.weights) == bool(cfg.official):
        raise ReIDInputError("give exactly one of --weights (ours) or --official (nformer_model.pth)")
    from nformer_reid.utils.deps import import_torchvision

    import_torchvision()
    from nformer_reid.engine import load_model
    from nformer_reid.model import load_official_checkpoint

    device = _device(cfg)
    inputs = _input_files(cfg, ("weights", "official"))
    _check_root(cfg)
    if cfg.official:
        model = load_official_checkpoint(cfg.official, knn_precision=cfg.knn_precision)
        logger.info("loaded the official release %s (ResNet-50 without stem ReLU, as the official code)", cfg.official)
    else:
        model = load_model(cfg.weights, "ReIDModel", "--weights", knn_precision=cfg.knn_precision)
    topk = model.nformer.topk
    dataset = _parse_dataset(cfg)
    if dataset is not None:
        _check_dataset_split(cfg, dataset, topk)
    _start_run(cfg, ["cmc.png", "results.json"], inputs)
    if dataset is None:
        dataset = _synthetic_dataset(cfg)
        _check_dataset_split(cfg, dataset, topk)
    return _evaluate_model(cfg, model, dataset, device)


def _load_nformer(cfg):
    """The NFormer of --official or --weights; a depth given with --nformer-depth must match the
    file's, --nformer-topk / --nformer-landmarks (not stored in the weights) apply as given."""
    from nformer_reid.engine.checkpoints import load_weights, read_checkpoint

    if cfg.official:
        state = load_torch(cfg.official, "--official", weights_only=False)
        if not isinstance(state, dict):
            raise ReIDInputError(f"--official {cfg.official}: expected a state dict, got {type(state).__name__}")
        with _user_error(f"--official {cfg.official}: "):
            return nk.NFormer.from_official(state, depth=cfg.nformer_depth,
                                            num_landmarks=cfg.nformer_landmarks or OFFICIAL_LANDMARKS,
                                            topk=cfg.nformer_topk or OFFICIAL_TOPK, knn_precision=cfg.knn_precision)
    try:
        state = read_checkpoint(cfg.weights, "--weights")
    except ReIDInputError as exc:
        if "is not an nformer-reid checkpoint" not in str(exc):
            raise
        raise ReIDInputError(f"--weights {cfg.weights} is not an NFormer saved by this command (nformer.pth of "
                             "'nformer-reid features --train')") from exc
    if state["kind"] != "NFormer" or not state.get("config"):
        raise ReIDInputError(f"--weights {cfg.weights} is not an NFormer saved by this command (nformer.pth of "
                             "'nformer-reid features --train')")
    config = dict(state["config"])
    if cfg.nformer_depth is not None and config.get("depth") != cfg.nformer_depth:
        raise ReIDInputError(f"--weights {cfg.weights} holds an NFormer of depth {config.get('depth')}, but "
                             f"--nformer-depth {cfg.nformer_depth} was asked for")
    config.update({k: v for k, v in (("topk", cfg.nformer_topk), ("num_landmarks", cfg.nformer_landmarks))
                   if v is not None})
    with _user_error(f"--weights {cfg.weights}: key 'config': "):
        nformer = nk.NFormer(**{**config, "knn_precision": cfg.knn_precision})
    load_weights(nformer, state, cfg.weights, "--weights")
    return nformer


def _features_outputs(cfg):
    outputs = ["results.json", "cmc.png", "refined_features.pt"]
    return outputs + (["nformer.pth", "loss.png", "stage2_last.pth"] if cfg.train else [])


def features(cfg):
    from nformer_reid.data import load_features
    from nformer_reid.engine import compare, save_checkpoint, train_nformer
    from nformer_reid.plotting import plot_losses

    if sum(bool(a) for a in (cfg.train, cfg.weights, cfg.official)) != 1:
        raise ReIDInputError("give exactly one of --train (train a new NFormer), --weights or --official")
    device = _device(cfg)
    inputs = _input_files(cfg, ("query", "gallery", "train", "weights", "official"))
    query, gallery = load_features(cfg.query, "--query"), load_features(cfg.gallery, "--gallery")
    train = load_features(cfg.train, "--train", need_camids=False) if cfg.train else None
    dim = query.feats.shape[1]
    if gallery.feats.shape[1] != dim:
        raise ReIDInputError(f"--query {cfg.query} features are {dim}-d, --gallery {cfg.gallery} "
                             f"{gallery.feats.shape[1]}-d")
    if train is not None:
        if train.feats.shape[1] != dim:
            raise ReIDInputError(f"--train {cfg.train} features are {train.feats.shape[1]}-d, --query {dim}-d")
        if train.feats.shape[0] < 2:
            raise ReIDInputError(f"--train {cfg.train}: training needs at least 2 features, got {train.feats.shape[0]}")
        labels = torch.unique(train.pids, return_inverse=True)[1]  # any pid values -> 0..C-1
        config = dict(dim=dim, depth=cfg.nformer_depth or OFFICIAL_DEPTH,
                      num_landmarks=cfg.nformer_landmarks or OFFICIAL_LANDMARKS, topk=cfg.nformer_topk or OFFICIAL_TOPK,
                      num_classes=int(labels.max()) + 1)
        with _user_error(f"--train {cfg.train} ({dim}-d features): "):
            nformer = nk.NFormer(**config, knn_precision=cfg.knn_precision)
    else:
        nformer = _load_nformer(cfg)
    if nformer.dim != dim:
        raise ReIDInputError(f"the NFormer of {cfg.weights or cfg.official} is {nformer.dim}-d but the features of "
                             f"--query {cfg.query} are {dim}-d")
    _check_test_split(cfg, query.pids, gallery.pids, query.camids, gallery.camids,
                      f"--query {cfg.query} / --gallery {cfg.gallery}", nformer.topk)
    _start_run(cfg, _features_outputs(cfg), inputs)
    if train is not None:
        history = train_nformer(nformer, train.feats, labels, out_dir=cfg.out, steps=cfg.nformer_steps,
                                seq_len=cfg.seq_len, batch_size=cfg.nformer_batch, lr=cfg.nformer_lr, amp=cfg.amp,
                                device=device, seed=cfg.seed)
        plot_losses({"NFormer": history}, os.path.join(cfg.out, "loss.png"))
        path = save_checkpoint(os.path.join(cfg.out, "nformer.pth"), nformer, stage=2, epoch=0, history=history,
                               extra={"step": len(history)}, config=config)
        logger.info("saved %s (reuse it with --weights)", path)
    comparison = compare(query.feats, gallery.feats, (query.pids, gallery.pids, query.camids, gallery.camids),
                         nformer=nformer, modes=(cfg.mode,), rerank=cfg.rerank, baseline="input features",
                         title=f"{dim}-d precomputed features", out_dir=cfg.out, seed=cfg.seed, device=device,
                         knn_precision=cfg.knn_precision)
    qn, gn = comparison.refined[cfg.mode]
    save_torch({"query": qn, "gallery": gn}, os.path.join(cfg.out, "refined_features.pt"))
    logger.info("wrote %s", os.path.join(cfg.out, "refined_features.pt"))
    return comparison.results


def demo(cfg):
    from nformer_reid.demo import run_demo

    _device(cfg)
    _start_run(cfg, ["results.json", "cmc.png", "loss.png", "stage2_last.pth"], {})
    return run_demo(cfg)


def datasets(cfg):
    from nformer_reid.data import DATASETS, DatasetLayoutError, Market1501, build_dataset, make_synthetic_market

    if cfg.name == "synthetic":
        make_synthetic_market(cfg.root)
        print(Market1501(cfg.root, verbose=False).statistics_table())
        return
    _check_folder(cfg.root)
    names = [cfg.name] if cfg.name else list(DATASETS)
    found = 0
    for name in names:
        try:
            print(build_dataset(name, cfg.root, verbose=False).statistics_table())
            found += 1
        except DatasetLayoutError:
            if cfg.name:
                raise
    if not found:
        raise ReIDInputError(f"no known dataset layout under {cfg.root!r} (looked for {', '.join(DATASETS)}); try "
                             "--name <dataset> for the expected layout")


RUNNERS = {"train": train, "eval": evaluate, "features": features, "demo": demo, "datasets": datasets}
