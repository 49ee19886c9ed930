"""The one checkpoint format of nformer-reid (torch.save'd dict), for the Re-ID model and a bare NFormer.

  kind      "ReIDModel" (backbone + NFormer) or "NFormer" (an nk.NFormer on its own)
  config    the constructor arguments (ReIDModel.from_config / nk.NFormer(**config))
  model     the state dict
  stage, epoch, history, extra    training progress (extra: e.g. {"step": n} of stage 2)
  optimizer, criterion, center_optimizer, scheduler    state dicts to resume (or None)
"""
import os
from typing import Optional

import torch

import nformer_kernels as nk

KINDS = ("ReIDModel", "NFormer")


def save_checkpoint(path: str, model, stage: int, epoch: int, optimizer=None, criterion=None,
                    center_optimizer=None, scheduler=None, history=None, extra=None,
                    config: Optional[dict] = None) -> str:
    """Write `model` (a ReIDModel or an nk.NFormer) and the given training state to path.

    config defaults to model.config (a ReIDModel has one; pass it for an NFormer)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"kind": "NFormer" if isinstance(model, nk.NFormer) else "ReIDModel", "model": model.state_dict(),
             "config": config if config is not None else getattr(model, "config", None), "stage": stage,
             "epoch": epoch, "optimizer": optimizer.state_dict() if optimizer else None,
             "criterion": criterion.state_dict() if criterion else None,
             "center_optimizer": center_optimizer.state_dict() if center_optimizer else None,
             "scheduler": scheduler.state_dict() if scheduler else None, "history": history or [],
             "extra": extra or {}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a truncated checkpoint behind
    return path


def load_checkpoint(path: str, model=None, optimizer=None, criterion=None, center_optimizer=None, scheduler=None):
    """Restore whatever is given from a save_checkpoint file; returns the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "stage" not in state:
        raise ValueError(f"{path} is not an nformer-reid checkpoint (use --official for nformer_model.pth)")
    state.setdefault("kind", "ReIDModel")  # files written before bare-NFormer checkpoints existed
    if model is not None:
        model.load_state_dict(state["model"])
    for obj, key in ((optimizer, "optimizer"), (criterion, "criterion"), (center_optimizer, "center_optimizer"),
                     (scheduler, "scheduler")):
        if obj is not None and state.get(key) is not None:
            obj.load_state_dict(state[key])
    return state


def load_model(path: str, kind: str = "ReIDModel"):
    """The model of `kind` a checkpoint holds, built from its config, weights loaded (CPU)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    state = load_checkpoint(path)
    if state["kind"] != kind or not state.get("config"):
        raise ValueError(f"{path} holds no {kind} (it has {state['kind']}"
                         f"{'' if state.get('config') else ' without its config'})")
    if kind == "NFormer":
        model = nk.NFormer(**state["config"])
    else:
        from nformer_reid.model import ReIDModel  # needs torchvision: imported only for this kind

        model = ReIDModel.from_config(state["config"])
    model.load_state_dict(state["model"])
    return model
