"""Image transforms, the PK identity sampler and data loaders (reid-strong-baseline recipe).
Needs torchvision (the `[reid]` extra)."""
import random
from collections import defaultdict
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from nformer_reid.config import DataOptions, TrainConfig
from nformer_reid.utils.checks import as_float, as_int
from nformer_reid.utils.deps import import_torchvision
from nformer_reid.utils.errors import one_line

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


def _process_group() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RandomIdentitySampler(Sampler):
    """PK sampling: batches of P identities x K instances (identities with < K images are
    sampled with replacement). One epoch uses each identity's images about once.

    Under a process group of W ranks (rank / world_size; None: the default group's, as
    torch's DistributedSampler) every rank draws the same global batches from `seed` and yields
    its contiguous share of each: identities [r * P / W, (r + 1) * P / W) of the batch, i.e.
    local_batch_size = batch_size / W indices, so the ranks' shares in rank order are exactly
    the single-process batch. P must be a multiple of W (ValueError otherwise). state_dict() /
    load_state_dict() hold the RNG between epochs (the same on every rank, whatever W): a resumed
    run draws the batches the uninterrupted run would have drawn."""

    def __init__(self, items: Sequence[Tuple[str, int, int]], batch_size: int = TrainConfig.batch_size,
                 num_instances: int = TrainConfig.num_instances, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        batch_size = as_int(batch_size, "batch_size", minimum=1)
        num_instances = as_int(num_instances, "num_instances", minimum=1)
        seed = as_int(seed, "seed", minimum=0)
        if batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of num_instances ({num_instances})")
        group_rank, group_world = _process_group()
        world_size = group_world if world_size is None else as_int(world_size, "world_size", minimum=1)
        rank = (group_rank if world_size == group_world else 0) if rank is None else as_int(rank, "rank", minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank ({rank}) must be smaller than world_size ({world_size})")
        self.num_instances, self.pids_per_batch = num_instances, batch_size // num_instances
        if self.pids_per_batch % world_size:
            raise ValueError(f"the {self.pids_per_batch} identities of a batch (batch_size {batch_size} / "
                             f"num_instances {num_instances}) must split evenly over {world_size} processes: "
                             f"choose batch_size / num_instances as a multiple of {world_size}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.index_of = defaultdict(list)
        for i, (_, pid, _) in enumerate(items):
            self.index_of[pid].append(i)
        if len(self.index_of) < self.pids_per_batch:
            raise ValueError(f"{len(self.index_of)} identities cannot fill batches of {self.pids_per_batch} identities")
        self.rng = random.Random(seed)
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances for v in self.index_of.values())

    def global_indices(self) -> List[int]:
        """The next epoch's indices of all ranks (whole global batches, in order); advances the RNG."""
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
        return out

    def __iter__(self):
        out = self.global_indices()
        if self.world_size == 1:
            return iter(out)
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        return iter([i for start in range(0, len(out), self.batch_size) for i in out[start + lo:start + hi]])

    def __len__(self):
        """This rank's indices per epoch at most (the single process's count / world_size)."""
        return self.length // self.world_size

    def state_dict(self) -> dict:
        """{"rng": the RNG state} (plain ints: a checkpoint loads it with weights_only=True)."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state) -> None:
        """Restore a state_dict(); ValueError when it is not one."""
        try:
            version, internal, gauss = state["rng"]
            self.rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a RandomIdentitySampler state: {one_line(exc)[:120]}") from None


def build_train_loader(items, size=DataOptions.size, batch_size: int = TrainConfig.batch_size,
                       num_instances: int = TrainConfig.num_instances, num_workers: int = DataOptions.workers,
                       seed: int = 0, augment: bool = True, rank: Optional[int] = None,
                       world_size: Optional[int] = None) -> DataLoader:
    """PK batches of `items` (RandomIdentitySampler): under a process group each rank's loader
    yields its share (batch_size / world_size images) of every global batch of batch_size.
    augment=False: the test transforms (resize, normalise), e.g. for reproducible runs."""
    num_workers = as_int(num_workers, "num_workers", minimum=0)
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be True or False, got {augment!r}")
    sampler = RandomIdentitySampler(items, batch_size, num_instances, seed, rank, world_size)
    return DataLoader(ImageDataset(items, build_transforms(size, augment)), batch_size=sampler.local_batch_size,
                      sampler=sampler,
                      num_workers=num_workers, drop_last=True, pin_memory=torch.cuda.is_available())


def build_test_loader(items, size=DataOptions.size, batch_size: int = DataOptions.test_batch,
                      num_workers: int = DataOptions.workers) -> DataLoader:
    batch_size, num_workers = as_int(batch_size, "batch_size", minimum=1), as_int(num_workers, "num_workers", minimum=0)
    return DataLoader(ImageDataset(items, build_transforms(size, False)), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())
