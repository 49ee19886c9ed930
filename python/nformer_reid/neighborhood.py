"""Neighbourhood-sampled feature sequences for NFormer training (official recipe).

Each sequence: a random centre, the int(L * (1 + u)) features nearest to it (u ~ U[0,1), cosine),
L of those drawn at random and shuffled; L = 7000 and 2 sequences per batch in the official code.
Never an M x M matrix. Two ways to get the neighbour prefixes (same result):
  "centres" (default): per batch, top-k of the centres' cosine similarities against all M
      features, O(batch * M) memory. An official epoch (M // 60 batches of 2) costs M^2 d / 30
      multiply-adds, less than one all-pairs pass.
  "knn": nk.knn over all M features with k = min(M, 2L), computed once (O(M * 2L) int64) and
      reused by every epoch; worth it for many epochs over a set whose table fits in memory.
      knn_precision is nk.knn's precision (auto / exact / certified: the same neighbours).

Under a process group (rank r of W) every rank draws the same global batch of batch_size
sequences from the same generator and `sample` returns only its contiguous share, sequences
[r * B / W, (r + 1) * B / W): the shares in rank order are the single process's batch, and only
the share's neighbour pools are computed. batch_size must be a multiple of W.
"""
from typing import Optional, Tuple

import torch

import nformer_kernels as nk
from nformer_reid.config import KnnOptions
from nformer_reid.utils.checks import as_int, as_tensor


class NeighborhoodSampler:
    def __init__(self, feats: torch.Tensor, pids: torch.Tensor, seq_len: int = 7000, batch_size: int = 2,
                 strategy: str = "centres", generator: Optional[torch.Generator] = None,
                 knn_precision: str = KnnOptions.knn_precision, rank: int = 0, world_size: int = 1):
        feats, pids = as_tensor(feats, "feats"), as_tensor(pids, "pids")
        seq_len, batch_size = as_int(seq_len, "seq_len"), as_int(batch_size, "batch_size")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not feats.is_floating_point() or pids.is_floating_point() or pids.dtype == torch.bool:
            raise TypeError(f"feats must be floating point and pids integers, got {feats.dtype} and {pids.dtype}")
        if feats.dim() != 2 or pids.shape != feats.shape[:1] or feats.shape[0] < 2:
            raise ValueError(f"feats must be (M,d) with M >= 2 and pids (M,), got {tuple(feats.shape)} and "
                             f"{tuple(pids.shape)}")
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("feats contains NaN or Inf")
        if strategy not in ("knn", "centres"):
            raise ValueError(f"strategy must be 'knn' or 'centres', got {strategy!r}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        world_size = as_int(world_size, "world_size", minimum=1)
        rank = as_int(rank, "rank", minimum=0, maximum=world_size - 1)
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size} sequences) must be a multiple of the number of processes "
                             f"({world_size}): every rank takes an equal share of each batch")
        self.rank, self.world_size, self.local_batch_size = rank, world_size, batch_size // world_size
        self.feats = torch.nn.functional.normalize(feats.float(), dim=1)
        self.pids = pids
        self.num = feats.shape[0]
        self.seq_len = min(seq_len, self.num)
        self.pool_max = min(self.num, 2 * self.seq_len)
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.strategy = strategy
        self.neighbors = (nk.knn(self.feats, self.pool_max, precision=knn_precision) if strategy == "knn"
                          else None)

    def __len__(self):
        """Batches per epoch: M // 30 sequences, as the official NFormerDataset."""
        return max(1, self.num // 30 // self.batch_size)

    def _pool(self, centres: torch.Tensor) -> torch.Tensor:
        if self.neighbors is not None:
            return self.neighbors[centres.to(self.neighbors.device)]
        sims = self.feats[centres.to(self.feats.device)] @ self.feats.T
        return sims.topk(self.pool_max, dim=1).indices

    def sample(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(feats (B, L, d), pids (B, L)) for one batch; B = local_batch_size, this rank's share."""
        g = self.generator
        centres = torch.randint(self.num, (self.batch_size,), generator=g)
        first = self.rank * self.local_batch_size
        own = range(first, first + self.local_batch_size)
        pools = self._pool(centres[first:first + self.local_batch_size]).cpu()
        seqs = []
        for b in range(self.batch_size):  # every rank draws every sequence's numbers: one generator stream
            size = min(self.pool_max, int(self.seq_len * (1 + torch.rand((), generator=g).item())))
            pick = torch.randperm(size, generator=g)[: self.seq_len]  # random subset, random order
            if b in own:
                seqs.append(pools[b - first, :size][pick])
        index = torch.stack(seqs).to(self.feats.device)
        return self.feats[index], self.pids.to(self.feats.device)[index]
