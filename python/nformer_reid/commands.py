"""What each nformer-reid command does, given its config dataclass (nformer_reid.config).

Every command first checks everything it can without writing (options that go together, input
files readable and of the right layout, the device present, the dataset parsed, the output
folder free to write: `_start_run`), then works. A user error is a ReIDInputError naming the
file or option; the CLI prints it as one line (exit 2).

Imports are inside the commands so that each pulls in only what it needs: train and eval the
image pipeline (torchvision), features / refine / rerank / demo / datasets not. Each runner takes
the config and an Invocation (argv and --config file: results.json's "command", an input never
overwritten); a run with an --out folder ends by writing its effective options to config.yaml.

refine and features also run under torchrun with --distributed (`_process_group`): every rank
runs the command on its contiguous share of the rows, each check is agreed on by all ranks
before anything else is communicated (`_agree`: a failure on one rank fails every rank, none is
left waiting), rank 0 alone writes the outputs, and the numbers are the single process's.
"""
import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch

import nformer_kernels as nk
from nformer_reid.config import config_values
from nformer_reid.utils.checks import as_device
from nformer_reid.utils.errors import RankLost, ReIDInputError, is_transport_failure, one_line
from nformer_reid.utils.io import (OutputLock, OutputManifest, atomic_write, check_input_file, check_outputs,
                                   load_torch, save_torch)
from nformer_reid.utils.logging import setup_logging

logger = logging.getLogger(__name__)
OFFICIAL_TOPK, OFFICIAL_LANDMARKS, OFFICIAL_DEPTH = 20, 5, 4  # nk.NFormer / official release defaults
NFORMER_DIM = 256  # the NFormer width `features --train` builds (wider features are projected to it)
FEATURE_SUFFIXES = (".pt", ".pth", ".npz", ".npy")


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How a command was started: its argv (results.json's "command") and the --config file it
    read (an input: never overwritten by the run's config.yaml)."""
    argv: Tuple[str, ...] = ()
    config_file: Optional[str] = None
    distributed: Optional[Dict[str, object]] = None  # {"processes": P, "backend": ...} of a torchrun run

    def run_info(self, cfg) -> dict:
        info = {"config": config_values(cfg), "command": list(self.argv)}
        if self.distributed:
            info["distributed"] = dict(self.distributed)
        return info


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
        raise ReIDInputError(prefix + one_line(exc)) from exc


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


# --out folder -> the outputs its run (started by _start_run in this process) writes.
_RUN_OUTPUTS: Dict[str, list] = {}


def _one_run(command):
    """A command function: the output locks it takes are released when it returns or fails."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with OutputLock.scope():
            return command(*args, **kwargs)
    return run


def _start_run(cfg, outputs: Iterable[str], inputs: Dict[str, Optional[str]], invocation: Invocation) -> None:
    """The last check before any write (check_outputs, config.yaml included; the --config file is
    an input), then create --out, take its lock (one run per folder: a run started meanwhile is
    refused, and the check is repeated under the lock) and log to <out>/log.txt. `_finish_run`
    writes config.yaml."""
    inputs = {**inputs, "--config": invocation.config_file}
    names = [*outputs, "config.yaml"]
    check_outputs(cfg.out, names, inputs, cfg.overwrite)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        raise ReIDInputError(f"--out {cfg.out}: cannot create the folder: {exc.strerror or exc}") from None
    OutputLock.of_folder(cfg.out).acquire()
    check_outputs(cfg.out, names, inputs, cfg.overwrite)  # a run that ended meanwhile left its files
    _RUN_OUTPUTS[os.path.abspath(cfg.out)] = [*names, "log.txt"]
    setup_logging(os.path.join(cfg.out, "log.txt"))


def _finish_run(cfg) -> None:
    """The effective options to <out>/config.yaml (rerun with --config <out>/config.yaml), written
    when the run has succeeded, so a failed run leaves no config.yaml to block its rerun (log.txt
    has the options from the start). With --overwrite, the files an earlier run wrote here that
    this run did not rewrite are removed (OutputManifest), so the folder holds one run's results."""
    path = write_config(cfg, os.path.join(cfg.out, "config.yaml"))
    logger.info("wrote %s (rerun: nformer-reid %s --config %s out=<new folder>)", path, cfg.command, path)
    removed = OutputManifest(cfg.out).finish(_RUN_OUTPUTS.pop(os.path.abspath(cfg.out), []), cfg.overwrite)
    if removed:
        logger.info("--overwrite: removed %s, written by the earlier run in %s and not by this one",
                    ", ".join(removed), cfg.out)


def write_config(cfg, path: str) -> str:
    """The effective options of `cfg` (config_values) as a YAML file that --config reads back."""
    import yaml

    text = (f"# nformer-reid {cfg.command}: the effective options of a run (defaults, --config, options, "
            f"KEY=VALUE).\n# Rerun: nformer-reid {cfg.command} --config {path} out=<new folder>\n")
    text += yaml.safe_dump(config_values(cfg), sort_keys=False, default_flow_style=False)
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path


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
        raise ReIDInputError(f"{where}: no query has a valid match in the gallery (same pid in another camera): "
                             "check the pids / camids")
    if getattr(cfg, "mode", None) == "paper":
        with _user_error(f"{where}: "):
            check_paper_mode(topk, len(q_pids), len(g_pids), "--nformer-topk")
    if getattr(cfg, "rerank", False):
        _check_rerank_bounds(cfg, len(q_pids), len(g_pids), where)


def _check_rerank_bounds(cfg, num_q: int, num_g: int, where: str) -> None:
    """Before any work: re-ranking's neighbour counts fit the query + gallery features."""
    if max(cfg.rerank_k1 + 1, cfg.rerank_k2) > num_q + num_g:
        raise ReIDInputError(f"--rerank-k1 {cfg.rerank_k1} + 1 and --rerank-k2 {cfg.rerank_k2} must not exceed the "
                             f"{num_q + num_g} query + gallery features of {where}")


def _check_dataset_split(cfg, dataset, topk: int) -> None:
    def ids(items, i):
        return torch.tensor([x[i] for x in items], dtype=torch.long)

    _check_test_split(cfg, ids(dataset.query, 1), ids(dataset.gallery, 1), ids(dataset.query, 2),
                      ids(dataset.gallery, 2), f"{dataset.name} (--root {dataset.root})", topk)


def _evaluate_model(cfg, model, dataset, device, invocation: Invocation, timings: Optional[dict] = None):
    from nformer_reid.data.loader import build_test_loader
    from nformer_reid.engine import RerankParams, compare, extract_features

    started = time.perf_counter()
    feats = [extract_features(model.backbone, build_test_loader(items, cfg.size, cfg.test_batch, cfg.workers),
                              cfg.flip, device, cfg.amp) for items in (dataset.query, dataset.gallery)]
    timings = {**(timings or {}), "features": round(time.perf_counter() - started, 4)}
    (qf, q_pids, q_cams), (gf, g_pids, g_cams) = feats
    visrank = getattr(cfg, "visrank", None)
    comparison = compare(qf, gf, (q_pids, g_pids, q_cams, g_cams),
                         nformer=None if cfg.mode == "none" else model.nformer, knn_precision=cfg.knn_precision,
                         modes=("official" if cfg.mode == "none" else cfg.mode,), rerank=cfg.rerank,
                         rerank_params=RerankParams.of(cfg), baseline="backbone", title=dataset.name,
                         out_dir=cfg.out, seed=cfg.seed, device=device, timings=timings,
                         run_info=invocation.run_info(cfg))
    if visrank:
        from nformer_reid.engine.evaluation import write_results
        from nformer_reid.visualize import visualize_ranked_features

        started = time.perf_counter()
        methods = {"backbone": (qf, gf), **{f"NFormer ({mode})": pair for mode, pair in comparison.refined.items()}}
        folder = os.path.join(cfg.out, VISRANK_DIR)
        with _user_error("--visrank: "):
            paths = visualize_ranked_features(methods, dataset.query, dataset.gallery, folder, topk=visrank)
        comparison.timings["visrank"] = round(time.perf_counter() - started, 4)
        logger.info("wrote %d ranked-list pictures (top %d, %s) under %s", len(paths), visrank,
                    " / ".join(methods), folder)
        # results.json again, now with the pictures' time (written first: a failed drawing loses no score)
        write_results(cfg.out, comparison.results, title=dataset.name, device=device, timings=comparison.timings,
                      run_info=invocation.run_info(cfg))
    return comparison.results


VISRANK_DIR = "visrank"


def _check_visrank(cfg, dataset) -> None:
    """--visrank K: K gallery images exist, Pillow is installed, and <out>/visrank holds no earlier
    pictures (unless --overwrite; a file of that name is refused)."""
    if not getattr(cfg, "visrank", None):
        return
    from nformer_reid.utils.deps import INSTALL_HINT, MissingDependency

    if cfg.visrank > len(dataset.gallery):
        raise ReIDInputError(f"--visrank {cfg.visrank} exceeds the {len(dataset.gallery)} gallery images of "
                             f"{dataset.name}")
    try:
        import PIL  # noqa: F401  (what the pictures are drawn with)
    except ImportError:
        raise MissingDependency(f"--visrank: Pillow is not installed; the ranked-list pictures need it: {INSTALL_HINT} "
                                "(or: pip install pillow)") from None
    folder = os.path.join(os.path.expanduser(cfg.out), VISRANK_DIR)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ReIDInputError(f"--out {cfg.out}: {VISRANK_DIR} is a file, but --visrank writes a folder of that name")
    if os.path.isdir(folder) and os.listdir(folder) and not cfg.overwrite:
        raise ReIDInputError(f"--out {cfg.out} already holds {VISRANK_DIR}/ pictures from an earlier run; pass "
                             "--overwrite to replace them, or choose another --out")


MODEL_FLAGS = {"num_classes": "the dataset's train identities", "arch": "--arch", "feat_dim": "--feat-dim",
               "nformer_depth": "--nformer-depth"}


def _train_outputs(cfg):
    """model_final.pth always; the resumable stage*_last.pth only with --save-model / --checkpoint-every."""
    outputs = ["model_final.pth", "loss.png"]
    outputs += ["stage1_last.pth"] if cfg.save_last and cfg.stage in ("1", "both") else []
    outputs += ["stage2_last.pth"] if cfg.save_last and cfg.stage in ("2", "both") else []
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


@_one_run
def train(cfg, invocation: Invocation = Invocation()):
    """`nformer-reid train`: stage 1 (backbone) and / or stage 2 (NFormer), then optionally the
    evaluation. With --distributed (under torchrun) both stages train with DistributedDataParallel
    on the single process's global batches (engine.ddp: each rank loads its share of every PK
    batch and of every batch of sequences), every check agreed by all ranks before any work; rank
    0 alone writes the outputs and checkpoints, and evaluates (--eval) once the others have ended
    (a failure there is rank 0's exit status, which torchrun reports)."""
    if cfg.distributed:
        with _process_group(cfg) as ranks:
            return _train(cfg, invocation, ranks)
    return _train(cfg, invocation, None)


def _train(cfg, invocation: Invocation, ranks: Optional["_Ranks"]):
    from nformer_reid.utils.deps import import_torchvision

    import_torchvision()
    from nformer_reid.data import Market1501, make_synthetic_market
    from nformer_reid.data.loader import build_test_loader, build_train_loader
    from nformer_reid.engine import extract_features, save_checkpoint, train_backbone, train_nformer
    from nformer_reid.engine.checkpoints import check_architecture, load_weights, read_checkpoint
    from nformer_reid.model import ReIDModel
    from nformer_reid.plotting import plot_losses

    def everywhere(step):  # a check run by every rank: its failure on one rank fails all of them
        return step() if ranks is None else _agree(step, ranks)

    def main_only(step):  # rank 0 writes; its failure fails every rank
        return step() if ranks is None else _main_only(step, ranks)

    def check_inputs():
        device = ranks.device if ranks is not None else _device(cfg)
        inputs = _input_files(cfg, ("pretrained", "weights", "resume"))
        _check_root(cfg)
        if ranks is not None:
            _check_world_split(cfg, ranks.size)
        weights = read_checkpoint(cfg.weights, "--weights") if cfg.weights else None
        if weights is not None and weights["kind"] != "ReIDModel":
            raise ReIDInputError(f"--weights {cfg.weights} holds a bare NFormer (of 'nformer-reid features'), not a "
                                 "Re-ID model")
        resume = _check_resume(cfg, None) if cfg.resume and cfg.stage == "1" else None
        return device, inputs, weights, resume, _parse_dataset(cfg)

    device, inputs, weights, resume, dataset = everywhere(check_inputs)

    def prepare():
        """Dataset-dependent checks, then the model (--pretrained, --weights and --resume checked against it)."""
        _check_train_dataset(cfg, dataset)
        state = _check_resume(cfg, len(dataset.train)) if cfg.resume and cfg.stage == "2" else resume
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
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

    model = everywhere(prepare) if dataset is not None else None  # a real dataset: everything checked before any write
    main_only(lambda: _start_run(cfg, _train_outputs(cfg), inputs, invocation))
    logger.info("nformer-reid train %s", dataclasses.asdict(cfg))
    if dataset is None:  # synthetic: generated under --out (or --root) first, by rank 0
        root = cfg.root or os.path.join(cfg.out, "synthetic_market")
        main_only(lambda: make_synthetic_market(root, size=cfg.size, seed=cfg.seed))

        def read_synthetic():
            nonlocal dataset
            dataset = Market1501(root)
            return prepare()

        model = everywhere(read_synthetic)
    histories, timings = {}, {}
    started = time.perf_counter()
    if cfg.stage in ("1", "both"):  # under a process group each rank's loader yields its share of each batch
        loader = build_train_loader(dataset.train, cfg.size, cfg.batch_size, cfg.num_instances, cfg.workers, cfg.seed)
        histories["stage 1"] = train_backbone(
            model, loader, dataset.num_train_pids, out_dir=cfg.out, epochs=cfg.epochs, max_steps=cfg.max_steps,
            lr=cfg.lr, milestones=cfg.milestones, warmup_epochs=cfg.warmup_epochs, amp=cfg.amp, device=device,
            resume=cfg.resume if cfg.stage == "1" else None, save_last=cfg.save_last,
            **({"checkpoint_period": cfg.checkpoint_every} if cfg.checkpoint_every else {}))
        timings["training stage 1"] = round(time.perf_counter() - started, 4)
    if cfg.stage == "2" and not (cfg.weights or cfg.resume):
        logger.warning("--stage 2 without --weights trains the NFormer on features of an untrained backbone")
    if cfg.stage in ("2", "both"):
        started = time.perf_counter()
        loader = build_test_loader(dataset.train, cfg.size, cfg.test_batch, cfg.workers)
        feats, pids, _ = extract_features(model.backbone, loader, False, device, cfg.amp)
        histories["stage 2"] = train_nformer(
            model, feats, pids, out_dir=cfg.out, epochs=cfg.nformer_epochs, steps=cfg.nformer_steps,
            seq_len=cfg.seq_len, batch_size=cfg.nformer_batch, lr=cfg.nformer_lr, amp=cfg.amp, device=device,
            seed=cfg.seed, resume=cfg.resume if cfg.stage == "2" else None, save_last=cfg.save_last)
        timings["training stage 2"] = round(time.perf_counter() - started, 4)

    def save():
        final = save_checkpoint(os.path.join(cfg.out, "model_final.pth"), model, stage=2 if cfg.stage != "1" else 1,
                                epoch=cfg.epochs)
        plot_losses(histories, os.path.join(cfg.out, "loss.png"))
        logger.info("saved %s and %s", final, os.path.join(cfg.out, "loss.png"))

    main_only(save)
    if ranks is not None and not ranks.main:
        # The evaluation is rank 0's alone and communicates nothing: the other ranks end here
        # rather than wait for it in a collective (which --dist-timeout would cut short).
        return histories
    if cfg.eval:
        info = invocation if ranks is None else dataclasses.replace(invocation, distributed=ranks.describe())
        _evaluate_model(cfg, model, dataset, device, info, timings)
    _finish_run(cfg)
    return histories


def _check_world_split(cfg, world: int) -> None:
    """Each global batch splits evenly over the ranks: the identities of a PK batch (stage 1) and
    the sequences of a stage-2 batch."""
    if cfg.stage in ("1", "both") and (cfg.batch_size // cfg.num_instances) % world:
        raise ReIDInputError(f"--batch-size {cfg.batch_size} / --num-instances {cfg.num_instances} = "
                             f"{cfg.batch_size // cfg.num_instances} identities per batch must be a multiple of the "
                             f"{world} processes (each takes an equal share of every batch)")
    if cfg.stage in ("2", "both") and cfg.nformer_batch % world:
        raise ReIDInputError(f"--nformer-batch {cfg.nformer_batch} must be a multiple of the {world} processes (each "
                             "trains on an equal share of every batch of sequences)")


@_one_run
def evaluate(cfg, invocation: Invocation = Invocation()):
    if bool(cfg.weights) == bool(cfg.official):
        raise ReIDInputError("give exactly one of --weights (ours) or --official (nformer_model.pth)")
    from nformer_reid.utils.deps import import_torchvision

    import_torchvision()
    from nformer_reid.engine import load_model
    from nformer_reid.model import load_official_checkpoint

    device = _device(cfg)
    if cfg.nformer_depth is not None and not cfg.official:
        raise ReIDInputError("--nformer-depth is the block count of --official; a --weights checkpoint records its own")
    inputs = _input_files(cfg, ("weights", "official"))
    _check_root(cfg)
    if cfg.official:
        model = load_official_checkpoint(cfg.official, knn_precision=cfg.knn_precision,
                                         depth=cfg.nformer_depth or OFFICIAL_DEPTH)
        logger.info("loaded the official release %s (ResNet-50 without stem ReLU, as the official code)", cfg.official)
    else:
        model = load_model(cfg.weights, "ReIDModel", "--weights", knn_precision=cfg.knn_precision)
    topk = model.nformer.topk
    dataset = _parse_dataset(cfg)
    if dataset is not None:
        _check_dataset_split(cfg, dataset, topk)
        _check_visrank(cfg, dataset)
    _start_run(cfg, ["cmc.png", "results.json"], inputs, invocation)
    if dataset is None:
        dataset = _synthetic_dataset(cfg)
        _check_dataset_split(cfg, dataset, topk)
        _check_visrank(cfg, dataset)
    results = _evaluate_model(cfg, model, dataset, device, invocation)
    _finish_run(cfg)
    return results


def _load_nformer(cfg):
    """The NFormer of --official or --weights; a width / depth given with --nformer-dim /
    --nformer-depth must match the file's, --nformer-topk / --nformer-landmarks (not stored in
    the weights) apply as given."""
    from nformer_reid.engine.checkpoints import load_weights, read_checkpoint

    if cfg.official:
        state = load_torch(cfg.official, "--official")
        if not isinstance(state, dict):
            raise ReIDInputError(f"--official {cfg.official}: expected a state dict, got {type(state).__name__}")
        with _user_error(f"--official {cfg.official}: "):
            return nk.NFormer.from_official(state, dim=cfg.nformer_dim, depth=cfg.nformer_depth or OFFICIAL_DEPTH,
                                            num_landmarks=cfg.nformer_landmarks or OFFICIAL_LANDMARKS,
                                            topk=cfg.nformer_topk or OFFICIAL_TOPK, knn_precision=cfg.knn_precision)
    not_ours = (f"--weights {cfg.weights} is not an NFormer saved by 'nformer-reid features --train' (nformer.pth; "
                "use --official for nformer_model.pth)")
    try:
        state = read_checkpoint(cfg.weights, "--weights")
    except ReIDInputError as exc:
        if "is not an nformer-reid checkpoint" not in str(exc):
            raise
        raise ReIDInputError(not_ours) from exc
    if state["kind"] != "NFormer" or not state.get("config"):
        raise ReIDInputError(not_ours)
    config = dict(state["config"])
    for option, key in (("nformer_depth", "depth"), ("nformer_dim", "dim")):
        asked = getattr(cfg, option)
        if asked is not None and config.get(key) != asked:
            raise ReIDInputError(f"--weights {cfg.weights} holds an NFormer of {key} {config.get(key)}, but "
                                 f"{_flag(option)} {asked} was asked for")
    config.update({k: v for k, v in (("topk", cfg.nformer_topk), ("num_landmarks", cfg.nformer_landmarks))
                   if v is not None})
    with _user_error(f"--weights {cfg.weights}: key 'config': "):
        nformer = nk.NFormer(**{**config, "knn_precision": cfg.knn_precision})
    load_weights(nformer, state, cfg.weights, "--weights")
    return nformer


def _check_width(nformer, dim: int, source: str, what: str) -> None:
    """The NFormer takes features of width `dim` (its in_dim: the width before its input projection)."""
    in_dim = getattr(nformer, "in_dim", nformer.dim)
    if in_dim != dim:
        raise ReIDInputError(f"the NFormer of {source} takes {in_dim}-d features but {what} are {dim}-d")


def _load_query_gallery(cfg, labels: bool):
    """(query, gallery, where) of --features or --query / --gallery (FeatureSets), widths checked;
    labels=False reads files without pids / camids too."""
    from nformer_reid.data import load_features, load_query_gallery

    if cfg.features:
        if labels:
            query, gallery = load_query_gallery(cfg.features, "--features")
        else:
            query, gallery = load_query_gallery(cfg.features, "--features", need_pids=False, need_camids=False)
        where = f"--features {cfg.features}"
        names = ("its query", "its gallery")
    else:
        query = load_features(cfg.query, "--query", need_pids=labels, need_camids=labels)
        gallery = load_features(cfg.gallery, "--gallery", need_pids=labels, need_camids=labels)
        where = f"--query {cfg.query} / --gallery {cfg.gallery}"
        names = (f"--query {cfg.query}", f"--gallery {cfg.gallery}")
    if gallery.feats.shape[1] != query.feats.shape[1]:
        raise ReIDInputError(f"{names[0]} features are {query.feats.shape[1]}-d, {names[1]} "
                             f"{gallery.feats.shape[1]}-d")
    return query, gallery, where


def _features_outputs(cfg):
    """refined_features.pt, results.json, cmc.png; nformer.pth and loss.png with --train;
    stage2_last.pth only with --train --save-model."""
    outputs = ["results.json", "cmc.png", "refined_features.pt"]
    outputs += ["nformer.pth", "loss.png"] if cfg.train else []
    return outputs + (["stage2_last.pth"] if cfg.train and cfg.save_model else [])


def _new_nformer(cfg, dim: int, num_classes: int) -> Tuple[nk.NFormer, dict]:
    """The NFormer `features --train` trains on dim-wide features: --nformer-dim wide (default:
    NFORMER_DIM, or the features' width when narrower), with a learned input projection when the
    features are of another width."""
    width = cfg.nformer_dim if cfg.nformer_dim is not None else min(NFORMER_DIM, dim)
    config = dict(dim=width, depth=cfg.nformer_depth or OFFICIAL_DEPTH,
                  num_landmarks=cfg.nformer_landmarks or OFFICIAL_LANDMARKS, topk=cfg.nformer_topk or OFFICIAL_TOPK,
                  num_classes=num_classes)
    if width != dim:
        config["in_dim"] = dim
    with _user_error(f"--train {cfg.train} ({dim}-d features): "):
        nformer = nk.NFormer(**config, knn_precision=cfg.knn_precision)
    return nformer, dict(getattr(nformer, "config", config))


@_one_run
def features(cfg, invocation: Invocation = Invocation()):
    """`nformer-reid features`: NFormer on precomputed query / gallery features (trained on --train,
    or from --weights / --official), scored before and after; returns the results by method. With
    --distributed (under torchrun, --weights / --official) the joint query + gallery rows are
    sharded across the ranks (each reads the files whole and keeps its contiguous share), refined
    by nformer_kernels.distributed.nformer_forward and scored by evaluate_features_distributed:
    the single process's numbers; rank 0 writes the outputs."""
    from nformer_reid.data import FeatureSet, load_features, save_query_gallery
    from nformer_reid.engine import RerankParams, compare, save_checkpoint, train_nformer
    from nformer_reid.plotting import plot_losses

    if cfg.distributed:
        return _features_distributed(cfg, invocation)

    if sum(bool(a) for a in (cfg.train, cfg.weights, cfg.official)) != 1:
        raise ReIDInputError("give exactly one of --train (train a new NFormer), --weights or --official")
    device = _device(cfg)
    inputs = _input_files(cfg, ("query", "gallery", "features", "train", "weights", "official"))
    started = time.perf_counter()
    query, gallery, where = _load_query_gallery(cfg, labels=True)
    train = load_features(cfg.train, "--train", need_camids=False) if cfg.train else None
    timings = {"features": round(time.perf_counter() - started, 4)}
    dim = query.feats.shape[1]
    if train is not None:
        if train.feats.shape[1] != dim:
            raise ReIDInputError(f"--train {cfg.train} features are {train.feats.shape[1]}-d, {where} {dim}-d")
        if train.feats.shape[0] < 2:
            raise ReIDInputError(f"--train {cfg.train}: training needs at least 2 features, got {train.feats.shape[0]}")
        labels = torch.unique(train.pids, return_inverse=True)[1]  # any pid values -> 0..C-1
        nformer, config = _new_nformer(cfg, dim, int(labels.max()) + 1)
        logger.info("NFormer: %d-d features%s, %.1fM parameters", dim,
                    f" projected to {nformer.dim}-d" if nformer.dim != dim else "",
                    sum(p.numel() for p in nformer.parameters()) / 1e6)
    else:
        nformer = _load_nformer(cfg)
    _check_width(nformer, dim, cfg.weights or cfg.official or f"--train {cfg.train}", where)
    _check_test_split(cfg, query.pids, gallery.pids, query.camids, gallery.camids, where, nformer.topk)
    _start_run(cfg, _features_outputs(cfg), inputs, invocation)
    if train is not None:
        started = time.perf_counter()
        history = train_nformer(nformer, train.feats, labels, out_dir=cfg.out, steps=cfg.nformer_steps,
                                seq_len=cfg.seq_len, batch_size=cfg.nformer_batch, lr=cfg.nformer_lr, amp=cfg.amp,
                                device=device, seed=cfg.seed, save_last=cfg.save_model)
        timings["training"] = round(time.perf_counter() - started, 4)
        plot_losses({"NFormer": history}, os.path.join(cfg.out, "loss.png"))
        path = save_checkpoint(os.path.join(cfg.out, "nformer.pth"), nformer, stage=2, epoch=0, history=history,
                               extra={"step": len(history)}, config=config)
        logger.info("saved %s (reuse it with --weights)", path)
    comparison = compare(query.feats, gallery.feats, (query.pids, gallery.pids, query.camids, gallery.camids),
                         nformer=nformer, modes=(cfg.mode,), rerank=cfg.rerank, rerank_params=RerankParams.of(cfg),
                         baseline="input features", title=f"{dim}-d precomputed features", out_dir=cfg.out,
                         seed=cfg.seed, device=device, knn_precision=cfg.knn_precision, timings=timings,
                         run_info=invocation.run_info(cfg))
    qn, gn = comparison.refined[cfg.mode]
    path = os.path.join(cfg.out, "refined_features.pt")
    save_query_gallery(path, FeatureSet(qn, query.pids, query.camids), FeatureSet(gn, gallery.pids, gallery.camids))
    logger.info("wrote %s (query and gallery with their pids / camids: reload it with --features)", path)
    _finish_run(cfg)
    return comparison.results


def _gather_rows(rows: torch.Tensor, counts, ranks: "_Ranks") -> torch.Tensor:
    """Every rank's rows (counts[r] of them on rank r) in rank order, on every rank (CPU)."""
    import torch.distributed as dist

    width = max(counts)
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded, device=ranks.device) for _ in counts]
    dist.all_gather(parts, padded.to(ranks.device))
    return torch.cat([part[:n].cpu() for part, n in zip(parts, counts)])


def _features_distributed(cfg, invocation: Invocation):
    """`features --distributed`: the NFormer over the joint query + gallery rows and the scores,
    sharded across the torchrun ranks (see features)."""
    from nformer_reid.data import FeatureSet, save_query_gallery
    from nformer_reid.engine import format_result
    from nformer_reid.engine.evaluation import refine_shard, score_distributed, write_results

    if cfg.train:
        raise ReIDInputError("--train with --distributed: train the NFormer in one process first (nformer-reid features "
                             "--train ...), then refine and score with --weights <out>/nformer.pth --distributed")
    if cfg.rerank:
        raise ReIDInputError("--rerank with --distributed: k-reciprocal re-ranking needs every query and gallery "
                             "feature in one process; run --rerank without --distributed")
    if sum(bool(a) for a in (cfg.weights, cfg.official)) != 1:
        raise ReIDInputError("give exactly one of --weights or --official (with --distributed; --train runs in one "
                             "process)")
    with _process_group(cfg) as ranks:
        def prepare():  # every rank reads the files whole and keeps its share of the rows
            inputs = _input_files(cfg, ("query", "gallery", "features", "weights", "official"))
            started = time.perf_counter()
            query, gallery, where = _load_query_gallery(cfg, labels=True)
            seconds = time.perf_counter() - started
            nformer = _load_nformer(cfg)
            _check_width(nformer, query.feats.shape[1], cfg.weights or cfg.official, where)
            _check_test_split(cfg, query.pids, gallery.pids, query.camids, gallery.camids, where, nformer.topk)
            return inputs, query, gallery, nformer, seconds

        inputs, query, gallery, nformer, seconds = _agree(prepare, ranks)
        timings = {"features": round(seconds, 4)}
        _main_only(lambda: _start_run(cfg, _features_outputs(cfg), inputs, invocation), ranks)
        num_q, num_g, dim = query.feats.shape[0], gallery.feats.shape[0], query.feats.shape[1]
        # One split of the joint query + gallery rows: the rows of rank r are contiguous in it, so
        # its queries and its gallery rows are contiguous blocks in rank order too, as
        # evaluate_features_distributed takes them.
        start, stop = ranks.rows(num_q + num_g)
        q_rows, g_rows = slice(min(start, num_q), min(stop, num_q)), slice(max(start, num_q) - num_q,
                                                                            max(stop, num_q) - num_q)
        joint = torch.cat([query.feats[q_rows], gallery.feats[g_rows]])
        mask = None
        if cfg.mode == "paper":
            mask = torch.arange(start, stop) < num_q
        ids = [t.to(ranks.device) for t in (query.pids[q_rows], gallery.pids[g_rows], query.camids[q_rows],
                                            gallery.camids[g_rows])]
        clock = time.perf_counter()
        results = {"input features": score_distributed(query.feats[q_rows].to(ranks.device),
                                                       gallery.feats[g_rows].to(ranks.device), *ids)}
        evaluation = time.perf_counter() - clock
        clock = time.perf_counter()
        with _user_error(f"--mode {cfg.mode}: "):
            refined = refine_shard(nformer, joint, seed=cfg.seed, device=ranks.device, query_mask=mask)
        timings["refinement"] = {cfg.mode: round(time.perf_counter() - clock, 4)}
        logger.info("NFormer (%s) refined %d features on %d processes (%s) in %.1f s", cfg.mode, num_q + num_g,
                    ranks.size, ranks.device.type, timings["refinement"][cfg.mode])
        local_q = q_rows.stop - q_rows.start
        clock = time.perf_counter()
        results[f"NFormer ({cfg.mode})"] = score_distributed(refined[:local_q].to(ranks.device),
                                                             refined[local_q:].to(ranks.device), *ids)
        timings["evaluation"] = round(evaluation + time.perf_counter() - clock, 4)
        counts = [b - a for a, b in (_Ranks(r, ranks.size, ranks.device).rows(num_q + num_g)
                                     for r in range(ranks.size))]
        everything = _gather_rows(refined, counts, ranks)
        title = f"{dim}-d precomputed features"
        run_info = dataclasses.replace(invocation, distributed=ranks.describe()).run_info(cfg)

        def write():
            logger.info("results on %s (%d query / %d gallery, %d processes):", title, num_q, num_g, ranks.size)
            for name, res in results.items():
                logger.info("  %s", format_result(name, res))
            write_results(cfg.out, results, title=title, device=ranks.device, timings=timings, run_info=run_info)
            path = os.path.join(cfg.out, "refined_features.pt")
            save_query_gallery(path, FeatureSet(everything[:num_q], query.pids, query.camids),
                               FeatureSet(everything[num_q:], gallery.pids, gallery.camids))
            logger.info("wrote %s (query and gallery with their pids / camids: reload it with --features)", path)
            _finish_run(cfg)

        _main_only(write, ranks)
        return results


def _check_output_files(outputs: Dict[str, Optional[str]], inputs: Dict[str, Optional[str]], overwrite: bool) -> None:
    """For runs that write named files (not an --out folder): each output ({option: path}) is no
    folder, under a folder that can be created, not one of the inputs ({option: path}: refused even
    with --overwrite), not another output, and new unless overwrite."""
    seen = {}
    for option, path in outputs.items():
        if not path:
            continue
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            raise ReIDInputError(f"{option} {path} is a folder; name the file to write")
        probe = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise ReIDInputError(f"{option} {path}: cannot create files under {probe}")
        real = os.path.realpath(path)
        if real in seen:
            raise ReIDInputError(f"{seen[real]} and {option} name the same file {path}")
        seen[real] = option
        for flag, given in inputs.items():
            if given and os.path.exists(path) and os.path.samefile(path, given):
                raise ReIDInputError(f"{option} {path} is the input {flag} {given}; write to another file (inputs "
                                     "are never overwritten)")
        if os.path.exists(path) and not overwrite:
            raise ReIDInputError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another "
                                 "file")


def _claim_output_files(outputs: Dict[str, Optional[str]], inputs: Dict[str, Optional[str]], overwrite: bool) -> None:
    """_check_output_files, then each output's lock (OutputLock.beside: one run per file; a run
    started meanwhile is refused) and the check again under the locks."""
    _check_output_files(outputs, inputs, overwrite)
    for option, path in outputs.items():
        if path:
            OutputLock.beside(os.path.expanduser(path), option).acquire()  # creating its folder
    _check_output_files(outputs, inputs, overwrite)


def _check_suffix(option: str, path: Optional[str], suffixes) -> None:
    if path and not str(path).lower().endswith(tuple(suffixes)):
        raise ReIDInputError(f"{option} {path}: the file name must end in {' / '.join(suffixes)} (the format is "
                             "chosen by it)")


def _save_array(path: str, array) -> str:
    """A numpy .npy file, or torch.save of a tensor for any other suffix, atomically."""
    if str(path).lower().endswith(".npy"):
        with atomic_write(path) as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)
        return path
    return save_torch(torch.as_tensor(array), path)


@_one_run
def refine_command(cfg, invocation: Invocation = Invocation()):
    """`nformer-reid refine`: one set of features through an NFormer, no labels needed. With
    --distributed (under torchrun) each rank refines its contiguous share of the rows and writes
    them into the one .npy --output (the single process's result); returns this rank's rows."""
    from nformer_reid.data import FeatureSet, load_features, save_features
    from nformer_reid.engine import refine

    if cfg.distributed:
        return _refine_distributed(cfg, invocation)

    _check_suffix("--output", cfg.output, FEATURE_SUFFIXES)
    _check_suffix("--save-neighbors", cfg.save_neighbors, (".npy", ".pt", ".pth"))
    device = _device(cfg)
    inputs = {**_input_files(cfg, ("input", "weights", "official")), "--config": invocation.config_file}
    outputs = {"--output": cfg.output, "--save-neighbors": cfg.save_neighbors}
    _claim_output_files(outputs, inputs, cfg.overwrite)
    feats = load_features(cfg.input, "--input", need_pids=False, need_camids=False)
    nformer = _load_nformer(cfg)
    _check_width(nformer, feats.feats.shape[1], cfg.weights or cfg.official, f"the features of --input {cfg.input}")
    started = time.perf_counter()
    with _user_error(f"--input {cfg.input}: "):
        got = refine(nformer, feats.feats, seed=cfg.seed, device=device, neighbors=bool(cfg.save_neighbors))
    refined, neighbours = got if cfg.save_neighbors else (got, None)
    logger.info("NFormer refined %d features (%d-d -> %d-d) on %s in %.1f s", refined.shape[0], feats.feats.shape[1],
                refined.shape[1], device, time.perf_counter() - started)
    labelled = [name for name in ("pids", "camids") if getattr(feats, name) is not None]
    if str(cfg.output).lower().endswith(".npy"):  # features only
        if labelled:
            logger.warning("--output %s: .npy holds the features only; the %s of --input are not written (use .pt "
                           "or .npz to keep them)", cfg.output, " and ".join(labelled))
        save_features(cfg.output, FeatureSet(refined))
    else:
        save_features(cfg.output, FeatureSet(refined, feats.pids, feats.camids))
    logger.info("wrote %s", cfg.output)
    if neighbours is not None:
        _save_array(cfg.save_neighbors, neighbours.numpy())
        logger.info("wrote %s ((%d, %d) neighbour indices, self first)", cfg.save_neighbors, *neighbours.shape)
    return refined


# ------------------------------------------------------------------------------------------------ torchrun
DISTRIBUTED_COMMANDS = ("train", "features", "refine")  # the commands that take --distributed


def _launch_hint(command: str) -> str:
    return f"`torchrun --nproc-per-node P -m nformer_reid {command} --distributed ...`"


def _torchrun_env(command: str) -> Optional[Tuple[int, int, int]]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) when every variable torchrun sets is present, None when none
    is; ReIDInputError for a partial, non-integer or out-of-range environment."""
    from nformer_reid.engine.ddp import TORCHRUN_ENV

    present = [name for name in TORCHRUN_ENV if os.environ.get(name)]
    if not present:
        return None
    missing = [name for name in TORCHRUN_ENV if name not in present]
    if missing:
        raise ReIDInputError(f"torchrun's environment is incomplete ({', '.join(present)} set, {', '.join(missing)} "
                             f"not): launch with {_launch_hint(command)}")
    values = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values.append(int(os.environ[name]))
        except ValueError:
            raise ReIDInputError(f"environment variable {name}={os.environ[name]!r} is not an integer (torchrun "
                                 f"sets it): launch with {_launch_hint(command)}") from None
    rank, world, local_rank = values
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < world:
        raise ReIDInputError(f"torchrun's environment is out of range: RANK={rank}, LOCAL_RANK={local_rank}, "
                             f"WORLD_SIZE={world}")
    port = os.environ["MASTER_PORT"].strip()
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ReIDInputError(f"environment variable MASTER_PORT={os.environ['MASTER_PORT']!r} is not a TCP port "
                             f"(1-65535): launch with {_launch_hint(command)} (--master-port P)")
    return rank, world, local_rank


def check_launch(cfg) -> None:
    """How the command was started fits its options: --distributed needs torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); under torchrun with more than one
    process a command without --distributed is refused (every rank would run all of it and write
    the same files). A torchrun world of one without --distributed is the single process.
    ReIDInputError otherwise; the checks read only the environment, so every rank fails alike."""
    from nformer_reid.engine.ddp import TORCHRUN_ENV

    distributed = bool(getattr(cfg, "distributed", False))
    env = _torchrun_env(cfg.command)
    if distributed and env is None:
        raise ReIDInputError(f"--distributed: this process was not started by torchrun ({', '.join(TORCHRUN_ENV)} "
                             f"not set): launch with {_launch_hint(cfg.command)}")
    if env is not None and env[1] > 1 and not distributed:
        if cfg.command in DISTRIBUTED_COMMANDS:
            raise ReIDInputError(f"torchrun started {env[1]} processes but --distributed was not given: add "
                                 f"--distributed to shard {cfg.command} over them, or run it without torchrun")
        raise ReIDInputError(f"{cfg.command} runs in one process, but torchrun started {env[1]}: run it without "
                             f"torchrun (--distributed is an option of {', '.join(DISTRIBUTED_COMMANDS)})")


@dataclasses.dataclass(frozen=True)
class _Ranks:
    """This process's place in the torchrun world: rank, world size and the device it computes on."""
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> Dict[str, object]:
        """What results.json's "distributed" says of the world."""
        return {"processes": self.size, "backend": "nccl" if self.device.type == "cuda" else "gloo"}

    def rows(self, total: int) -> Tuple[int, int]:
        """This rank's contiguous share [start, stop) of `total` rows: in rank order, as even as
        possible (the first total % size ranks one row more; ranks beyond total rows get none)."""
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


@contextlib.contextmanager
def _process_group(cfg):
    """The torchrun world of a --distributed run: the default process group from torchrun's
    environment (engine.ddp.init_distributed: gloo for CPU ranks, NCCL for CUDA ones on
    cuda:LOCAL_RANK; --dist-timeout bounds its start and every collective), ranks other than 0
    logging WARNING and above to the console, the group destroyed at the end. A group already
    initialised (a caller's) is used, and left, if its rank and size are torchrun's."""
    import datetime

    from nformer_reid.engine import ddp

    check_launch(cfg)
    owned = not ddp.is_initialized()
    # its errors (a WORLD_SIZE the group disagrees with, ranks that never join within the timeout)
    # are ReIDInputErrors, raised before any collective
    device = ddp.init_distributed(cfg.device, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if not ddp.is_main_process():
        ddp.setup_rank_logging()
    try:
        ranks = _Ranks(ddp.rank(), ddp.world_size(), device)
        _check_same_launch(cfg, ranks)
        with rank_loss_is_one_error(ranks):
            yield ranks
    finally:
        if owned:
            ddp.shutdown()


@contextlib.contextmanager
def rank_loss_is_one_error(ranks: "_Ranks"):
    """A collective of the work (DDP's gradient all-reduce, the refinement ring) that fails because a
    peer is gone becomes one RankLost naming this rank, not torch's transport traceback."""
    try:
        yield
    except RankLost:
        raise
    except RuntimeError as exc:
        if not is_transport_failure(exc):
            raise
        raise RankLost(_lost_rank(ranks, _LOST_RANK, exc)) from None


def _file_fingerprint(path: str) -> str:
    """Size and a hash of the first and last 64 KiB: a stale or other copy of a file on another node
    differs (its rows, its width, its bytes) without reading it whole."""
    import hashlib

    try:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 16))
            if size > 1 << 16:
                fh.seek(max(1 << 16, size - (1 << 16)))
                digest.update(fh.read(1 << 16))
    except OSError as exc:  # never raises: the digest exchange is the first collective
        return f"unreadable ({exc.strerror or exc})"
    return f"{size} bytes, sha256 of its ends {digest.hexdigest()[:12]}"


def launch_digest(cfg) -> Dict[str, str]:
    """What every rank of a --distributed run must share: every option (the run policies included),
    the WORLD_SIZE torchrun gave, and a fingerprint of every file an option names."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    digest = {_flag(name): repr(value) for name, value in values.items()}
    digest["WORLD_SIZE"] = os.environ.get("WORLD_SIZE", "")
    for name, value in values.items():
        if isinstance(value, str) and value and os.path.isfile(os.path.expanduser(value)):
            digest[f"the file of {_flag(name)}"] = _file_fingerprint(os.path.expanduser(value))
    return digest


def _check_same_launch(cfg, ranks: "_Ranks") -> None:
    """Before any work: every rank was started alike (launch_digest), else every rank raises the same
    ReIDInputError naming what differs, rank by rank (a stale input copy on one node, an option given
    to one rank only)."""
    lost = (f"the other ranks did not answer within --dist-timeout {cfg.dist_timeout:g} s (were they all started "
            "with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT?)")
    _, digests = _agree_all(lambda: launch_digest(cfg), ranks, share=lambda digest: digest, lost=lost)
    differ = []
    for key in sorted(set().union(*digests)):
        seen = [d.get(key, "(not given)") for d in digests]
        if len(set(seen)) > 1:
            differ.append(f"{key} is " + ", ".join(f"{v} on rank {r}" for r, v in enumerate(seen)))
    if differ:
        raise ReIDInputError("the ranks were not started alike (every rank must get the same options and files): "
                             + "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else ""))


_LOST_RANK = "another rank stopped answering (it failed or was stopped: its own output says why)"


def _lost_rank(ranks: _Ranks, what: str, exc: BaseException) -> str:
    """The one line a rank prints when a collective failed because its peers are gone: who, what, why."""
    return f"rank {ranks.rank} of {ranks.size}: {what}: {one_line(exc)[:160]}"


def _agree_all(step, ranks: _Ranks, share=lambda result: None, lost: str = _LOST_RANK):
    """Run step() on every rank and compare the outcomes before anything else is communicated
    (nformer_kernels.distributed.gather_checked): when it raised on any rank, every rank raises
    (its own exception where it failed; elsewhere ReIDInputError "on rank r: ..." for a user error,
    RuntimeError for any other), so no rank is left waiting in a later collective. A rank that
    never answers (gone, or in another world) makes the collective fail after --dist-timeout: that
    is a ReIDInputError "rank r: <lost>: <why>" (unless this rank's own step failed: that error).
    Returns (this rank's result, [share(result) of every rank], pickled: keep it small)."""
    from nformer_kernels import distributed as nkd

    result, failure = None, None
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001  (re-raised below, once every rank knows)
        failure = exc
    mine = (("user" if isinstance(failure, ReIDInputError) else type(failure).__name__), one_line(failure)) \
        if failure is not None else None
    try:
        _, metas = nkd.gather_checked(lambda: (0, ranks.device, (mine, None if failure else share(result))))
    except RuntimeError as exc:  # the collective itself (DistError is one): the local check cannot raise
        if failure is not None:
            raise failure from None
        raise ReIDInputError(_lost_rank(ranks, lost, exc)) from None
    for r, (error, _) in enumerate(metas):
        if error is None:
            continue
        if failure is not None:
            raise failure
        kind, text = error
        if kind == "user":
            raise ReIDInputError(f"on rank {r}: {text}")
        raise RuntimeError(f"rank {r} failed ({kind}): {text}")
    return result, [m[1] for m in metas]


def _agree(step, ranks: _Ranks):
    """step() run on every rank, its failure on any rank raised on all (see _agree_all)."""
    return _agree_all(step, ranks)[0]


def _main_only(step, ranks: _Ranks):
    """step() on rank 0 (writing files), its failure raised on every rank; None elsewhere."""
    return _agree(step if ranks.main else (lambda: None), ranks)


def _write_rows_npy(path: str, rows: np.ndarray, total: int, start: int, ranks: _Ranks) -> str:
    """Every rank's rows into one .npy file of `total` rows, atomically: rank 0 creates it with its
    header (numpy.lib.format.open_memmap) under a temporary name beside `path`, every rank writes
    its rows [start, start + len(rows)) through a memory map and syncs them, and once all have,
    rank 0 renames it to `path`. A failure on any rank removes the temporary file on all of them,
    leaving `path` as it was. The folder must be one every rank sees (a shared filesystem)."""
    from nformer_reid.utils.io import publish, temporary_beside

    path = os.path.expanduser(os.fspath(path))
    shape, dtype = (total, *rows.shape[1:]), rows.dtype

    def create():
        fd, tmp = temporary_beside(path)
        os.close(fd)
        try:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise ReIDInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return tmp

    tmp = _agree_all(create if ranks.main else (lambda: None), ranks, share=lambda made: made)[1][0]

    def fill():
        if not os.path.isfile(tmp):
            raise ReIDInputError(f"cannot write {path}: rank 0's file {tmp} is not visible here (every rank must see "
                                 "the output's folder: a shared filesystem)")
        if rows.shape[0]:
            try:
                out = np.lib.format.open_memmap(tmp, mode="r+")
                out[start:start + rows.shape[0]] = rows
                out.flush()
                del out
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise ReIDInputError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def rename():
        try:
            publish(tmp, path)
        except OSError as exc:
            raise ReIDInputError(f"cannot write {path}: {exc.strerror or exc}") from exc

    try:
        _agree(fill, ranks)
        _main_only(rename, ranks)
    except BaseException:
        if ranks.main:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    return path


def _refine_distributed(cfg, invocation: Invocation):
    """`refine --distributed`: every rank refines its contiguous share of the rows (see refine_command)."""
    from nformer_reid.data import count_feature_rows, load_feature_rows, load_features
    from nformer_reid.engine.evaluation import refine_shard

    with _process_group(cfg) as ranks:
        def prepare():
            for option, path in (("--output", cfg.output), ("--save-neighbors", cfg.save_neighbors)):
                if path and not str(path).lower().endswith(".npy"):
                    raise ReIDInputError(f"{option} {path}: with --distributed the output is a .npy file (every rank "
                                         "writes its rows into it)")
            inputs = {**_input_files(cfg, ("input", "weights", "official")), "--config": invocation.config_file}
            claim = _claim_output_files if ranks.main else _check_output_files  # rank 0 holds the locks
            claim({"--output": cfg.output, "--save-neighbors": cfg.save_neighbors}, inputs, cfg.overwrite)
            if str(cfg.input).lower().endswith(".npy"):  # only this rank's rows, through a memory map
                total = count_feature_rows(cfg.input, "--input")
                start, stop = ranks.rows(total)
                part = load_feature_rows(cfg.input, start, stop, "--input") if stop > start else None
                shard = part.feats if part is not None else \
                    torch.empty((0, load_feature_rows(cfg.input, 0, 1, "--input").feats.shape[1]))
                labelled = []
            else:  # other formats are read whole on every rank, each keeping its share
                feats = load_features(cfg.input, "--input", need_pids=False, need_camids=False)
                total = feats.feats.shape[0]
                start, stop = ranks.rows(total)
                shard = feats.feats[start:stop]
                labelled = [name for name in ("pids", "camids") if getattr(feats, name) is not None]
            nformer = _load_nformer(cfg)
            _check_width(nformer, shard.shape[1], cfg.weights or cfg.official, f"the features of --input {cfg.input}")
            return shard, total, start, labelled, nformer

        shard, total, start, labelled, nformer = _agree(prepare, ranks)
        started = time.perf_counter()
        with _user_error(f"--input {cfg.input}: "):
            got = refine_shard(nformer, shard, seed=cfg.seed, device=ranks.device,
                               neighbors=bool(cfg.save_neighbors))
        refined, neighbours = got if cfg.save_neighbors else (got, None)
        logger.info("NFormer refined %d features (%d-d -> %d-d) on %d processes (%s) in %.1f s", total,
                    shard.shape[1], refined.shape[1], ranks.size, ranks.device.type, time.perf_counter() - started)
        if labelled:
            logger.warning("--output %s: .npy holds the features only; the %s of --input are not written",
                           cfg.output, " and ".join(labelled))
        _write_rows_npy(cfg.output, refined.numpy(), total, start, ranks)
        logger.info("wrote %s", cfg.output)
        if neighbours is not None:
            _write_rows_npy(cfg.save_neighbors, neighbours.numpy(), total, start, ranks)
            logger.info("wrote %s ((%d, %d) neighbour indices, global rows, self first)", cfg.save_neighbors, total,
                        neighbours.shape[1])
        return refined


def _rerank_outputs(cfg, labelled: bool):
    outputs = ["results.json", "cmc.png"] if labelled else []
    outputs += ["distmat.npy"] if cfg.save_distmat else []
    return outputs + (["ranks.npy"] if cfg.save_ranks else [])


def top_ranks(dist: np.ndarray, r: int, chunk: int = 1024) -> np.ndarray:
    """The r smallest-distance column indices of each row, nearest first, equal distances by
    index (a stable sort, as the evaluation ranks them): (Q, r) int64."""
    out = np.empty((dist.shape[0], r), dtype=np.int64)
    for start in range(0, dist.shape[0], chunk):
        out[start:start + chunk] = np.argsort(dist[start:start + chunk], axis=1, kind="stable")[:, :r]
    return out


@_one_run
def rerank_command(cfg, invocation: Invocation = Invocation()):
    """`nformer-reid rerank`: exact k-reciprocal re-ranking of query x gallery features; the
    distances / ranks written when asked, CMC / mAP when the files hold pids and camids. Returns
    the (Q, G) re-ranked distances, or (indices, distances) of the --save-ranks R nearest when only
    those are written (then the (Q, G) matrix is never built)."""
    from nformer_reid.engine import RerankParams, score, score_distances
    from nformer_reid.engine.evaluation import write_results
    from nformer_reid.rerank import re_ranking_sparse

    device = _device(cfg)
    inputs = _input_files(cfg, ("query", "gallery", "features"))
    started = time.perf_counter()
    query, gallery, where = _load_query_gallery(cfg, labels=False)
    timings = {"features": round(time.perf_counter() - started, 4)}
    sets = {"query": query, "gallery": gallery}
    missing = [f"{side} {name}" for side, fs in sets.items() for name in ("pids", "camids")
               if getattr(fs, name) is None]
    labelled = not missing
    if not labelled and not (cfg.save_distmat or cfg.save_ranks):
        raise ReIDInputError(f"{where} holds no labels to score ({', '.join(missing)} missing): give --save-distmat "
                             "and/or --save-ranks R to write the re-ranked distances / ranks")
    num_q, num_g = query.feats.shape[0], gallery.feats.shape[0]
    _check_rerank_bounds(cfg, num_q, num_g, where)
    if cfg.save_ranks and cfg.save_ranks > num_g:
        raise ReIDInputError(f"--save-ranks {cfg.save_ranks} exceeds the {num_g} gallery features of {where}")
    if labelled:
        _check_test_split(cfg, query.pids, gallery.pids, query.camids, gallery.camids, where, 1)
    _start_run(cfg, _rerank_outputs(cfg, labelled), inputs, invocation)
    if not labelled:
        logger.info("%s: no %s: writing the re-ranked outputs without scores", where, ", ".join(missing))
    params = RerankParams.of(cfg)
    started = time.perf_counter()
    # only the ranks asked for: the R nearest per query, never the (Q, G) matrix
    ranks_only = not labelled and not cfg.save_distmat
    got = re_ranking_sparse(query.feats, gallery.feats, params.k1, params.k2, params.lambda_value, device=device,
                            knn_precision=cfg.knn_precision, topk=cfg.save_ranks if ranks_only else None)
    timings["re-ranking"] = round(time.perf_counter() - started, 4)
    logger.info("re-ranked %d query x %d gallery (k1 %d, k2 %d, lambda %g) in %.1f s", num_q, num_g, params.k1,
                params.k2, params.lambda_value, timings["re-ranking"])
    if ranks_only:
        logger.info("wrote %s", _save_array(os.path.join(cfg.out, "ranks.npy"), got[0]))
        _finish_run(cfg)
        return got
    dist = got
    if cfg.save_distmat:
        logger.info("wrote %s", _save_array(os.path.join(cfg.out, "distmat.npy"), dist))
    if cfg.save_ranks:
        logger.info("wrote %s", _save_array(os.path.join(cfg.out, "ranks.npy"), top_ranks(dist, cfg.save_ranks)))
    if not labelled:
        _finish_run(cfg)
        return dist
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    started = time.perf_counter()
    results = {"input features": score(query.feats, gallery.feats, *ids),
               "input features + re-ranking": score_distances(dist, *ids)}
    timings["evaluation"] = round(time.perf_counter() - started, 4)
    from nformer_reid.engine import format_result

    logger.info("results on %s (%d query / %d gallery):", where, num_q, num_g)
    for name, res in results.items():
        logger.info("  %s", format_result(name, res))
    write_results(cfg.out, results, title=f"{query.feats.shape[1]}-d features", device=device, timings=timings,
                  run_info=invocation.run_info(cfg))
    _finish_run(cfg)
    return dist


@_one_run
def demo(cfg, invocation: Invocation = Invocation()):
    from nformer_reid.demo import run_demo

    _device(cfg)
    _start_run(cfg, ["results.json", "cmc.png", "loss.png"], {}, invocation)
    results = run_demo(cfg, run_info=invocation.run_info(cfg))
    _finish_run(cfg)
    return results


def datasets(cfg, invocation: Invocation = Invocation()):
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


RUNNERS = {"train": train, "eval": evaluate, "features": features, "refine": refine_command, "rerank": rerank_command,
           "demo": demo, "datasets": datasets}
