"""Synthetic data that needs no download.

make_synthetic_market: a small image dataset in the Market-1501 folder layout (identity =
clothing colours + stripe pattern, camera = colour tint / brightness, per-image noise and jitter),
so the whole image pipeline (parser, loader, backbone, evaluation) runs anywhere.

make_feature_benchmark: Re-ID-like feature sets for the NFormer stage. Identities form families
(hard negatives share a family centre), every camera adds a shared bias, every (identity, camera)
a view offset, every image strong independent noise. A single feature is a noisy vote; the
reciprocal neighbours of an image are mostly other images of its identity, so aggregating them
(what NFormer learns) removes much of the noise.
"""
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from nformer_reid.data.features import FeatureSet
from nformer_reid.utils.checks import as_float, as_int
from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.io import atomic_write


def _person_image(rng, identity: Dict, tint: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x 3 uint8: background, head, torso (colour + stripes), legs, with camera tint and noise."""
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = identity["background"] * 0.3 + rng.uniform(0.25, 0.55)
    shift = int(rng.integers(-width // 8, width // 8 + 1))
    x0, x1 = max(0, width // 4 + shift), min(width, 3 * width // 4 + shift)
    head, torso, legs = int(0.18 * height), int(0.55 * height), height
    img[int(0.04 * height):head, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4] = identity["skin"]
    rows = np.arange(head, torso)[:, None]
    stripes = (np.sin(rows * identity["freq"] + identity["phase"]) > 0)[..., None]
    img[head:torso, x0:x1] = np.where(stripes, identity["top"], identity["top2"])
    img[torso:legs, x0 + 1:x1 - 1] = identity["bottom"]
    img = img * tint[None, None, :3] + tint[3]
    img += rng.normal(0, 0.06, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_synthetic_market(root: str, num_train_ids: int = 16, num_test_ids: int = 12, num_cams: int = 4,
                          images_per_cam: int = 2, num_distractors: int = 6, num_junk: int = 4,
                          size: Tuple[int, int] = (64, 32), seed: int = 0, overwrite: bool = False) -> str:
    """Write a Market-1501-layout dataset under root (bounding_box_train, query, bounding_box_test).

    Train ids 1..num_train_ids, test ids after them; each test identity has one query image in
    each of two cameras and images_per_cam gallery images per camera; the gallery also holds
    distractors (pid 0) and junk (pid -1, dropped by the parser). Returns root.
    Existing files are kept unless overwrite (a marker records the arguments); folders holding
    images without that marker (a real dataset) are never cleared: ReIDInputError.
    """
    from PIL import Image

    num_train_ids, num_test_ids, num_cams, images_per_cam = (as_int(v, name, minimum=1) for v, name in (
        (num_train_ids, "num_train_ids"), (num_test_ids, "num_test_ids"), (num_cams, "num_cams"),
        (images_per_cam, "images_per_cam")))
    num_distractors, num_junk = as_int(num_distractors, "num_distractors", 0), as_int(num_junk, "num_junk", 0)
    seed = as_int(seed, "seed", minimum=0)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    size = (as_int(size[0], "size[0]", minimum=8), as_int(size[1], "size[1]", minimum=8))
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise TypeError(f"root must be a folder path, got {root!r}")
    root = os.fspath(root)
    height, width = size
    marker = os.path.join(root, "SYNTHETIC")
    signature = repr((num_train_ids, num_test_ids, num_cams, images_per_cam, num_distractors, num_junk, size, seed))
    if os.path.exists(root) and not os.path.isdir(root):
        raise ReIDInputError(f"synthetic dataset root {root} exists and is not a folder")
    if os.path.isfile(marker):
        with open(marker) as fh:
            if not overwrite and fh.read() == signature:
                return root
    elif any(os.path.isdir(os.path.join(root, name)) and os.listdir(os.path.join(root, name))
             for name in ("bounding_box_train", "query", "bounding_box_test")):
        raise ReIDInputError(f"{root} holds image folders that this generator did not write (no SYNTHETIC marker): "
                             "refusing to replace them; give another root for the synthetic dataset")
    rng = np.random.default_rng(seed)
    tints = [np.concatenate([rng.uniform(0.75, 1.25, 3), [rng.uniform(-0.08, 0.08)]]) for _ in range(num_cams)]

    def new_identity():
        return {k: rng.uniform(0, 1, 3) for k in ("background", "skin", "top", "top2", "bottom")} | {
            "freq": rng.uniform(0.3, 1.6), "phase": rng.uniform(0, 6.3)}

    folders = {name: os.path.join(root, name) for name in ("bounding_box_train", "query", "bounding_box_test")}
    if os.path.isfile(marker):
        os.remove(marker)  # an interrupted regeneration is redone, never taken for a finished one
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):
            os.remove(os.path.join(folder, old))
    frame = 0

    def save(folder, pid, cam, identity):
        nonlocal frame
        frame += 1
        name = f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.jpg" if pid >= 0 else f"-1_c{cam + 1}s1_{frame:06d}_00.jpg"
        with atomic_write(os.path.join(folder, name)) as fh:
            Image.fromarray(_person_image(rng, identity, tints[cam], height, width)).save(fh, format="JPEG")

    for pid in range(1, num_train_ids + 1):
        identity = new_identity()
        for cam in rng.choice(num_cams, size=min(num_cams, 3), replace=False):
            for _ in range(images_per_cam):
                save(folders["bounding_box_train"], pid, int(cam), identity)
    for pid in range(num_train_ids + 1, num_train_ids + num_test_ids + 1):
        identity = new_identity()
        cams = rng.choice(num_cams, size=min(num_cams, 3), replace=False)
        for cam in cams[:2]:
            save(folders["query"], pid, int(cam), identity)
        for cam in cams:
            for _ in range(images_per_cam):
                save(folders["bounding_box_test"], pid, int(cam), identity)
    for pid, count in ((0, num_distractors), (-1, num_junk)):
        for _ in range(count):
            save(folders["bounding_box_test"], pid, int(rng.integers(num_cams)), new_identity())
    with atomic_write(marker, "w") as fh:
        fh.write(signature)
    return root


@dataclass
class FeatureBenchmark:
    train: FeatureSet
    query: FeatureSet
    gallery: FeatureSet


def make_feature_benchmark(num_train_ids: int = 400, num_test_ids: int = 300, num_cams: int = 6,
                           images_per_cam: int = 3, cams_per_id: int = 4, dim: int = 256,
                           family_size: int = 4, family_spread: float = 0.8, cam_bias: float = 0.4,
                           view_noise: float = 0.45, noise: float = 1.0, num_distractors: int = 500,
                           seed: int = 0, generator: Optional[torch.Generator] = None) -> FeatureBenchmark:
    """Synthetic Re-ID features: identities x cameras with camera bias, hard negatives, noise.

    feature = normalise(id_centre + cam_bias_c + view_(id,c) + noise_image), where id_centre =
    normalise(family_centre + family_spread * own direction) (identities of a family are hard
    negatives), and the three perturbations have expected norms cam_bias, view_noise, noise.
    Each identity appears in cams_per_id of num_cams cameras with images_per_cam images each.
    Test: per identity one query image in each of two cameras, the rest in the gallery, plus
    num_distractors distractor images (pid 0). Train pids are 0..num_train_ids-1; test pids
    start at 1. Camera biases are shared by train and test (same "camera network").
    """
    num_train_ids, num_test_ids, num_cams, images_per_cam, dim, family_size = (as_int(v, name, minimum=1) for v, name in (
        (num_train_ids, "num_train_ids"), (num_test_ids, "num_test_ids"), (num_cams, "num_cams"),
        (images_per_cam, "images_per_cam"), (dim, "dim"), (family_size, "family_size")))
    cams_per_id = as_int(cams_per_id, "cams_per_id", minimum=2, maximum=num_cams)
    num_distractors = as_int(num_distractors, "num_distractors", minimum=0)
    family_spread, cam_bias, view_noise, noise = (as_float(v, name, minimum=0) for v, name in (
        (family_spread, "family_spread"), (cam_bias, "cam_bias"), (view_noise, "view_noise"), (noise, "noise")))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    g = generator if generator is not None else torch.Generator().manual_seed(as_int(seed, "seed", minimum=0))

    def unit(*shape):
        v = torch.randn(*shape, dim, generator=g)
        return v / v.norm(dim=-1, keepdim=True)

    cams = unit(num_cams) * cam_bias

    def identities(n):
        families = unit((n + family_size - 1) // family_size).repeat_interleave(family_size, 0)[:n]
        return torch.nn.functional.normalize(families + family_spread * unit(n), dim=-1)

    def sample(centres, first_pid):
        feats, pids, camids = [], [], []
        for i in range(centres.shape[0]):
            for cam in torch.randperm(num_cams, generator=g)[:cams_per_id].tolist():
                view = centres[i] + cams[cam] + view_noise * unit()
                feats.append(view + noise * unit(images_per_cam))
                pids += [first_pid + i] * images_per_cam
                camids += [cam] * images_per_cam
        return (torch.nn.functional.normalize(torch.cat(feats), dim=-1), torch.tensor(pids),
                torch.tensor(camids))

    train = FeatureSet(*sample(identities(num_train_ids), 0))
    feats, pids, camids = sample(identities(num_test_ids), 1)
    # One query per (identity, first two cameras): the first image of each of those views.
    first_of_view = torch.zeros_like(pids, dtype=torch.bool)
    first_of_view[::images_per_cam] = True
    view_rank = torch.zeros_like(pids)
    view_rank[::images_per_cam] = torch.arange(pids.numel() // images_per_cam) % cams_per_id
    is_query = first_of_view & (view_rank < 2)
    query = FeatureSet(feats[is_query], pids[is_query], camids[is_query])
    d_cams = torch.randint(num_cams, (num_distractors,), generator=g)
    distract = torch.nn.functional.normalize(identities(num_distractors) + cams[d_cams]
                                             + noise * unit(num_distractors), dim=-1)
    gallery = FeatureSet(torch.cat([feats[~is_query], distract]),
                         torch.cat([pids[~is_query], torch.zeros(num_distractors, dtype=torch.int64)]),
                         torch.cat([camids[~is_query], d_cams]))
    return FeatureBenchmark(train, query, gallery)
