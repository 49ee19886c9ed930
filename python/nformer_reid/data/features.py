"""Precomputed Re-ID features on disk: what torchreid / fast-reid users can dump and feed to NFormer.

A feature set is feats (N, d) float with optional labels pids (N,) int and camids (N,) int
(a gallery without labels can still be refined). Files, by suffix:

- `.pt` / `.pth` (and any other suffix): a torch.save'd dict whose values are tensors, numeric
  numpy arrays or lists of numbers (what torchreid's engine holds: a feature tensor and numpy id
  arrays), or a bare tensor / array (features only). Read with torch.load(weights_only=True) and
  an allow-list of exactly the numpy globals numeric arrays need: any other object in the pickle
  is refused before it is built, so a file can never run code.
- `.npz`: a NumPy archive of those arrays (read with allow_pickle=False).
- `.npy`: one array, the features (read with allow_pickle=False); `load_feature_rows` reads a
  row range of it through a memory map.

Keys (one alias per field per file): feats | features | feat | embeddings, pids | pid | labels |
targets (fast-reid's batch key), camids | camid | cams. Other keys (img_paths, ...) are ignored
with one warning naming them.

The torchreid evaluation layout keeps query and gallery in one file: qf, q_pids, q_camids, gf,
g_pids, g_camids (`load_query_gallery`, `save_query_gallery`).

Loading checks everything and raises ReIDInputError (a ValueError) naming the option, the file and
the key: a readable file of that layout, N >= 1 rows, d >= 1, floating-point features, all finite
and within the float32 range, integer ids of length N, camids >= 0.
"""
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from nformer_reid.utils.errors import ReIDInputError, one_line
from nformer_reid.utils.io import atomic_write, check_input_file, load_torch, save_torch

logger = logging.getLogger(__name__)

FIELDS = ("feats", "pids", "camids")
ALIASES: Dict[str, Tuple[str, ...]] = {
    "feats": ("feats", "features", "feat", "embeddings"),
    "pids": ("pids", "pid", "labels", "targets"),
    "camids": ("camids", "camid", "cams"),
}
# torchreid's Engine._evaluate names (qf, q_pids, ...), their spelled-out forms, and the {"query",
# "gallery"} feature tensors that earlier versions of the features command wrote as refined features.
QUERY_GALLERY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "qf": ("qf", "q_feats", "query_feats", "query_features", "query"),
    "q_pids": ("q_pids", "query_pids"),
    "q_camids": ("q_camids", "query_camids"),
    "gf": ("gf", "g_feats", "gallery_feats", "gallery_features", "gallery"),
    "g_pids": ("g_pids", "gallery_pids"),
    "g_camids": ("g_camids", "gallery_camids"),
}
_TORCH_SUFFIXES = (".pt", ".pth")
_INT64_MAX = np.iinfo(np.int64).max


def _to_tensor(value, label: str) -> torch.Tensor:
    """value (tensor, numpy array, list/tuple of numbers) as a tensor; TypeError naming `label`."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.device.type != "cpu":
            raise TypeError(f"{label} must be a dense CPU tensor, got a {value.layout} tensor on {value.device.type}")
        if value.numel() and (value.storage_offset() + sum((n - 1) * st for n, st in
                                                           zip(value.shape, value.stride())) + 1) \
                * value.element_size() > value.untyped_storage().nbytes():
            raise ValueError(f"{label} of shape {tuple(value.shape)} is larger than the data the file holds "
                             f"({value.untyped_storage().nbytes():,} bytes): a forged tensor")
        if any(st == 0 and n > 1 for n, st in zip(value.shape, value.stride())):
            raise ValueError(f"{label} of shape {tuple(value.shape)} is an expanded view (stride 0) of "
                             f"{value.untyped_storage().nbytes():,} bytes: save the tensor itself (.contiguous())")
        return value.detach()
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as exc:  # ragged or mixed lists
            raise TypeError(f"{label} is not a numeric array (a {type(value).__name__} that numpy cannot turn into "
                            f"one array: {one_line(exc)[:100]})") from None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{label} must be a tensor, a numpy array or a list of numbers, got {type(value).__name__}")
    if value.dtype.kind not in "biufc":
        raise TypeError(f"{label} is not a numeric array (numpy dtype {value.dtype})")
    if not value.dtype.isnative:  # big-endian data: torch.from_numpy only takes native byte order
        value = value.astype(value.dtype.newbyteorder("="))
    if value.dtype.kind == "u" and value.dtype.itemsize > 1:  # torch lacks full support for uint16/32/64
        if value.size and int(value.max()) > _INT64_MAX:
            raise TypeError(f"{label} holds values above the int64 range ({int(value.max())})")
        value = value.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(value))


def _checked(feats, pids, camids, labels: Tuple[str, str, str]):
    """(feats float32, pids int64 | None, camids int64 | None) after converting and checking;
    TypeError (a wrong type or dtype) / ValueError (a wrong shape or value) naming the field by
    its label."""
    lf, lp, lc = labels
    feats = _to_tensor(feats, lf)
    if feats.dim() != 2 or not feats.is_floating_point() or feats.is_complex():
        error = TypeError if feats.dim() == 2 else ValueError
        raise error(f"{lf} must be a 2-D float array (N, d), got {tuple(feats.shape)} {feats.dtype}")
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        raise ValueError(f"{lf} is empty, shape {tuple(feats.shape)} (need N >= 1 rows of d >= 1)")
    n = feats.shape[0]
    ids = []
    for value, label in ((pids, lp), (camids, lc)):
        if value is None:
            ids.append(None)
            continue
        value = _to_tensor(value, label)
        if value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{label} must be integers of shape ({n},) like {lf}, got {tuple(value.shape)} "
                            f"{value.dtype}")
        if value.shape != (n,):
            raise ValueError(f"{label} must be integers of shape ({n},) like {lf}, got {tuple(value.shape)} "
                             f"{value.dtype}")
        ids.append(value.long())
    if ids[1] is not None and int(ids[1].min()) < 0:
        raise ValueError(f"{lc} must be >= 0, got {int(ids[1].min())}")
    if not _all_finite(feats):
        rows = (~torch.isfinite(feats)).any(1).nonzero().squeeze(1)
        raise ValueError(f"{lf} contain NaN or Inf ({rows.numel()} rows, first row {int(rows[0])})")
    feats32 = feats.float()
    if feats.dtype != torch.float32 and not _all_finite(feats32):
        raise ValueError(f"{lf} exceed the float32 range")
    return feats32, ids[0], ids[1]


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite: min and max are finite exactly then (NaN propagates into
    both); one reduction pass, where isfinite(x).all() builds an N x d mask first (20x slower)."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


@dataclass(eq=False)
class FeatureSet:
    """Features with optional labels. feats: (N, d) float32 tensor, N >= 1, d >= 1, finite;
    pids / camids: (N,) int64 tensors (camids >= 0) or None (unlabelled). Construction takes
    tensors, numpy arrays or lists, converts them (float features to float32 when they fit its
    range, integer ids to int64; tensors keep their device) and raises TypeError / ValueError
    naming the field otherwise."""
    feats: torch.Tensor
    pids: Optional[torch.Tensor] = None
    camids: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.feats, self.pids, self.camids = _checked(self.feats, self.pids, self.camids, FIELDS)

    @classmethod
    def _from_checked(cls, feats: torch.Tensor, pids: Optional[torch.Tensor], camids: Optional[torch.Tensor]):
        """A FeatureSet of values `_checked` returned (not checked again: one pass over large files)."""
        out = cls.__new__(cls)
        out.feats, out.pids, out.camids = feats, pids, camids
        return out

    @property
    def labelled(self) -> bool:
        """Whether the set has identity labels (pids)."""
        return self.pids is not None

    def __len__(self) -> int:
        return self.feats.shape[0]

    def __repr__(self) -> str:
        labels = [k for k in ("pids", "camids") if getattr(self, k) is not None]
        return (f"FeatureSet({self.feats.shape[0]} x {self.feats.shape[1]} on {self.feats.device}, "
                f"{'labels ' + ', '.join(labels) if labels else 'unlabelled'})")


# --------------------------------------------------------------------------------------------- reading
def _suffix(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def _check_npy_header(fh, available: int, where: str) -> None:
    """The .npy header at fh: a NumPy array whose declared size fits in the `available` bytes
    after the header (a 1 KB file cannot declare a (1e12, 256) array: refused before any allocation)."""
    try:
        version = np.lib.format.read_magic(fh)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(fh)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ReIDInputError(f"{where}: not a readable .npy array: not a NumPy file "
                             f"({one_line(exc)[:120]})") from None
    if dtype.hasobject:
        return  # refused by np.load(allow_pickle=False) with its own reason
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > available - fh.tell():
        raise ReIDInputError(f"{where}: not a readable .npy array: it declares a {shape} {dtype} array ({need:,} "
                             f"bytes) but holds only {max(0, available - fh.tell()):,} bytes after its header "
                             "(truncated or forged)")


def _check_numpy_file(path: str, what: str) -> None:
    """Before np.load: a .npy file's header, or each member of a .npz archive, declares no more
    data than it holds; a file of another kind (text, gzip, ...) is named as such."""
    if _suffix(path) == ".npy":
        with open(path, "rb") as fh:
            _check_npy_header(fh, os.fstat(fh.fileno()).st_size, f"{what} {path}")
        return
    if not zipfile.is_zipfile(path):
        raise ReIDInputError(f"{what} {path}: not a readable .npz archive: not a NumPy file (no zip structure: "
                             "truncated, or text, gzip or another format named .npz)")
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as fh:
                        _check_npy_header(fh, info.file_size, f"{what} {path}, member {info.filename}")
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise ReIDInputError(f"{what} {path}: not a readable .npz archive: {one_line(exc)[:160]}") \
            from None


def _read(path: str, what: str, wanted: Iterable[str]):
    """(values {key: raw value} for the keys in `wanted` the file has, all its key names, None) of a
    dict-like file; (None, [], the array) of a file holding one array."""
    suffix = _suffix(path)
    if suffix in (".npz", ".npy"):
        path = check_input_file(path, what)
        _check_numpy_file(path, what)
        try:
            if suffix == ".npy":
                return None, [], np.load(path, allow_pickle=False)
            with np.load(path, allow_pickle=False) as archive:
                files = list(archive.files)
                return {key: archive[key] for key in files if key in wanted}, files, None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            reason = one_line(exc)[:200]
            if "allow_pickle" in reason:
                reason = "it holds Python objects (an object array), which are never unpickled from files"
            kind = ".npy array (truncated, or not written by numpy.save)" if suffix == ".npy" else \
                ".npz archive (truncated, or not written by numpy.savez)"
            raise ReIDInputError(f"{what} {path}: not a readable {kind}: {reason}") from exc
    raw = load_torch(path, what, allow_numpy=True)
    if isinstance(raw, (torch.Tensor, np.ndarray)):
        return None, [], raw
    if not isinstance(raw, dict):
        raise ReIDInputError(f"{what} {path}: expected a dict of arrays (feats, pids, camids) or one feature "
                             f"tensor, got a {type(raw).__name__}")
    return {k: v for k, v in raw.items() if k in wanted}, [str(k) for k in raw], None


def _pick(values: dict, aliases: Tuple[str, ...], what: str, path: str) -> Optional[str]:
    """The one key of `aliases` present in `values` (None when none is); two -> ReIDInputError."""
    present = [key for key in aliases if key in values]
    if len(present) > 1:
        raise ReIDInputError(f"{what} {path}: keys {' and '.join(repr(k) for k in present)} both name the same "
                             f"field ({aliases[0]}); keep one")
    return present[0] if present else None


def _side_aliases(side: str) -> Dict[str, Tuple[str, ...]]:
    """Field -> key aliases of the query ("q") or gallery ("g") set of the query + gallery layout."""
    return {"feats": QUERY_GALLERY_ALIASES[side + "f"], "pids": QUERY_GALLERY_ALIASES[side + "_pids"],
            "camids": QUERY_GALLERY_ALIASES[side + "_camids"]}


def _build(what: str, path: str, values: dict, has: List[str], aliases: Dict[str, Tuple[str, ...]],
           needed: Dict[str, bool]) -> Tuple[FeatureSet, List[str]]:
    """(FeatureSet of the keys of `aliases` found in `values`, those keys); ReIDInputError for two
    aliases of one field, a missing needed field or a bad value."""
    keys = {field: _pick(values, aliases[field], what, path) for field in FIELDS}
    missing = [field for field in FIELDS if keys[field] is None and needed[field]]
    if missing:
        wanted = ", ".join("|".join(aliases[field]) for field in missing)
        shown = sorted(has)[:12] + (["..."] if len(has) > 12 else [])  # a state_dict has hundreds
        raise ReIDInputError(f"{what} {path}: missing {wanted} (has {shown})")
    raw = [values[keys[field]] if keys[field] is not None else None for field in FIELDS]
    try:
        fs = FeatureSet._from_checked(*_checked(*raw, labels=tuple(keys[f] or f for f in FIELDS)))
    except (TypeError, ValueError) as exc:
        raise ReIDInputError(f"{what} {path}: {exc}") from None
    return fs, [k for k in keys.values() if k is not None]


def _log_ignored(what: str, path: str, has: List[str], used: Iterable[str]) -> None:
    extra = sorted(set(has) - set(used))
    if extra:
        logger.warning("%s %s: ignoring keys %s (not features or labels)", what, path, extra)


def load_features(path: str, name: str = "features", need_pids: bool = True,
                  need_camids: bool = True) -> FeatureSet:
    """Read one feature set (the module docstring lists the formats and keys). need_pids /
    need_camids False make those labels optional: None when the file has none, read and checked
    when it has them. A bare tensor / array (.npy, or torch.save of one) holds features only.
    Raises ReIDInputError (a ValueError) naming `name`, the file and the key when the file is
    unreadable or its layout or values are wrong."""
    what, path = f"{name} file", os.fspath(path)
    values, has, bare = _read(path, what, {key for aliases in ALIASES.values() for key in aliases})
    needed = {"feats": True, "pids": need_pids, "camids": need_camids}
    if bare is not None:
        labels = [field for field in ("pids", "camids") if needed[field]]
        if labels:
            raise ReIDInputError(f"{what} {path}: holds one array (features only) but {' and '.join(labels)} are "
                                 "needed: save a dict / .npz with feats, pids, camids")
        return _build(what, path, {"feats": bare}, [], {"feats": ("feats",), "pids": (), "camids": ()}, needed)[0]
    if _pick(values, ALIASES["feats"], what, path) is None and \
            set(has) & set(QUERY_GALLERY_ALIASES["qf"] + QUERY_GALLERY_ALIASES["gf"]):
        raise ReIDInputError(f"{what} {path}: holds query and gallery features together (qf / gf, torchreid's "
                             "layout), not one feature set: read it as a query + gallery file")
    fs, used = _build(what, path, values, has, ALIASES, needed)
    _log_ignored(what, path, has, used)
    return fs


def load_query_gallery(path: str, name: str = "--features", need_pids: bool = True,
                       need_camids: bool = True) -> Tuple[FeatureSet, FeatureSet]:
    """Read (query, gallery) from one file in torchreid's evaluation layout: qf, q_pids, q_camids,
    gf, g_pids, g_camids (aliases: q_feats | query_feats | query_features | query, query_pids,
    query_camids and the same for the gallery), as .pt / .pth (torch.save of a dict) or .npz.
    need_pids / need_camids as in `load_features`, for both sets. Query and gallery features must
    have the same dimension. ReIDInputError naming `name`, the file and the key otherwise."""
    what, path = f"{name} file", os.fspath(path)
    if _suffix(path) == ".npy":
        raise ReIDInputError(f"{what} {path}: a .npy file holds one array; query and gallery need a .pt / .pth "
                             "(torch.save of a dict) or .npz file with qf, gf (and q_pids, q_camids, g_pids, "
                             "g_camids)")
    values, has, bare = _read(path, what, {key for aliases in QUERY_GALLERY_ALIASES.values() for key in aliases})
    if bare is not None:
        raise ReIDInputError(f"{what} {path}: holds one array, but query and gallery are needed: save a dict / "
                             ".npz with qf, q_pids, q_camids, gf, g_pids, g_camids")
    single = [key for key in ALIASES["feats"] if key in has]
    if single and not set(has) & set(QUERY_GALLERY_ALIASES["qf"] + QUERY_GALLERY_ALIASES["gf"]):
        raise ReIDInputError(f"{what} {path}: holds one feature set ({single[0]}), not query and gallery (qf, gf): "
                             "give it as the query or the gallery file")
    needed = {"feats": True, "pids": need_pids, "camids": need_camids}
    (query, used_q), (gallery, used_g) = (_build(what, path, values, has, _side_aliases(side), needed)
                                          for side in "qg")
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise ReIDInputError(f"{what} {path}: query features ({used_q[0]}) are {query.feats.shape[1]}-d but gallery "
                             f"features ({used_g[0]}) are {gallery.feats.shape[1]}-d")
    _log_ignored(what, path, has, used_q + used_g)
    return query, gallery


def count_feature_rows(path: str, name: str = "features") -> int:
    """N of a .npy feature file, read from its header (no data is loaded)."""
    return _npy_map(path, f"{name} file").shape[0]


def load_feature_rows(path: str, start: int, stop: int, name: str = "features") -> FeatureSet:
    """Rows start..stop-1 of a .npy feature file (unlabelled), read through a memory map so a
    process loads only its own part; 0 <= start < stop <= N (see `count_feature_rows`), else
    ReIDInputError. The rows are checked like `load_features`."""
    what = f"{name} file"
    array = _npy_map(path, what)
    n = array.shape[0]
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop)) \
            or not 0 <= start < stop <= n:
        raise ReIDInputError(f"{what} {path}: rows {start!r}..{stop!r} are not a non-empty range within its {n} rows")
    try:
        return FeatureSet._from_checked(*_checked(np.array(array[start:stop]), None, None, FIELDS))
    except (TypeError, ValueError) as exc:
        raise ReIDInputError(f"{what} {path}: rows {start}..{stop - 1}: {exc}") from None


def _npy_map(path: str, what: str) -> np.ndarray:
    if _suffix(path) != ".npy":
        raise ReIDInputError(f"{what} {path}: row ranges are read from .npy files only (got {_suffix(path) or 'none'})")
    path = check_input_file(os.fspath(path), what)
    _check_numpy_file(path, what)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ReIDInputError(f"{what} {path}: not a readable .npy array (truncated, or not written by numpy.save): "
                             f"{one_line(exc)[:200]}") from exc
    if array.ndim != 2:
        raise ReIDInputError(f"{what} {path}: feats must be a 2-D float array (N, d), got {array.shape} {array.dtype}")
    return array


# --------------------------------------------------------------------------------------------- writing
def _cpu_arrays(arrays: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """CPU tensors holding exactly their own elements (torch.save of a view writes its whole storage)."""
    out = {}
    for key, value in arrays.items():
        if value is None:
            continue
        value = value.detach().cpu()
        if not value.is_contiguous() or value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone(memory_format=torch.contiguous_format)
        out[key] = value
    return out


def _write(path: str, arrays: Dict[str, torch.Tensor]) -> None:
    if _suffix(path) == ".npz":
        with atomic_write(path) as fh:
            np.savez(fh, **{k: v.numpy() for k, v in arrays.items()})
    else:
        save_torch(arrays, path)


def _check_feature_set(value, label: str) -> FeatureSet:
    if not isinstance(value, FeatureSet):
        raise TypeError(f"{label} must be a FeatureSet, got {type(value).__name__}")
    return value


def save_features(path: str, features: FeatureSet) -> str:
    """Write `features` to path atomically, the format chosen by the suffix: .npz (NumPy archive
    of feats and whichever of pids / camids it has), .npy (the features only: a labelled set is
    refused with ValueError rather than losing its labels), anything else (.pt / .pth) torch.save of
    a dict of tensors. `load_features` gives back the same set bit for bit (None labels stay None)."""
    features = _check_feature_set(features, "features")
    if _suffix(path) == ".npy":
        labels = [k for k in ("pids", "camids") if getattr(features, k) is not None]
        if labels:
            raise ValueError(f"path {path}: a .npy file holds the features only, but this set has "
                             f"{' and '.join(labels)}"
                             "; save it as .pt / .pth or .npz to keep them (or drop them: FeatureSet(features.feats))")
        with atomic_write(path) as fh:
            np.save(fh, _cpu_arrays({"feats": features.feats})["feats"].numpy(), allow_pickle=False)
        return path
    _write(path, _cpu_arrays({"feats": features.feats, "pids": features.pids, "camids": features.camids}))
    return path


def save_query_gallery(path: str, query: FeatureSet, gallery: FeatureSet) -> str:
    """Write query and gallery to one file atomically in torchreid's evaluation layout (qf, q_pids,
    q_camids, gf, g_pids, g_camids; absent labels are left out): .npz by suffix, else torch.save
    of a dict of tensors. `load_query_gallery` reads it back bit for bit. ValueError for a .npy
    path or query / gallery features of different dimensions."""
    query, gallery = _check_feature_set(query, "query"), _check_feature_set(gallery, "gallery")
    if _suffix(path) == ".npy":
        raise ValueError(f"path {path}: a .npy file holds one array; save query and gallery as .pt / .pth or .npz")
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise ValueError(f"query features are {query.feats.shape[1]}-d but gallery features "
                         f"{gallery.feats.shape[1]}-d")
    _write(path, _cpu_arrays({"qf": query.feats, "q_pids": query.pids, "q_camids": query.camids,
                              "gf": gallery.feats, "g_pids": gallery.pids, "g_camids": gallery.camids}))
    return path
