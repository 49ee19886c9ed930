"""Every default of nformer-reid, written once: one frozen dataclass per command.

The CLI derives each command's options from its dataclass (field `seq_len` -> `--seq-len`, help
and argparse settings from the field metadata); a YAML file given with --config sets the same
names; the library functions (training stages, model, demo) take their defaults from here too.
Precedence: command line > YAML > the `--data synthetic` recipe (SYNTHETIC) > the field default.
"""
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

# Recipe constants that are not command options (reid-strong-baseline values, both stages).
WEIGHT_DECAY = 5e-4
CENTER_LR = 0.5
CENTER_WEIGHT = 5e-4
TRIPLET_MARGIN = 0.3


def option(default, help: str, **argparse_kwargs):
    """A command option: default, help text and argparse settings (type, nargs, choices, ...)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def flag(help: str):
    """An on/off option (`--rerank`), off by default."""
    return field(default=False, metadata={"help": help, "action": "store_true"})


@dataclass(frozen=True)
class DataOptions:
    data: str = option("market1501", "market1501 | dukemtmcreid | msmt17 | cuhk03_labeled | cuhk03_detected | "
                                     "synthetic")
    root: Optional[str] = option(None, "dataset folder or its parent (synthetic: where to generate; default "
                                       "<out>/synthetic_market)", type=str)
    size: Tuple[int, int] = option((256, 128), "input size", type=int, nargs=2, metavar=("H", "W"))
    workers: int = option(4, "data loader workers")
    test_batch: int = option(128, "images per feature-extraction batch")


@dataclass(frozen=True)
class BackboneOptions:
    arch: str = option("resnet50", "resnet18 | resnet34 | resnet50 | resnet101 | resnet152")
    feat_dim: int = option(256, "feature dimension (projection after the ResNet)")
    pretrained: Optional[str] = option(None, "local torchvision ImageNet weights file (else random init)", type=str)


@dataclass(frozen=True)
class NFormerOptions:
    nformer_depth: int = option(4, "NFormer blocks")
    nformer_landmarks: int = option(5, "landmarks of the landmark-agent attention")
    nformer_topk: int = option(20, "neighbours each feature attends to")


@dataclass(frozen=True)
class NFormerTrainingOptions:
    nformer_steps: Optional[int] = option(None, "total stage-2 steps (overrides --nformer-epochs)", type=int)
    seq_len: int = option(7000, "NFormer training sequence length (official 7000)")
    nformer_batch: int = option(2, "sequences per NFormer training step")
    nformer_lr: float = option(1e-5, "NFormer learning rate (Adam)")


@dataclass(frozen=True)
class RunOptions:
    out: str = option("runs/nformer_reid", "output folder (checkpoints, logs, plots)")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    amp: str = option("auto", "autocast on GPU (auto = bf16); CPU runs fp32", choices=("auto", "bf16", "fp16", "none"))
    seed: int = option(0, "seed of data order, sampling and landmark draws")


@dataclass(frozen=True)
class EvalOptions:
    mode: str = option("official", "NFormer refinement: official (joint query+gallery), paper (query-query "
                                   "isolation), none", choices=("official", "paper", "none"))
    rerank: bool = flag("also report k-reciprocal re-ranking (k1=20, k2=6, 0.3)")
    flip: bool = flag("flip test-time augmentation")


@dataclass(frozen=True)
class TrainConfig(EvalOptions, NFormerTrainingOptions, NFormerOptions, BackboneOptions, RunOptions, DataOptions):
    command: ClassVar[str] = "train"
    summary: ClassVar[str] = "train stage 1 (backbone) and/or stage 2 (NFormer)"

    stage: str = option("both", "which stages to train", choices=("1", "2", "both"))
    weights: Optional[str] = option(None, "checkpoint to start from (e.g. stage 1 weights for --stage 2)", type=str)
    resume: Optional[str] = option(None, "resume a stage from its *_last.pth checkpoint", type=str)
    epochs: int = option(120, "stage-1 epochs")
    max_steps: Optional[int] = option(None, "stop stage 1 after this many steps (smoke runs)", type=int)
    batch_size: int = option(64, "P x K images per stage-1 batch (64 = 16 identities x 4)")
    num_instances: int = option(4, "K: images per identity in a batch")
    lr: float = option(3.5e-4, "stage-1 learning rate (Adam)")
    milestones: Tuple[int, ...] = option((40, 70), "stage-1 epochs at which the lr drops 10x", type=int, nargs="+")
    warmup_epochs: int = option(10, "stage-1 linear warm-up epochs")
    nformer_epochs: int = option(20, "stage-2 epochs (of M // 30 sequences)")
    eval: bool = flag("evaluate at the end")


@dataclass(frozen=True)
class EvalConfig(EvalOptions, RunOptions, DataOptions):
    command: ClassVar[str] = "eval"
    summary: ClassVar[str] = "evaluate a checkpoint (ours or the official nformer_model.pth)"

    weights: Optional[str] = option(None, "nformer-reid checkpoint", type=str)
    official: Optional[str] = option(None, "official NFormer release file nformer_model.pth", type=str)


@dataclass(frozen=True)
class FeaturesConfig(RunOptions, NFormerTrainingOptions, NFormerOptions):
    command: ClassVar[str] = "features"
    summary: ClassVar[str] = ("NFormer on precomputed features (e.g. dumped from torchreid or fast-reid): train it "
                              "on --train and/or evaluate query/gallery")

    query: Optional[str] = option(None, ".pt (dict) or .npz file with feats (N,d), pids (N,), camids (N,)",
                                  type=str, required=True)
    gallery: Optional[str] = option(None, "same layout as --query", type=str, required=True)
    train: Optional[str] = option(None, "training features (feats, pids): train a new NFormer on them first", type=str)
    weights: Optional[str] = option(None, "an NFormer saved by 'nformer-reid features' (nformer.pth)", type=str)
    official: Optional[str] = option(None, "official NFormer release file nformer_model.pth (256-d features)",
                                     type=str)
    nformer_steps: Optional[int] = option(2000, "training steps on --train", type=int)
    nformer_lr: float = option(3e-4, "NFormer learning rate (Adam)")
    out: str = option("runs/nformer_features", "output folder (nformer.pth, refined features, logs, plots)")
    mode: str = option("official", "official (joint query+gallery sequence) or paper (query-query isolation)",
                       choices=("official", "paper"))
    rerank: bool = flag("also report k-reciprocal re-ranking (k1=20, k2=6, 0.3)")


@dataclass(frozen=True)
class DemoConfig:
    command: ClassVar[str] = "demo"
    summary: ClassVar[str] = "synthetic end-to-end NFormer demo (CPU, seconds)"

    out: str = option("nformer_demo_out", "output folder (plots, results.json, log.txt)")
    steps: int = option(100, "NFormer training steps")
    seq_len: int = option(512, "NFormer training sequence length")
    lr: float = option(3e-4, "NFormer learning rate (Adam)")
    seed: int = option(0, "seed of the benchmark, the training and the landmark draws")
    no_rerank: bool = flag("skip k-reciprocal re-ranking")
    quick: bool = flag("seconds-long smoke run on a tiny benchmark")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N")


@dataclass(frozen=True)
class DatasetsConfig:
    command: ClassVar[str] = "datasets"
    summary: ClassVar[str] = "print statistics of the datasets found under --root"

    root: Optional[str] = option(None, "folder holding the datasets", type=str, required=True)
    name: Optional[str] = option(None, "only this dataset (synthetic: generate one at --root)", type=str)


COMMANDS: Dict[str, type] = {cls.command: cls for cls in (TrainConfig, EvalConfig, FeaturesConfig, DemoConfig,
                                                           DatasetsConfig)}

# `--data synthetic`: a seconds-long smoke run of the image pipeline (resnet18 on 64 x 32 images,
# two steps per stage). Replaces the defaults of the options that are not set explicitly.
SYNTHETIC = dict(arch="resnet18", size=(64, 32), batch_size=16, epochs=1, max_steps=2, workers=0, nformer_epochs=1,
                 nformer_steps=2, seq_len=64, nformer_lr=1e-4, test_batch=32)


def _coerce(f, value, source: str):
    """value as the field's type (YAML gives lists and plain scalars); ValueError naming the option."""
    meta = f.metadata
    if value is None:
        if f.default is not None:
            raise ValueError(f"{source}: {f.name} cannot be null")
        return None
    if meta.get("action") == "store_true":
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {f.name} must be true or false, got {value!r}")
        return value
    convert = meta.get("type", type(f.default))
    try:
        if "nargs" in meta:
            if not isinstance(value, (list, tuple)) or not value or (meta["nargs"] != "+" and
                                                                     len(value) != meta["nargs"]):
                raise ValueError
            value = tuple(convert(v) for v in value)
        else:
            value = convert(value)
    except (TypeError, ValueError):
        count = "a list" if "nargs" in meta else "one value"
        raise ValueError(f"{source}: {f.name} must be {count} of type {convert.__name__}, got {value!r}") from None
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{source}: {f.name} must be one of {list(meta['choices'])}, got {value!r}")
    return value


def make_config(cls, values: Mapping[str, Any], source: str = "options"):
    """An instance of the command dataclass `cls` from option values (dashes or underscores in the
    names); `--data synthetic` swaps in SYNTHETIC for what `values` leaves unset. ValueError
    (naming `source`) for unknown names, wrong types and values outside the choices."""
    by_name = {f.name: f for f in fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in values if k not in by_name)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) for '{cls.command}': {unknown}")
    values = {k: _coerce(by_name[k], v, source) for k, v in values.items()}
    if "data" in by_name and values.get("data", cls.data) == "synthetic":
        values = {**{k: v for k, v in SYNTHETIC.items() if k in by_name}, **values}
    return cls(**values)

