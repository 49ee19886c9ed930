"""Precomputed Re-ID features on disk: what torchreid / fast-reid users can dump and feed to NFormer.

A file holds feats (N, d) float, pids (N,) int and camids (N,) int, either as a torch.save'd dict
(.pt / .pth) or as a NumPy .npz archive with those three keys. Other keys are ignored (with a
warning). Loading checks everything: a readable file of that layout, N >= 1 rows, d >= 1,
floating-point features, all finite, integer pids / camids of length N, camids >= 0.
"""
import logging
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.io import atomic_write, check_input_file, load_torch, save_torch

logger = logging.getLogger(__name__)
KEYS = ("feats", "pids", "camids")


@dataclass
class FeatureSet:
    feats: torch.Tensor  # (N, dim) float32
    pids: torch.Tensor   # (N,) int64
    camids: torch.Tensor  # (N,) int64


def save_features(path: str, features: FeatureSet) -> None:
    """Write `features` to path, atomically: .npz as a NumPy archive, anything else with torch.save."""
    if not isinstance(features, FeatureSet):
        raise TypeError(f"features must be a FeatureSet, got {type(features).__name__}")
    arrays = {"feats": features.feats, "pids": features.pids, "camids": features.camids}
    if str(path).endswith(".npz"):
        with atomic_write(path) as fh:
            np.savez(fh, **{k: torch.as_tensor(v).numpy() for k, v in arrays.items()})
    else:
        save_torch(arrays, path)


def _read_raw(path: str, what: str) -> dict:
    if str(path).endswith(".npz"):
        path = check_input_file(path, what)
        try:
            with np.load(path, allow_pickle=False) as archive:
                files = list(archive.files)
                raw = {key: archive[key] for key in files if key in KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ReIDInputError(f"{what} {path}: not a readable .npz archive (truncated, or not written by "
                                 f"numpy.savez): {reason}") from exc
    else:
        raw = load_torch(path, what)
        if not isinstance(raw, dict):
            raise ReIDInputError(f"{what} {path}: expected a dict with feats, pids, camids, got {type(raw).__name__}")
        files = [str(k) for k in raw]
    extra = sorted(str(k) for k in files if k not in KEYS)
    if extra:
        logger.warning("%s %s: ignoring keys %s (only feats, pids, camids are read)", what, path, extra)
    out = {}
    for key in KEYS:
        if key not in raw:
            continue
        value = raw[key]
        try:
            if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
                raise TypeError(f"numpy dtype {value.dtype}")
            out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ReIDInputError(f"{what} {path}: {key} is not a numeric array ({type(value).__name__}: "
                                 f"{' '.join(str(exc).split())[:100]})") from None
    return out


def load_features(path: str, name: str = "features", need_camids: bool = True) -> FeatureSet:
    """Read a features file; ReIDInputError (a ValueError) naming `name`, the file and the key when
    the file is unreadable or its layout or values are wrong."""
    what = f"{name} file"
    raw = _read_raw(os.fspath(path), what)
    needed = ("feats", "pids", "camids") if need_camids else ("feats", "pids")
    missing = [key for key in needed if key not in raw]
    if missing:
        raise ReIDInputError(f"{what} {path}: missing {missing} (has {sorted(raw)})")
    feats, pids = raw["feats"], raw["pids"]
    if feats.dim() != 2 or not feats.is_floating_point() or feats.is_complex():
        raise ReIDInputError(f"{what} {path}: feats must be a 2-D float array (N, d), got {tuple(feats.shape)} "
                             f"{feats.dtype}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise ReIDInputError(f"{what} {path}: feats is empty, shape {tuple(feats.shape)} (need N >= 1 rows of d >= 1)")
    camids = raw.get("camids", torch.zeros(feats.shape[0], dtype=torch.long))
    for key, value in (("pids", pids), ("camids", camids)):
        if value.shape != (feats.shape[0],) or value.is_floating_point() or value.dtype == torch.bool \
                or value.is_complex():
            raise ReIDInputError(f"{what} {path}: {key} must be integers of shape ({feats.shape[0]},) like feats, got "
                                 f"{tuple(value.shape)} {value.dtype}")
    if bool((camids < 0).any()):
        raise ReIDInputError(f"{what} {path}: camids must be >= 0, got {int(camids.min())}")
    if not bool(torch.isfinite(feats).all()):
        rows = (~torch.isfinite(feats)).any(1).nonzero().squeeze(1)
        raise ReIDInputError(f"{what} {path}: feats contain NaN or Inf ({rows.numel()} rows, first row {int(rows[0])})")
    feats32 = feats.float()
    if not bool(torch.isfinite(feats32).all()):
        raise ReIDInputError(f"{what} {path}: feats exceed the float32 range")
    return FeatureSet(feats32, pids.long(), camids.long())
