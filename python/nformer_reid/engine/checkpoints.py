"""The one checkpoint format of nformer-reid (torch.save'd dict), for the Re-ID model and a bare NFormer.

  kind      "ReIDModel" (backbone + NFormer) or "NFormer" (an nk.NFormer on its own)
  config    the constructor arguments (ReIDModel.from_config / nk.NFormer(**config))
  model     the state dict
  stage, epoch, history, extra    training progress (extra: e.g. {"step": n} of stage 2)
  optimizer, criterion, center_optimizer, scheduler    state dicts to resume (or None)

Writing is atomic (temporary file + rename) and refuses weights holding NaN/Inf. Reading checks
the file (readable, a mapping with the keys above), every weight (a tensor, of the model's
dtype kind and shape, finite) and, when a model is given, that its architecture matches the
file's config; every problem is a ReIDInputError naming the file and the key.
"""
import numbers
from typing import Mapping, Optional

import torch

import nformer_kernels as nk
from nformer_reid.config import KnnOptions
from nformer_reid.utils.checks import as_int
from nformer_reid.utils.errors import ReIDInputError, TrainingDiverged, one_line
from nformer_reid.utils.io import load_torch, save_torch

KINDS = ("ReIDModel", "NFormer")
# config keys that change the shapes or the number of the weights
ARCHITECTURE_KEYS = ("num_classes", "arch", "feat_dim", "last_stride", "nformer_depth", "nformer_heads",
                     "nformer_ffn_dim", "dim", "in_dim", "depth", "num_heads", "ffn_dim")


def _non_finite(state: Mapping[str, torch.Tensor]):
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str, model, stage: int, epoch: int, optimizer=None, criterion=None,
                    center_optimizer=None, scheduler=None, history=None, extra=None,
                    config: Optional[dict] = None) -> str:
    """Write `model` (a ReIDModel or an nk.NFormer) and the given training state to path, atomically.

    config defaults to model.config (a ReIDModel has one; pass it for an NFormer). TrainingDiverged
    (a ValueError; nothing written) if a weight holds NaN or Inf."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch module, got {type(model).__name__}")
    stage, epoch = as_int(stage, "stage", minimum=1, maximum=2), as_int(epoch, "epoch", minimum=0)
    weights = model.state_dict()
    bad = _non_finite(weights)
    if bad:
        raise TrainingDiverged(f"refusing to save {path}: the weights hold NaN or Inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''})")
    state = {"kind": "NFormer" if isinstance(model, nk.NFormer) else "ReIDModel", "model": weights,
             "config": config if config is not None else getattr(model, "config", None), "stage": stage,
             "epoch": epoch, "optimizer": optimizer.state_dict() if optimizer else None,
             "criterion": criterion.state_dict() if criterion else None,
             "center_optimizer": center_optimizer.state_dict() if center_optimizer else None,
             "scheduler": scheduler.state_dict() if scheduler else None, "history": history or [],
             "extra": extra or {}}
    return save_torch(state, path)  # temp file + rename: never a truncated checkpoint


def read_checkpoint(path: str, what: str = "checkpoint") -> dict:
    """The checkpoint dict of a save_checkpoint file, its layout and weights checked (not a mapping,
    missing keys, non-tensor / non-finite weights, a bad config): ReIDInputError naming `what`, the
    file and the key."""
    state = load_torch(path, what)
    if not isinstance(state, Mapping) or "model" not in state or "stage" not in state:
        found = f"keys {sorted(map(str, state))[:6]}" if isinstance(state, Mapping) else type(state).__name__
        raise ReIDInputError(f"{what} {path} is not an nformer-reid checkpoint (it holds {found}; use --official for "
                             "nformer_model.pth)")
    state = dict(state)
    state.setdefault("kind", "ReIDModel")  # files written before bare-NFormer checkpoints existed
    if state["kind"] not in KINDS:
        raise ReIDInputError(f"{what} {path}: key 'kind' must be one of {KINDS}, got {state['kind']!r}")
    weights = state["model"]
    if not isinstance(weights, Mapping) or not weights:
        raise ReIDInputError(f"{what} {path}: key 'model' must be a non-empty state dict, got "
                             f"{type(weights).__name__}")
    for key, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ReIDInputError(f"{what} {path}: weight {key!r} is a {type(value).__name__}, not a tensor")
    bad = _non_finite(weights)
    if bad:
        raise ReIDInputError(f"{what} {path}: weight {bad[0]!r} holds NaN or Inf"
                             f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
    config = state.get("config")
    if config is not None and not isinstance(config, Mapping):
        raise ReIDInputError(f"{what} {path}: key 'config' must be a mapping, got {type(config).__name__}")
    for key in ("stage", "epoch"):
        if key in state and (isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral)):
            raise ReIDInputError(f"{what} {path}: key {key!r} must be an int, got {state[key]!r}")
    if not isinstance(state.get("history", []), list) or not isinstance(state.get("extra", {}) or {}, Mapping):
        raise ReIDInputError(f"{what} {path}: keys 'history' / 'extra' must be a list / a mapping")
    state["extra"] = dict(state.get("extra") or {})
    return state


def check_architecture(state: dict, expected: Mapping, path: str, what: str = "checkpoint", flags=None) -> None:
    """ReIDInputError naming the file and the key where the checkpoint's config differs from
    `expected` in a key that shapes the weights (depth, dims, classes, ...). flags: {key: option}."""
    config = state.get("config") or {}
    flags = flags or {}
    for key in ARCHITECTURE_KEYS:
        if key in expected and key in config and config[key] != expected[key]:
            asked = f" ({flags[key]})" if key in flags else ""
            raise ReIDInputError(f"{what} {path} holds a model with {key}={config[key]!r}, but this run asks for "
                                 f"{key}={expected[key]!r}{asked}")


def load_weights(model, state: dict, path: str, what: str = "checkpoint") -> None:
    """Load state["model"] into model, checking every key's presence, dtype kind and shape first."""
    own = model.state_dict()
    weights = state["model"]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise ReIDInputError(f"{what} {path} does not fit the model: missing {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                             f"{' ...' if len(unexpected) > 3 else ''} (a different depth or architecture?)")
    for key, ref in own.items():
        value = weights[key]
        if value.is_floating_point() != ref.is_floating_point() or value.is_complex() != ref.is_complex():
            raise ReIDInputError(f"{what} {path}: weight {key!r} has dtype {value.dtype}, the model needs {ref.dtype}")
        if value.shape != ref.shape:
            raise ReIDInputError(f"{what} {path}: weight {key!r} has shape {tuple(value.shape)}, the model needs "
                                 f"{tuple(ref.shape)}")
    model.load_state_dict(weights)


def load_checkpoint(path: str, model=None, optimizer=None, criterion=None, center_optimizer=None, scheduler=None):
    """Restore whatever is given from a save_checkpoint file; returns the checkpoint dict.
    ReIDInputError (a ValueError) naming the file and the key for anything that does not fit."""
    state = read_checkpoint(path)
    if model is not None:
        if hasattr(model, "config") and state.get("config"):
            check_architecture(state, model.config, path)
        load_weights(model, state, path)
    for obj, key in ((optimizer, "optimizer"), (criterion, "criterion"), (center_optimizer, "center_optimizer"),
                     (scheduler, "scheduler")):
        if obj is not None and state.get(key) is not None:
            try:
                obj.load_state_dict(state[key])
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise ReIDInputError(f"checkpoint {path}: key {key!r} does not fit this run's {key}: "
                                     f"{one_line(exc)[:160]}") from exc
    return state


def load_model(path: str, kind: str = "ReIDModel", what: str = "checkpoint",
               knn_precision: str = KnnOptions.knn_precision):
    """The model of `kind` a checkpoint holds, built from its config, weights loaded (CPU); its
    NFormer searches neighbours with nk.knn's precision=knn_precision (a run setting, not stored)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    state = read_checkpoint(path, what)
    if state["kind"] != kind or not state.get("config"):
        raise ReIDInputError(f"{what} {path} holds no {kind} (it has {state['kind']}"
                             f"{'' if state.get('config') else ' without its config'})")
    try:
        if kind == "NFormer":
            model = nk.NFormer(**{**state["config"], "knn_precision": knn_precision})
        else:
            from nformer_reid.model import ReIDModel  # needs torchvision: imported only for this kind

            model = ReIDModel.from_config(state["config"], knn_precision=knn_precision)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ReIDInputError):
            raise
        raise ReIDInputError(f"{what} {path}: key 'config' does not describe a {kind}: "
                             f"{one_line(exc)[:160]}") from exc
    load_weights(model, state, path, what)
    return model
