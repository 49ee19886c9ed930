"""Training under torchrun: the process group, rank-0-only writing, the collectives of both stages.

    torchrun --nproc-per-node P -m nformer_reid train ...

starts P processes with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in their
environment. `distributed_run(device)` initialises the process group from them (NCCL for CUDA
devices, each rank on cuda:LOCAL_RANK; gloo on the CPU) and shuts it down at the end; without
torchrun's environment it is a world of one and initialises nothing, so one code path serves both.

What a world of P computes is what one process computes on the same global batch:
  * the PK sampler (data.loader.RandomIdentitySampler) and the sequence sampler
    (neighborhood.NeighborhoodSampler) draw the same global batch on every rank, from the same
    seed, and each rank keeps its contiguous share (rank 0 the first identities / sequences);
  * the triplet and center losses see the global batch: embeddings are gathered with their
    gradient (`gather_rows`); the cross entropy is per row, so each rank's share of it is local
    (`global_batch_loss`);
  * every BatchNorm normalises with the global batch's statistics while `synchronized_batchnorm`
    is active: torch.nn.SyncBatchNorm on CUDA, `GlobalBatchNorm` (autograd all_reduce of sums,
    any backend) on the CPU;
  * the backward loss of each rank is chosen so that DistributedDataParallel's gradient average
    is the single process's gradient (see `global_batch_loss`).
Up to floating-point summation order the loss history and the weights are the single process's.

Only rank 0 writes files (`on_main_process`: checkpoints, plots, log files); the other ranks log to
the console at WARNING and above, prefixed with their rank (`setup_rank_logging`). When one rank
fails, torchrun stops the others.
"""
import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nformer_reid.utils.checks import as_device
from nformer_reid.utils.errors import ReIDInputError, one_line

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # a collective nobody joins fails after this, never hangs
T = TypeVar("T")


# ------------------------------------------------------------------ the process group
def launched_by_torchrun() -> bool:
    """True when this process has torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    return all(os.environ.get(name) for name in TORCHRUN_ENV)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes files."""
    return rank() == 0


def is_distributed() -> bool:
    """A process group of more than one process is initialised: the engines train with DDP."""
    return world_size() > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ReIDInputError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def init_distributed(device=None, expected_world_size: Optional[int] = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> torch.device:
    """Initialise the default process group from torchrun's environment; returns this rank's device.

    device: None / "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:<LOCAL_RANK>":
    CUDA ranks run on cuda:LOCAL_RANK over NCCL, CPU ranks over gloo. expected_world_size: the
    world an option asked for, checked against WORLD_SIZE. ReIDInputError without torchrun's
    environment (names the missing variables and how to start), for a WORLD_SIZE that disagrees,
    a RANK / LOCAL_RANK out of range, a CUDA index other than LOCAL_RANK, or a world that does not
    form within `timeout` (also every collective's limit). A group already initialised (with the
    same rank and world) is kept."""
    missing = [name for name in TORCHRUN_ENV if not os.environ.get(name)]
    if missing:
        raise ReIDInputError(f"distributed training needs torchrun's environment ({', '.join(missing)} not set): "
                             "start it with `torchrun --nproc-per-node N -m nformer_reid train ...`")
    world, global_rank, local_rank = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1 or not 0 <= global_rank < world or not 0 <= local_rank < world:
        raise ReIDInputError(f"torchrun environment out of range: RANK={global_rank}, LOCAL_RANK={local_rank}, "
                             f"WORLD_SIZE={world}")
    if expected_world_size is not None and expected_world_size != world:
        raise ReIDInputError(f"this run asks for {expected_world_size} processes, but torchrun started "
                             f"WORLD_SIZE={world} (--nproc-per-node x --nnodes)")
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        named = torch.device(device)
        if named.index is not None and named.index != local_rank:
            raise ReIDInputError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK (cuda:{local_rank} "
                                 "here); pass --device cuda")
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ReIDInputError(f"--device cuda: LOCAL_RANK={local_rank} needs GPU {local_rank}, this node has "
                                 f"{found} (start at most that many processes per node, or use --device cpu)")
        device = f"cuda:{local_rank}"
    try:
        device = as_device(device, "--device")
    except (TypeError, ValueError) as exc:
        raise ReIDInputError(str(exc)) from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != global_rank:
            raise ReIDInputError(f"a process group of {dist.get_world_size()} (rank {dist.get_rank()}) is already "
                                 f"initialised, torchrun's environment says {world} (rank {global_rank})")
        return device
    try:
        dist.init_process_group(backend, init_method="env://", rank=global_rank, world_size=world, timeout=timeout)
    except dist.DistError as exc:  # the others never joined within `timeout`
        raise ReIDInputError(f"the {world} processes of WORLD_SIZE={world} did not all join "
                             f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                             f"{timeout.total_seconds():g} s ({one_line(exc)[:200]})") from None
    return device


def shutdown() -> None:
    """Destroy the default process group if one is initialised (idempotent)."""
    if is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class DistributedContext:
    """What a rank knows about its run: its device, rank, world size and local rank."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def distributed_run(device=None, expected_world_size: Optional[int] = None,
                    timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[DistributedContext]:
    """Under torchrun: init_distributed, yield the rank's DistributedContext, shut the group down at
    the end (also on errors). Otherwise a world of one on as_device(device), nothing initialised;
    expected_world_size other than 1 is then a ReIDInputError (see init_distributed)."""
    if not launched_by_torchrun():
        if expected_world_size not in (None, 1):
            init_distributed(device, expected_world_size)  # raises: no torchrun environment
        yield DistributedContext(as_device(device, "--device"))
        return
    owned = not is_initialized()
    resolved = init_distributed(device, expected_world_size, timeout)
    try:
        yield DistributedContext(resolved, rank(), world_size(), _env_int("LOCAL_RANK"))
    finally:
        if owned:
            shutdown()


# ------------------------------------------------------------------ rank-0 writes, logging
def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` is true on every rank (one all_reduce; just `ok` without a group)."""
    if not is_distributed():
        return bool(ok)
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag)
    return int(flag) == 0


def on_main_process(write: Callable[[], T], what: str = "a file") -> Optional[T]:
    """Rank 0 runs write() (e.g. save a checkpoint) and returns its result; every other rank gets
    None once rank 0 is done. Rank 0's error is re-raised there; the others raise a ReIDInputError
    saying rank 0 failed, so no rank waits for a rank that has stopped."""
    if not is_distributed():
        return write()
    result, error = None, None
    if is_main_process():
        try:
            result = write()
        except Exception as exc:  # noqa: BLE001  (re-raised below, after the others have been told)
            error = exc
    ok = all_ranks_agree(error is None)
    if error is not None:
        raise error
    if not ok:
        raise ReIDInputError(f"rank 0 failed to write {what}; see its message")
    return result


class _RankPrefix(logging.Filter):
    def filter(self, record):
        prefix = f"[rank {rank()}] "
        if not str(record.msg).startswith(prefix):
            record.msg = prefix + str(record.msg)
        return True


def setup_rank_logging(log_file: Optional[str] = None) -> None:
    """Logging for this rank: rank 0 as nformer_reid.utils.logging.setup_logging(log_file) (console
    and the log file); the other ranks only WARNING and above, on the console, as "[rank r] ..."
    (no log file)."""
    from nformer_reid.utils.logging import setup_logging

    if is_main_process():
        setup_logging(log_file)
        return
    for handler in setup_logging(None, logging.WARNING).handlers:
        if not any(isinstance(f, _RankPrefix) for f in handler.filters):
            handler.addFilter(_RankPrefix())


# ------------------------------------------------------------------ collectives
def comm_device() -> torch.device:
    """Where a small tensor must live for the default group's backend (NCCL: the current GPU)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Every rank's `tensor` (same shape and dtype everywhere) overwritten in place with rank src's."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Parameters and buffers of `module` overwritten with rank src's (modules DDP does not own,
    e.g. the center-loss centres, start equal on every rank whatever each rank's seed)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """torch.cat of every rank's `tensor` (equal shapes) along dim 0, in rank order; no gradient."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows, in rank order. Backward: the gradient of this rank's rows summed
    over every rank's loss (all_reduce of the gathered gradient, then this rank's slice), which is
    what autograd would give if the ranks' losses were one function; works on any backend."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with its gradient (the gradient's sum over ranks)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather_rows with autograd: every rank gets the global rows, and the backward pass sends
    each rank the gradient of its own rows (summed over the ranks' losses). Equal row counts per rank."""
    return _GatherRows.apply(tensor) if is_distributed() else tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, with autograd (the tensor itself without a group)."""
    return _AllReduceSum.apply(tensor) if is_distributed() else tensor


def global_batch_loss(criterion, logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, dict, float]:
    """ReIDLoss of the global batch when each rank holds an equal share of it (rank order).

    Returns (backward_loss, loss, parts, accuracy). loss, parts ({"ce", "triplet", "center"} as
    floats) and the classification accuracy are the global batch's, equal on every rank; the
    triplet and center terms see the gathered embeddings (hardest positives / negatives among all
    ranks' rows). backward_loss is what this rank backpropagates: its local mean cross entropy +
    the global triplet + center_weight x the global center loss. Summed over the W ranks that is
    W x the global loss, and the gathered rows' backward sums the ranks' gradients, so DDP's
    average (sum / W) is the single-process gradient; the centres (not in DDP) get the global
    center-loss gradient on every rank directly. Without a process group: criterion's own result."""
    if not is_distributed():
        loss, parts = criterion(logits, feats, labels)
        return loss, loss.detach(), parts, float((logits.argmax(1) == labels).float().mean())
    world = world_size()
    all_feats, all_labels = gather_rows(feats), all_gather_rows(labels)
    ce = criterion.xent(logits, labels)
    triplet = criterion.triplet(all_feats, all_labels)
    center = criterion.center(all_feats, all_labels)
    stats = torch.stack([ce.detach().float(), (logits.argmax(1) == labels).float().sum()])
    dist.all_reduce(stats)  # the ranks' mean CE (equal shares: the global mean) and the hits
    global_ce = stats[0] / world
    loss = global_ce + triplet.detach() + criterion.center_weight * center.detach()
    parts = {"ce": float(global_ce), "triplet": float(triplet.detach()), "center": float(center.detach())}
    backward = ce + triplet + criterion.center_weight * center
    return backward, loss, parts, float(stats[1]) / (labels.shape[0] * world)


# ------------------------------------------------------------------ BatchNorm over the global batch
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any input (N, C, ...)) whose training statistics are those of the global batch:
    the per-channel sum and count, then the centred sum of squares, are all_reduce'd with autograd
    (two passes, as torch's own BatchNorm: no E[x^2] - E[x]^2 cancellation). Running statistics
    are updated as torch.nn.BatchNorm updates them from the global batch (unbiased variance over
    the global count), so they stay equal on every rank. Eval mode and a world of one: plain
    BatchNorm. Same parameters and buffers as nn.BatchNorm*d (its state dicts load either way).
    Works on every backend; CUDA runs use torch.nn.SyncBatchNorm instead (synchronized_batchnorm)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {x.dim()}")

    def forward(self, x):
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = x.numel() // x.shape[1]
        totals = all_reduce_sum(torch.cat([x.sum(dims), x.new_tensor([float(local_count)])]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1)), alpha=factor)
        return y


def _synced_copy(bn: nn.modules.batchnorm._BatchNorm, device: torch.device) -> nn.Module:
    cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:  # the same Parameter objects: optimisers built before or after see one set
        new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, name, None) is not None:
            setattr(new, name, getattr(bn, name))  # shared buffers, updated in place
    new.train(bn.training)
    return new


@contextlib.contextmanager
def synchronized_batchnorm(module: nn.Module, device) -> Iterator[nn.Module]:
    """Within the block every BatchNorm inside `module` normalises training batches with the
    global batch's statistics (torch.nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere); the
    replacements share the originals' parameters and buffers, and the original modules are put
    back on exit, so the model's class layout, state-dict names and weights are those of a
    single-process run. Without a process group of more than one: nothing changes."""
    swapped: List[Tuple[nn.Module, str, nn.Module]] = []
    if is_distributed():
        device = as_device(device)
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                        child, (nn.SyncBatchNorm, GlobalBatchNorm)):
                    setattr(parent, name, _synced_copy(child, device))
                    swapped.append((parent, name, child))
    try:
        yield module
    finally:
        for parent, name, child in reversed(swapped):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel(module) under a process group of more than one, else module.
    Buffers are not re-broadcast every step: synchronized BatchNorm keeps them equal."""
    if not is_distributed():
        return module
    device = as_device(device)
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    ddp_class = nn.parallel.DistributedDataParallel
    # the buffers are synced once at construction either way; newer torch names the per-step switch differently
    no_step_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp_class).parameters
                    else {"broadcast_buffers": False})
    return ddp_class(module, device_ids=ids, output_device=ids[0] if ids else None, **no_step_sync)


def check_even_split(total: int, what: str, world: Optional[int] = None) -> int:
    """total // world; ValueError naming `what` when total does not split evenly over the ranks."""
    world = world_size() if world is None else world
    if total % world:
        raise ValueError(f"{what} ({total}) must be a multiple of the number of processes ({world}): every rank "
                         "takes an equal share of each global batch")
    return total // world


__all__: Sequence[str] = (
    "DistributedContext", "GlobalBatchNorm", "TORCHRUN_ENV", "all_gather_rows", "all_ranks_agree", "all_reduce_sum",
    "barrier", "broadcast_", "broadcast_module_state", "check_even_split", "distributed_run", "gather_rows",
    "global_batch_loss", "init_distributed", "is_distributed", "is_initialized", "is_main_process",
    "launched_by_torchrun", "on_main_process", "rank", "setup_rank_logging", "shutdown", "synchronized_batchnorm",
    "world_size", "wrap_ddp")
