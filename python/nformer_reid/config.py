"""Every default of nformer-reid, written once: one frozen dataclass per command.

The CLI derives each command's options from its dataclass (field `seq_len` -> `--seq-len`, help
and argparse settings from the field metadata); a YAML file given with --config and KEY=VALUE
overrides (`seq_len=512`, or `--set seq_len=512`) set the same names; the library functions
(training stages, model, demo) take their defaults from here too.
Precedence: KEY=VALUE > command-line options > YAML > the `--data synthetic` recipe (SYNTHETIC) >
the field default. Required options (`required=True` in the field metadata) and options that go
together are checked once all of these are merged (Validated), so a YAML file can supply any of them.
"""
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import numpy as np

from nformer_kernels.ops import PRECISIONS as KNN_PRECISIONS
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.yaml_input import short

# Recipe constants that are not command options (reid-strong-baseline values, both stages).
WEIGHT_DECAY = 5e-4
CENTER_LR = 0.5
CENTER_WEIGHT = 5e-4
TRIPLET_MARGIN = 0.3


ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
DATA_NAMES = ("market1501", "dukemtmcreid", "msmt17", "cuhk03_labeled", "cuhk03_detected", "synthetic")
MAX_SEED = 2 ** 63 - 1


def at_least(low):
    """Value check: a number >= low (each element of a tuple)."""
    def check(value):
        return None if value >= low else f"must be >= {low}, got {value}"
    check.__doc__ = f">= {low}"
    return check


def positive_finite(value):
    """Value check: a finite number > 0."""
    return None if math.isfinite(value) and value > 0 else f"must be a finite number > 0, got {value}"


def one_of(names):
    def check(value):
        return None if value in names else f"must be one of {list(names)}, got {short(value)}"
    return check


def unit_interval(value):
    """Value check: a number in [0, 1]."""
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def seed_range(value):
    return None if 0 <= value <= MAX_SEED else f"must be in [0, 2**63 - 1], got {value}"


def option(default, help: str, check=None, *, required: bool = False, aliases: Tuple[str, ...] = (),
           **argparse_kwargs):
    """A command option: default, help text, an optional value check (value -> error text or None;
    applied to each element of a tuple, never to None) and argparse settings (type, nargs, choices, ...).
    required: the merged config (command line, KEY=VALUE, YAML) must set it (checked by Validated).
    aliases: other names of the option (`"k1"`: the flag --k1 and the key k1)."""
    return field(default=default, metadata={"help": help, "check": check, "required": required,
                                            "aliases": tuple(aliases), **argparse_kwargs})


def flag(help: str):
    """An on/off option (`--rerank`), off by default."""
    return field(default=False, metadata={"help": help, "check": None, "required": False, "aliases": (),
                                          "action": "store_true"})


# metadata keys that are not argparse settings
OPTION_KEYS = ("help", "check", "required", "aliases")


class Validated:
    """Checks every field at construction (types as the CLI would coerce them, value checks,
    then the class's cross-field `_check`): ReIDInputError (a ValueError) naming the option."""

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name), None, _flag(f.name)))
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) is None:
                raise ReIDInputError(f"{_flag(f.name)} is required (give it on the command line, as "
                                     f"{f.name}=VALUE, or in the --config YAML)")
        self._check()

    def _check(self) -> None:
        """Cross-field checks of the command (none by default)."""


@dataclass(frozen=True)
class DataOptions:
    data: str = option("market1501", "market1501 | dukemtmcreid | msmt17 | cuhk03_labeled | cuhk03_detected | "
                                     "synthetic", check=one_of(DATA_NAMES))
    root: Optional[str] = option(None, "dataset folder or its parent (synthetic: where to generate; default "
                                       "<out>/synthetic_market)", type=str)
    size: Tuple[int, int] = option((256, 128), "input size", at_least(1), type=int, nargs=2, metavar=("H", "W"))
    workers: int = option(4, "data loader workers", at_least(0))
    test_batch: int = option(128, "images per feature-extraction batch", at_least(1))


@dataclass(frozen=True)
class BackboneOptions:
    arch: str = option("resnet50", "resnet18 | resnet34 | resnet50 | resnet101 | resnet152", one_of(ARCHS))
    feat_dim: int = option(256, "feature dimension (projection after the ResNet; even: 2 NFormer heads)", at_least(2))
    pretrained: Optional[str] = option(None, "local torchvision ImageNet weights file (else random init)", type=str)


@dataclass(frozen=True)
class NFormerOptions:
    nformer_depth: int = option(4, "NFormer blocks", at_least(1))
    nformer_landmarks: int = option(5, "landmarks of the landmark-agent attention", at_least(1))
    nformer_topk: int = option(20, "neighbours each feature attends to", at_least(1))


@dataclass(frozen=True)
class KnnOptions:
    knn_precision: str = option("auto", "neighbour searches of the NFormer, its training sampler and re-ranking: "
                                        "certified (fp16 scans, then proven or recomputed: the exact neighbours, "
                                        "faster on GPU tensor cores), exact (scans in the features' precision), "
                                        "auto (certified for fp32 on CUDA, else exact)", choices=KNN_PRECISIONS)


@dataclass(frozen=True)
class NFormerTrainingOptions:
    nformer_steps: Optional[int] = option(None, "total stage-2 steps (overrides --nformer-epochs)", at_least(1),
                                          type=int)
    seq_len: int = option(7000, "NFormer training sequence length (official 7000)", at_least(2))
    nformer_batch: int = option(2, "sequences per NFormer training step", at_least(1))
    nformer_lr: float = option(1e-5, "NFormer learning rate (Adam)", positive_finite)


@dataclass(frozen=True)
class RunOptions:
    out: str = option("runs/nformer_reid", "output folder (checkpoints, logs, plots)")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    amp: str = option("auto", "autocast on GPU (auto = bf16); CPU runs fp32", choices=("auto", "bf16", "fp16", "none"))
    seed: int = option(0, "seed of data order, sampling and landmark draws", seed_range)
    overwrite: bool = flag("replace the outputs of an earlier run in --out (refused without it)")


DEFAULT_DIST_TIMEOUT = 1800.0  # seconds: torch.distributed's own default (30 minutes)


@dataclass(frozen=True)
class DistributedOptions:
    """Runs sharded over the processes torchrun starts (RANK / WORLD_SIZE / ... in the environment)."""
    distributed: bool = flag("shard the run over the processes torchrun starts (torchrun --nproc-per-node P -m "
                             "nformer_reid <command> --distributed ...): each rank holds a contiguous share of the "
                             "rows; CPU ranks over gloo, CUDA ranks (cuda:LOCAL_RANK) over NCCL")
    dist_timeout: float = option(DEFAULT_DIST_TIMEOUT, "with --distributed: seconds a rank waits for the others (the "
                                                       "process group's start, each collective) before failing",
                                 positive_finite, metavar="S")


RERANK_HELP = "also report k-reciprocal re-ranking (parameters: --rerank-k1, --rerank-k2, --rerank-lambda)"


@dataclass(frozen=True)
class RerankOptions:
    """k-reciprocal re-ranking parameters (Zhong et al. 2017; defaults: the paper's Market-1501 values)."""
    rerank_k1: int = option(20, "re-ranking k1: the k of the k-reciprocal neighbour sets", at_least(1), metavar="K1")
    rerank_k2: int = option(6, "re-ranking k2: neighbours of the local query expansion (1: none)", at_least(1),
                            metavar="K2")
    rerank_lambda: float = option(0.3, "re-ranking lambda: weight of the original distance against the Jaccard "
                                       "distance, in [0, 1]", unit_interval, metavar="LAMBDA")


@dataclass(frozen=True)
class EvalOptions(RerankOptions):
    mode: str = option("official", "NFormer refinement: official (joint query+gallery), paper (query-query "
                                   "isolation), none", choices=("official", "paper", "none"))
    rerank: bool = flag(RERANK_HELP)
    flip: bool = flag("flip test-time augmentation")


@dataclass(frozen=True)
class TrainConfig(Validated, DistributedOptions, KnnOptions, EvalOptions, NFormerTrainingOptions, NFormerOptions,
                  BackboneOptions, RunOptions, DataOptions):
    command: ClassVar[str] = "train"
    summary: ClassVar[str] = "train stage 1 (backbone) and/or stage 2 (NFormer)"

    stage: str = option("both", "which stages to train", choices=("1", "2", "both"))
    weights: Optional[str] = option(None, "checkpoint to start from (e.g. stage 1 weights for --stage 2)", type=str)
    resume: Optional[str] = option(None, "resume a stage from its *_last.pth checkpoint (written with --save-model "
                                         "or --checkpoint-every)", type=str)
    epochs: int = option(120, "stage-1 epochs", at_least(1))
    max_steps: Optional[int] = option(None, "stop stage 1 after this many steps (smoke runs)", at_least(1), type=int)
    batch_size: int = option(64, "P x K images per stage-1 batch (64 = 16 identities x 4)", at_least(1))
    num_instances: int = option(4, "K: images per identity in a batch", at_least(1))
    lr: float = option(3.5e-4, "stage-1 learning rate (Adam)", positive_finite)
    milestones: Tuple[int, ...] = option((40, 70), "stage-1 epochs at which the lr drops 10x", at_least(1), type=int,
                                         nargs="+")
    warmup_epochs: int = option(10, "stage-1 linear warm-up epochs", at_least(0))
    nformer_epochs: int = option(20, "stage-2 epochs (of M // 30 sequences)", at_least(1))
    eval: bool = flag("evaluate at the end")
    save_model: bool = flag("also write the resumable checkpoints stage1_last.pth / stage2_last.pth (weights and "
                            "optimizer state, what --resume continues; model_final.pth is always written)")
    checkpoint_every: Optional[int] = option(None, "write stage1_last.pth every N stage-1 epochs (and at the end "
                                                   "of each stage; implies --save-model)", at_least(1), type=int)

    def _check(self):
        if self.batch_size % self.num_instances:
            raise ReIDInputError(f"--batch-size {self.batch_size} must be a multiple of --num-instances "
                                 f"{self.num_instances}")
        if self.resume and self.stage == "both":
            raise ReIDInputError("--resume continues one stage: give --stage 1 or --stage 2 with it")
        if self.resume and self.weights:
            raise ReIDInputError("give --resume (continue a stage) or --weights (start from a checkpoint), not both")

    @property
    def save_last(self) -> bool:
        """Whether the stages write their resumable *_last.pth checkpoints."""
        return self.save_model or self.checkpoint_every is not None


@dataclass(frozen=True)
class EvalConfig(Validated, KnnOptions, EvalOptions, RunOptions, DataOptions):
    command: ClassVar[str] = "eval"
    summary: ClassVar[str] = "evaluate a checkpoint (ours or the official nformer_model.pth)"

    weights: Optional[str] = option(None, "nformer-reid checkpoint", type=str)
    official: Optional[str] = option(None, "official NFormer release file nformer_model.pth", type=str)
    nformer_depth: Optional[int] = option(None, "NFormer blocks of --official (default: the release's 4; a file "
                                                "with another count is refused unless it is given)",
                                          at_least(1), type=int)
    visrank: Optional[int] = option(None, "also draw ranked lists: each query (up to 100, spread over the query list) "
                                          "with its K nearest gallery images, before and after NFormer, under "
                                          "<out>/visrank/ (needs Pillow)", at_least(1), type=int, metavar="K")


FEATURE_FILE_HELP = (".pt / .pth (dict), .npz archive or .npy (features only) with feats (N,d), pids (N,), "
                     "camids (N,)")

# `features --train` on a 2-core CPU in minutes: a step of 2 x 512 features (2048-d projected to
# a 256-d, 4-block NFormer) costs about 1.9 CPU-seconds there, so 200 steps take 3-6 minutes (see
# the README's table per device class). The official recipe (--seq-len 7000 --nformer-batch 2
# --nformer-steps 2000 --nformer-lr 1e-5) stays reachable by options.
FEATURES_STEPS = 200
FEATURES_SEQ_LEN = 512


@dataclass(frozen=True)
class NFormerFileOptions:
    """The NFormer of a features / refine run: trained on --train, or read from --weights / --official."""
    weights: Optional[str] = option(None, "an NFormer saved by 'nformer-reid features --train' (nformer.pth)", type=str)
    official: Optional[str] = option(None, "official NFormer release file nformer_model.pth (256-d features)",
                                     type=str)
    nformer_dim: Optional[int] = option(None, "NFormer width (default: 256 for --train; wider features are projected "
                                              "to it by a learned input projection, narrower ones keep their "
                                              "width; that of --weights / --official, checked if given)",
                                        at_least(2), type=int)
    nformer_depth: Optional[int] = option(None, "NFormer blocks (default: 4 for --train and --official, whose "
                                                "file must hold exactly that many; that of --weights, checked if "
                                                "given)", at_least(1), type=int)
    nformer_landmarks: Optional[int] = option(None, "landmarks of the landmark-agent attention (default: 5; that of "
                                                    "--weights)", at_least(1), type=int)
    nformer_topk: Optional[int] = option(None, "neighbours each feature attends to (default: 20; that of --weights)",
                                         at_least(1), type=int)


@dataclass(frozen=True)
class FeaturesConfig(Validated, DistributedOptions, KnnOptions, RerankOptions, RunOptions, NFormerTrainingOptions,
                     NFormerFileOptions):
    command: ClassVar[str] = "features"
    summary: ClassVar[str] = ("NFormer on precomputed features (e.g. dumped from torchreid or fast-reid): train it "
                              "on --train and/or evaluate query/gallery")

    query: Optional[str] = option(None, "query features: " + FEATURE_FILE_HELP + " (with --gallery)", type=str)
    gallery: Optional[str] = option(None, "gallery features, same layout as --query", type=str)
    features: Optional[str] = option(None, "query and gallery in one file (torchreid layout: qf, q_pids, q_camids, "
                                           "gf, g_pids, g_camids), instead of --query / --gallery", type=str)
    train: Optional[str] = option(None, "training features (feats, pids): train a new NFormer on them first", type=str)
    nformer_steps: Optional[int] = option(FEATURES_STEPS, "training steps on --train (official recipe: 2000)",
                                          at_least(1), type=int)
    seq_len: int = option(FEATURES_SEQ_LEN, "NFormer training sequence length (official recipe: 7000)", at_least(2))
    nformer_lr: float = option(3e-4, "NFormer learning rate (Adam)", positive_finite)
    out: str = option("runs/nformer_features", "output folder (refined features, results, logs, plots; nformer.pth "
                                               "with --train)")
    mode: str = option("official", "official (joint query+gallery sequence) or paper (query-query isolation)",
                       choices=("official", "paper"))
    rerank: bool = flag(RERANK_HELP)
    save_model: bool = flag("also write the resumable stage2_last.pth (NFormer, optimizer and loss state) with --train")

    def _check(self):
        check_query_gallery(self)


def check_query_gallery(cfg) -> None:
    """Exactly one of the two ways to give query and gallery features: --features, or --query and --gallery."""
    if cfg.features and (cfg.query or cfg.gallery):
        given = " and ".join(f for f, v in (("--query", cfg.query), ("--gallery", cfg.gallery)) if v)
        raise ReIDInputError(f"give --features FILE (query and gallery in one file) or --query and --gallery, not "
                             f"--features with {given}")
    if not cfg.features and not (cfg.query and cfg.gallery):
        missing = " and ".join(f for f, v in (("--query", cfg.query), ("--gallery", cfg.gallery)) if not v)
        raise ReIDInputError(f"{missing} required: give --query and --gallery, or --features FILE with both (on the "
                             "command line, as KEY=VALUE or in the --config YAML)")


@dataclass(frozen=True)
class RefineConfig(Validated, DistributedOptions, KnnOptions, NFormerFileOptions):
    command: ClassVar[str] = "refine"
    summary: ClassVar[str] = ("refine one set of features with an NFormer, no labels needed (e.g. a deployment "
                              "gallery): --input FILE --output FILE with --weights or --official")

    input: Optional[str] = option(None, "features to refine: " + FEATURE_FILE_HELP + " (pids / camids optional, "
                                        "carried over to --output)", type=str, required=True)
    output: Optional[str] = option(None, "refined features, written in the format of its suffix (.pt / .pth, .npz, "
                                         ".npy: features only)", type=str, required=True)
    save_neighbors: Optional[str] = option(None, "also write each feature's top-k neighbour indices, (N, k) int64, "
                                                 "as .npy or .pt (k = --nformer-topk)", type=str)
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    seed: int = option(0, "seed of the landmark draws", seed_range)
    overwrite: bool = flag("replace --output / --save-neighbors if they exist (refused without it)")

    def _check(self):
        if bool(self.weights) == bool(self.official):
            raise ReIDInputError("give exactly one of --weights (nformer.pth of 'nformer-reid features --train') or "
                                 "--official (nformer_model.pth)")


@dataclass(frozen=True)
class RerankConfig(Validated, KnnOptions):
    command: ClassVar[str] = "rerank"
    summary: ClassVar[str] = ("exact k-reciprocal re-ranking of query x gallery features; scored when the files hold "
                              "pids and camids")

    query: Optional[str] = option(None, "query features: " + FEATURE_FILE_HELP + " (pids / camids optional)",
                                  type=str)
    gallery: Optional[str] = option(None, "gallery features, same layout as --query", type=str)
    features: Optional[str] = option(None, "query and gallery in one file (torchreid layout: qf, q_pids, q_camids, "
                                           "gf, g_pids, g_camids), instead of --query / --gallery", type=str)
    rerank_k1: int = option(20, "k1: the k of the k-reciprocal neighbour sets", at_least(1), aliases=("k1",),
                            metavar="K1")
    rerank_k2: int = option(6, "k2: neighbours of the local query expansion (1: none)", at_least(1),
                            aliases=("k2",), metavar="K2")
    rerank_lambda: float = option(0.3, "lambda: weight of the original distance against the Jaccard distance, in "
                                       "[0, 1]", unit_interval, aliases=("lambda",), metavar="LAMBDA")
    save_distmat: bool = flag("write the re-ranked (Q, G) distances to <out>/distmat.npy (float32)")
    save_ranks: Optional[int] = option(None, "write the R nearest gallery indices of each query after re-ranking to "
                                             "<out>/ranks.npy ((Q, R) int64)", at_least(1), type=int, metavar="R")
    out: str = option("runs/nformer_rerank", "output folder (results.json with labels, distmat.npy, ranks.npy, "
                                             "config.yaml, log.txt)")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    overwrite: bool = flag("replace the outputs of an earlier run in --out (refused without it)")

    def _check(self):
        check_query_gallery(self)


@dataclass(frozen=True)
class DemoConfig(Validated, KnnOptions):
    command: ClassVar[str] = "demo"
    summary: ClassVar[str] = "synthetic end-to-end NFormer demo (CPU, seconds)"

    out: str = option("nformer_demo_out", "output folder (plots, results.json, log.txt)")
    steps: int = option(100, "NFormer training steps", at_least(1))
    seq_len: int = option(512, "NFormer training sequence length", at_least(2))
    lr: float = option(3e-4, "NFormer learning rate (Adam)", positive_finite)
    seed: int = option(0, "seed of the benchmark, the training and the landmark draws", seed_range)
    no_rerank: bool = flag("skip k-reciprocal re-ranking")
    quick: bool = flag("seconds-long smoke run on a tiny benchmark")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    overwrite: bool = flag("replace the outputs of an earlier run in --out (refused without it)")


@dataclass(frozen=True)
class DatasetsConfig(Validated):
    command: ClassVar[str] = "datasets"
    summary: ClassVar[str] = "print statistics of the datasets found under --root"

    root: Optional[str] = option(None, "folder holding the datasets", type=str, required=True)
    name: Optional[str] = option(None, "only this dataset (synthetic: generate one at --root)", one_of(DATA_NAMES),
                                 type=str)


COMMANDS: Dict[str, type] = {cls.command: cls for cls in (TrainConfig, EvalConfig, FeaturesConfig, RefineConfig,
                                                           RerankConfig, DemoConfig, DatasetsConfig)}

# `--data synthetic`: a seconds-long smoke run of the image pipeline (resnet18 on 64 x 32 images,
# two steps per stage). Replaces the defaults of the options that are not set explicitly.
SYNTHETIC = dict(arch="resnet18", size=(64, 32), batch_size=16, epochs=1, max_steps=2, workers=0, nformer_epochs=1,
                 nformer_steps=2, seq_len=64, nformer_lr=1e-4, test_batch=32)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(convert, value):
    """One value as the option's type, strictly: no float -> int truncation, no bool as a number."""
    if convert is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, str)):
            raise ValueError
        return int(value)
    if convert is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, str)):
            raise ValueError
        return float(value)
    if convert is str and (isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, numbers.Real))):
        raise ValueError  # YAML `stage: 1` is the string "1"; lists, mappings, booleans are not
    return convert(value)


def _coerce(f, value, source: Optional[str], label: Optional[str] = None):
    """value as the field's type (YAML gives lists and plain scalars), then its value check;
    ReIDInputError naming the option (`label`, default its field name) and `source`."""
    meta = f.metadata
    label = label or f.name
    where = f"{source}: " if source else ""
    if value is None:
        if f.default is not None:
            raise ReIDInputError(f"{where}{label} cannot be null")
        return None
    if meta.get("action") == "store_true":
        if not isinstance(value, (bool, np.bool_)):
            raise ReIDInputError(f"{where}{label} must be true or false, got {short(value)}")
        return bool(value)
    convert = meta.get("type", type(f.default))
    try:
        if "nargs" in meta:
            if not isinstance(value, (list, tuple)) or not value or (meta["nargs"] != "+" and
                                                                     len(value) != meta["nargs"]):
                raise ValueError
            value = tuple(_convert(convert, v) for v in value)
        else:
            value = _convert(convert, value)
    except (TypeError, ValueError):
        count = "a list" if "nargs" in meta else "one value"
        raise ReIDInputError(f"{where}{label} must be {count} of type {convert.__name__}, got {short(value)}") from None
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ReIDInputError(f"{where}{label} must be one of {list(meta['choices'])}, got {short(value)}")
    check = meta.get("check")
    if check is not None:
        for v in value if isinstance(value, tuple) else (value,):
            problem = check(v)
            if problem:
                raise ReIDInputError(f"{where}{label} {problem}")
    return value


def check_values(cls, values: Mapping[str, Any], source: Optional[str] = None, flags: bool = False) -> Dict[str, Any]:
    """The option values (dashes or underscores in the names) coerced and checked one by one;
    ReIDInputError naming `source` and the option (as --flag with flags, else as written)."""
    by_name = {f.name: f for f in fields(cls)}
    by_name.update({alias: f for f in fields(cls) for alias in f.metadata.get("aliases", ())})
    out = {}
    unknown = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            unknown.append(str(key))
            continue
        f = by_name[name]
        if f.name in out:
            raise ReIDInputError(f"{source + ': ' if source else ''}{key} sets {_flag(f.name)} a second time")
        out[f.name] = _coerce(f, value, source, _flag(name) if flags else str(key))
    if unknown:
        where = f"{source}: " if source else ""
        raise ReIDInputError(f"{where}unknown option(s) for '{cls.command}': {sorted(unknown)}")
    return out


def make_config(cls, values: Mapping[str, Any], source: str = "options", flags: bool = False):
    """An instance of the command dataclass `cls` from option values (dashes or underscores in the
    names); `--data synthetic` swaps in SYNTHETIC for what `values` leaves unset. ReIDInputError
    (a ValueError, naming `source`) for unknown names, wrong types, values outside the choices or
    their checks, and options that do not go together."""
    values = check_values(cls, values, source, flags)
    if "data" in {f.name for f in fields(cls)} and values.get("data", cls.data) == "synthetic":
        values = {**{k: v for k, v in SYNTHETIC.items() if k in {f.name for f in fields(cls)}}, **values}
    return cls(**values)


RUN_POLICIES = ("overwrite", "distributed", "dist_timeout")


def config_values(cfg) -> Dict[str, Any]:
    """The effective options of a config as plain YAML values (tuples as lists), in field order,
    without the run policies RUN_POLICIES: --overwrite (a rerun from the saved config.yaml must
    ask for it again) and --distributed / --dist-timeout (how the run was launched, not what it
    computes: a sharded run gives the single process's numbers). `--config` with this mapping
    rebuilds `cfg` (the same --out aside, and those policies at their defaults)."""
    values = {}
    for f in fields(cfg):
        if f.name in RUN_POLICIES:
            continue
        value = getattr(cfg, f.name)
        values[f.name] = list(value) if isinstance(value, tuple) else value
    return values
