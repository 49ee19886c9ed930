"""Parsers of the standard Re-ID dataset layouts (as torchreid / reid-strong-baseline read them).

Every dataset exposes train / query / gallery lists of (image_path, pid, camid) with 0-based
camids. Train pids are relabelled to 0..C-1 (classifier targets). Query/gallery pids are the
dataset's own ids, unchanged (MSMT17's test ids start at 0, Market-1501's distractors are 0):
evaluate_rank treats no id specially, so a distractor simply matches no query. Market-style junk
images (pid -1 in the file name) are dropped here, at parse time, as torchreid does.

Checks, the same for every dataset: only regular files (symlinks followed; folders, broken links
and other names skipped) with an image extension count as images; a file name or list line that
does not parse, a pid or camera id outside the dataset's range, and a listed image that is not a
regular file are errors (DatasetLayoutError naming the file, and the line for list files).
"""
import logging
import os
import re
from typing import Dict, List, Tuple

import numpy as np

from nformer_reid.utils.errors import ReIDInputError, one_line

Item = Tuple[str, int, int]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
logger = logging.getLogger(__name__)


class DatasetLayoutError(FileNotFoundError, ReIDInputError):
    """The folder does not have the layout the dataset parser expects (or a file in it is malformed)."""


class ReIDDataset:
    """train / query / gallery lists of (path, pid, camid)."""

    name = "reid"

    def __init__(self, train: List[Item], query: List[Item], gallery: List[Item], root: str = ""):
        self.train, self.query, self.gallery, self.root = train, query, gallery, root

    @staticmethod
    def subset_info(items: List[Item]) -> Tuple[int, int, int]:
        """(#ids, #images, #cameras)."""
        return len({p for _, p, _ in items}), len(items), len({c for _, _, c in items})

    @property
    def num_train_pids(self) -> int:
        return self.subset_info(self.train)[0]

    @property
    def num_train_cams(self) -> int:
        return self.subset_info(self.train)[2]

    def statistics_table(self) -> str:
        lines = [f"=> Loaded {self.name}", "  ----------------------------------------",
                 "  subset   | # ids | # images | # cameras", "  ----------------------------------------"]
        for label, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            ids, imgs, cams = self.subset_info(items)
            lines.append(f"  {label:<8} | {ids:5d} | {imgs:8d} | {cams:9d}")
        lines.append("  ----------------------------------------")
        return "\n".join(lines)

    def log_statistics(self) -> None:
        logger.info("%s", self.statistics_table())


def _relabel(items: List[Item]) -> List[Item]:
    pid2label = {pid: i for i, pid in enumerate(sorted({p for _, p, _ in items}))}
    return [(path, pid2label[pid], cam) for path, pid, cam in items]


def _root(root) -> str:
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise TypeError(f"root must be a folder path, got {root!r}")
    return os.path.expanduser(os.fspath(root))


def _resolve_dir(root: str, candidates: Tuple[str, ...], required: Tuple[str, ...], what: str,
                 layout: str) -> str:
    """root itself, or root/<one of candidates>, whichever holds all `required` entries."""
    root = _root(root)
    for base in (root,) + tuple(os.path.join(root, c) for c in candidates):
        if all(os.path.exists(os.path.join(base, r)) for r in required):
            return base
    raise DatasetLayoutError(
        f"{what} not found under {root!r}. Expected the layout\n{layout}\n"
        f"either at {root!r} itself or in a subfolder named one of {list(candidates)}.")


def _images(folder: str) -> List[str]:
    """The regular files (symlinks followed) of folder with an image extension, sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DatasetLayoutError(f"cannot list {folder}: {exc.strerror or exc}") from None
    return sorted(e.path for e in entries if e.name.lower().endswith(IMAGE_EXTS) and os.path.isfile(e.path))


def _check_listed_images(name: str, items: List[Item], source: str) -> None:
    """DatasetLayoutError naming the first listed image that is not a regular image file."""
    bad = [p for p, _, _ in items if not (p.lower().endswith(IMAGE_EXTS) and os.path.isfile(p))]
    if bad:
        raise DatasetLayoutError(f"{name}: image {bad[0]} listed in {source} is missing or not a regular image file"
                                 f"{f' ({len(bad)} such entries)' if len(bad) > 1 else ''}")


class _FolderDataset(ReIDDataset):
    """Market-1501-style folders: file names <pid>_c<cam>..., pid -1 = junk (dropped)."""

    folder_names: Tuple[str, ...] = ()
    num_cams = 0
    max_pid = 0
    pattern = re.compile(r"([-\d]+)_c(\d+)")
    layout = ("  <dataset>/bounding_box_train/0002_c1s1_000451_03.jpg ...\n"
              "  <dataset>/query/0001_c1s1_001051_00.jpg ...\n"
              "  <dataset>/bounding_box_test/0001_c1s1_000151_01.jpg ... (-1_* junk, 0000_* distractors)")

    def __init__(self, root: str, verbose: bool = True):
        base = _resolve_dir(root, self.folder_names, ("bounding_box_train", "query", "bounding_box_test"),
                            self.name, self.layout)
        train = self._parse(os.path.join(base, "bounding_box_train"))
        query = self._parse(os.path.join(base, "query"))
        gallery = self._parse(os.path.join(base, "bounding_box_test"))
        super().__init__(_relabel(train), query, gallery, base)
        if verbose:
            self.log_statistics()

    def _parse(self, folder: str) -> List[Item]:
        items = []
        paths = _images(folder)
        for path in paths:
            m = self.pattern.search(os.path.basename(path))
            if m is not None and not re.fullmatch(r"-?\d+", m.group(1)):
                m = None
            if m is None:
                raise DatasetLayoutError(f"{self.name}: file name {os.path.basename(path)!r} in {folder} does "
                                         f"not match '<pid>_c<cam>...'; expected the layout\n{self.layout}")
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:
                continue  # junk images are ignored (torchreid / fast-reid convention)
            if not (0 <= pid <= self.max_pid and 1 <= cam <= self.num_cams):
                raise DatasetLayoutError(f"{self.name}: {os.path.basename(path)!r} has pid {pid} / camera {cam} "
                                         f"outside [0, {self.max_pid}] / [1, {self.num_cams}]")
            items.append((path, pid, cam - 1))
        if not items:
            raise DatasetLayoutError(f"{self.name}: no images in {folder}; expected the layout\n{self.layout}")
        return items


class Market1501(_FolderDataset):
    """Market-1501 (Zheng et al. ICCV 2015): 751 train ids, 750 test ids, 6 cameras."""

    name = "Market1501"
    folder_names = ("Market-1501-v15.09.15", "market1501", "Market-1501")
    num_cams = 6
    max_pid = 1501


class DukeMTMCreID(_FolderDataset):
    """DukeMTMC-reID (Zheng et al. ICCV 2017): 702 train ids, 1110 test ids, 8 cameras."""

    name = "DukeMTMC-reID"
    folder_names = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid")
    num_cams = 8
    max_pid = 9999


class MSMT17(ReIDDataset):
    """MSMT17 (Wei et al. CVPR 2018) from its list files; 15 cameras.

    train = list_train + list_val (torchreid's default); query/gallery from list_query /
    list_gallery. The test list pids restart at 0 and are a different id space from train; they are
    kept as the lists give them (0 is an ordinary identity).
    """

    name = "MSMT17"
    layout = ("  <dataset>/MSMT17_V1/{train,test}/<pid>/<pid>_<n>_<cam>_...jpg\n"
              "  <dataset>/MSMT17_V1/list_{train,val,query,gallery}.txt   ('<relative path> <pid>' per line)\n"
              "  (or MSMT17_V2 with mask_train_v2 / mask_test_v2)")

    def __init__(self, root: str, verbose: bool = True):
        root = _root(root)
        base = train_dir = test_dir = None
        for version, tr, te in (("MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2")):
            for cand in (root, os.path.join(root, version), os.path.join(root, "msmt17", version)):
                if os.path.isdir(os.path.join(cand, tr)) and os.path.isdir(os.path.join(cand, te)):
                    base, train_dir, test_dir = cand, os.path.join(cand, tr), os.path.join(cand, te)
                    break
            if base:
                break
        if base is None:
            raise DatasetLayoutError(f"MSMT17 not found under {root!r}. Expected the layout\n{self.layout}")
        lists = {}
        for split in ("train", "val", "query", "gallery"):
            path = os.path.join(base, f"list_{split}.txt")
            if not os.path.isfile(path):
                raise DatasetLayoutError(f"MSMT17: missing {path}. Expected the layout\n{self.layout}")
            lists[split] = path
        train = self._parse(train_dir, lists["train"]) + self._parse(train_dir, lists["val"])
        query = self._parse(test_dir, lists["query"])
        gallery = self._parse(test_dir, lists["gallery"])
        super().__init__(_relabel(train), query, gallery, base)
        if verbose:
            self.log_statistics()

    num_cams = 15

    @classmethod
    def _parse(cls, folder: str, list_path: str) -> List[Item]:
        items = []
        try:
            with open(list_path, encoding="utf-8") as fh:
                lines = list(fh)
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetLayoutError(f"MSMT17: cannot read {list_path}: {exc}") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                rel, pid = parts[0], int(parts[1])
                cam = int(os.path.basename(rel).split("_")[2])
            except (IndexError, ValueError) as exc:
                raise DatasetLayoutError(f"MSMT17: {list_path}:{lineno}: expected '<pid>/<pid>_<n>_<cam>_....jpg "
                                         f"<pid>', got {line.strip()!r}") from exc
            if pid < 0 or not 1 <= cam <= cls.num_cams:
                raise DatasetLayoutError(f"MSMT17: {list_path}:{lineno}: {rel} has pid {pid} / camera {cam} outside "
                                         f"[0, ...) / [1, {cls.num_cams}]")
            items.append((os.path.join(folder, rel), pid, cam - 1))
        _check_listed_images("MSMT17", items, list_path)
        return items


class CUHK03(ReIDDataset):
    """CUHK03 with the new protocol of Zhong et al. CVPR 2017 (767 train / 700 test ids).

    Images come from images_labeled/ or images_detected/ (extracted from cuhk-03.mat as torchreid
    does); the split from cuhk03_new_protocol_config_{labeled,detected}.mat (read with scipy).
    """

    name = "CUHK03"
    layout = ("  <dataset>/images_labeled/1_001_1_01.png ...  (and/or images_detected/)\n"
              "  <dataset>/cuhk03_new_protocol_config_labeled.mat  (and/or ..._detected.mat)")

    def __init__(self, root: str, subset: str = "labeled", verbose: bool = True):
        if subset not in ("labeled", "detected"):
            raise ValueError(f"subset must be 'labeled' or 'detected', got {subset!r}")
        self.name = f"CUHK03-{subset}"
        split_name = f"cuhk03_new_protocol_config_{subset}.mat"
        base = _resolve_dir(root, ("cuhk03", "CUHK03", "cuhk03_release"), (f"images_{subset}", split_name),
                            self.name, self.layout)
        try:
            from scipy.io import loadmat
        except ImportError as exc:
            from nformer_reid.utils.deps import MissingDependency

            raise MissingDependency("scipy is not installed; reading the CUHK03 split files needs it: pip install "
                                    "scipy") from exc
        try:
            split = loadmat(os.path.join(base, split_name))
        except Exception as exc:  # noqa: BLE001  (a damaged file raises zlib, struct, MatReadError, ...)
            raise DatasetLayoutError(f"{self.name}: {os.path.join(base, split_name)} is not a readable .mat file: "
                                     f"{one_line(exc)[:160]}") from None
        missing = [k for k in ("train_idx", "query_idx", "gallery_idx", "labels", "filelist") if k not in split]
        if missing:
            raise DatasetLayoutError(f"{self.name}: {split_name} lacks {missing}; is it the new-protocol config?")
        img_dir = os.path.join(base, f"images_{subset}")

        def numbers(key):
            try:
                return np.asarray(split[key], dtype=np.int64).flatten()
            except (TypeError, ValueError, OverflowError):
                raise DatasetLayoutError(f"{self.name}: {split_name}: {key} does not hold integers") from None

        labels = numbers("labels")
        names = [str(entry[0]) if not isinstance(entry, str) else entry for entry in split["filelist"].flatten()]

        if len(labels) != len(names):
            raise DatasetLayoutError(f"{self.name}: {split_name} has {len(labels)} labels for {len(names)} files")

        def items(key):
            out = []
            for i in numbers(key):
                if not 1 <= int(i) <= len(names):  # MATLAB indices are 1-based
                    raise DatasetLayoutError(f"{self.name}: {split_name}: {key} holds index {int(i)} outside "
                                             f"[1, {len(names)}]")
                name = names[int(i) - 1]
                try:
                    cam = int(name.split("_")[2])
                except (IndexError, ValueError):
                    raise DatasetLayoutError(f"{self.name}: {split_name}: file name {name!r} does not match "
                                             "'<campair>_<pid>_<cam>_<n>.png'") from None
                if cam not in (1, 2):
                    raise DatasetLayoutError(f"{self.name}: {split_name}: {name!r} has camera {cam} outside [1, 2]")
                out.append((os.path.join(img_dir, name), int(labels[int(i) - 1]), cam - 1))
            return out

        train, query, gallery = items("train_idx"), items("query_idx"), items("gallery_idx")
        for part in (train, query, gallery):
            _check_listed_images(self.name, part, split_name)
        if not (train and query and gallery):
            raise DatasetLayoutError(f"{self.name}: {split_name} leaves a split empty (train {len(train)}, query "
                                     f"{len(query)}, gallery {len(gallery)})")
        super().__init__(_relabel(train), query, gallery, base)
        if verbose:
            self.log_statistics()


DATASETS: Dict[str, type] = {
    "market1501": Market1501,
    "dukemtmcreid": DukeMTMCreID,
    "msmt17": MSMT17,
    "cuhk03_labeled": CUHK03,
    "cuhk03_detected": CUHK03,
}


def build_dataset(name: str, root: str, verbose: bool = True) -> ReIDDataset:
    """Dataset by name: market1501, dukemtmcreid, msmt17, cuhk03_labeled, cuhk03_detected."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a dataset name (str), got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    for known, cls in DATASETS.items():
        if known.replace("_", "") == key:
            if cls is CUHK03:
                return CUHK03(root, subset=known.split("_")[1], verbose=verbose)
            return cls(root, verbose=verbose)
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (and 'synthetic')")
