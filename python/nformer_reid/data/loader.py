"""Image transforms, the PK identity sampler and data loaders (reid-strong-baseline recipe).
Needs torchvision (the `[reid]` extra)."""
import random
from collections import defaultdict
from typing import List, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from nformer_reid.config import DataOptions, TrainConfig
from nformer_reid.utils.checks import as_float, as_int
from nformer_reid.utils.deps import import_torchvision

T = import_torchvision().transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size(size) -> Tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    return as_int(size[0], "size[0]", minimum=1), as_int(size[1], "size[1]", minimum=1)


def build_transforms(size: Tuple[int, int] = DataOptions.size, is_train: bool = True, flip_p: float = 0.5,
                     padding: int = 10, erase_p: float = 0.5):
    """Train: resize, flip, pad + random crop, normalise, random erasing; test: resize, normalise."""
    size = _size(size)
    flip_p, erase_p = as_float(flip_p, "flip_p", 0, 1), as_float(erase_p, "erase_p", 0, 1)
    padding = as_int(padding, "padding", minimum=0)
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if not is_train:
        return T.Compose([T.Resize(size), T.ToTensor(), normalize])
    # Erased patches are filled with 0 after normalisation, i.e. the ImageNet mean colour.
    return T.Compose([T.Resize(size), T.RandomHorizontalFlip(flip_p), T.Pad(padding), T.RandomCrop(size),
                      T.ToTensor(), normalize, T.RandomErasing(erase_p, scale=(0.02, 0.4), ratio=(0.3, 3.33))])


class ImageDataset(Dataset):
    """(path, pid, camid) items -> (image tensor, pid, camid)."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], transform=None):
        self.items, self.transform = list(items), transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, pid, camid = self.items[index]
        img = Image.open(path).convert("RGB")
        return (self.transform(img) if self.transform else img), pid, camid


class RandomIdentitySampler(Sampler):
    """PK sampling: batches of P identities x K instances (identities with < K images are
    sampled with replacement). One epoch uses each identity's images about once."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], batch_size: int = TrainConfig.batch_size,
                 num_instances: int = TrainConfig.num_instances, seed: int = 0):
        batch_size = as_int(batch_size, "batch_size", minimum=1)
        num_instances = as_int(num_instances, "num_instances", minimum=1)
        seed = as_int(seed, "seed", minimum=0)
        if batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_instances ({num_instances})")
        self.num_instances, self.pids_per_batch = num_instances, batch_size // num_instances
        self.batch_size = batch_size
        self.index_of = defaultdict(list)
        for i, (_, pid, _) in enumerate(items):
            self.index_of[pid].append(i)
        if len(self.index_of) < self.pids_per_batch:
            raise ValueError(f"{len(self.index_of)} identities cannot fill batches of {self.pids_per_batch} identities")
        self.rng = random.Random(seed)
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances for v in self.index_of.values())

    def __iter__(self):
        chunks = {}
        for pid, idxs in self.index_of.items():
            idxs = list(idxs) if len(idxs) >= self.num_instances else self.rng.choices(idxs, k=self.num_instances)
            self.rng.shuffle(idxs)
            n = len(idxs) // self.num_instances * self.num_instances
            chunks[pid] = [idxs[i:i + self.num_instances] for i in range(0, n, self.num_instances)]
        available = [p for p in chunks if chunks[p]]
        out: List[int] = []
        while len(available) >= self.pids_per_batch:
            for pid in self.rng.sample(available, self.pids_per_batch):
                out.extend(chunks[pid].pop())
                if not chunks[pid]:
                    available.remove(pid)
        return iter(out)

    def __len__(self):
        return self.length


def build_train_loader(items, size=DataOptions.size, batch_size: int = TrainConfig.batch_size,
                       num_instances: int = TrainConfig.num_instances, num_workers: int = DataOptions.workers,
                       seed: int = 0) -> DataLoader:
    num_workers = as_int(num_workers, "num_workers", minimum=0)
    sampler = RandomIdentitySampler(items, batch_size, num_instances, seed)
    return DataLoader(ImageDataset(items, build_transforms(size, True)), batch_size=sampler.batch_size,
                      sampler=sampler,
                      num_workers=num_workers, drop_last=True, pin_memory=torch.cuda.is_available())


def build_test_loader(items, size=DataOptions.size, batch_size: int = DataOptions.test_batch,
                      num_workers: int = DataOptions.workers) -> DataLoader:
    batch_size, num_workers = as_int(batch_size, "batch_size", minimum=1), as_int(num_workers, "num_workers", minimum=0)
    return DataLoader(ImageDataset(items, build_transforms(size, False)), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())
