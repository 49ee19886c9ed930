"""Precomputed Re-ID features on disk: what torchreid / fast-reid users can dump and feed to NFormer.

A file holds feats (N, d) float, pids (N,) int and camids (N,) int, either as a torch.save'd dict
(.pt / .pth) or as a NumPy .npz archive with those three keys.
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FeatureSet:
    feats: torch.Tensor  # (N, dim) float32
    pids: torch.Tensor   # (N,) int64
    camids: torch.Tensor  # (N,) int64


def save_features(path: str, features: FeatureSet) -> None:
    """Write `features` to path: .npz as a NumPy archive, anything else with torch.save."""
    arrays = {"feats": features.feats, "pids": features.pids, "camids": features.camids}
    if str(path).endswith(".npz"):
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    else:
        torch.save(arrays, path)


def load_features(path: str, name: str = "features", need_camids: bool = True) -> FeatureSet:
    """Read a features file; ValueError naming `name` and the problem when the layout is wrong."""
    if str(path).endswith(".npz"):
        with np.load(path) as archive:
            raw = {key: torch.from_numpy(archive[key]) for key in archive.files}
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{name} file {path}: expected a dict with feats, pids, camids, got {type(raw).__name__}")
        raw = {key: torch.as_tensor(value) for key, value in raw.items()}
    needed = ("feats", "pids", "camids") if need_camids else ("feats", "pids")
    missing = [key for key in needed if key not in raw]
    if missing:
        raise ValueError(f"{name} file {path}: missing {missing} (has {sorted(raw)})")
    feats, pids = raw["feats"], raw["pids"]
    camids = raw.get("camids", torch.zeros(len(pids), dtype=torch.long))
    if feats.dim() != 2 or not feats.is_floating_point():
        raise ValueError(f"{name} file {path}: feats must be a 2-D float array (N, d), got {tuple(feats.shape)} "
                         f"{feats.dtype}")
    for key, value in (("pids", pids), ("camids", camids)):
        if value.shape != (feats.shape[0],) or value.is_floating_point():
            raise ValueError(f"{name} file {path}: {key} must be integers of shape ({feats.shape[0]},), got "
                             f"{tuple(value.shape)} {value.dtype}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{name} file {path}: feats contain NaN or Inf")
    return FeatureSet(feats.float(), pids.long(), camids.long())
