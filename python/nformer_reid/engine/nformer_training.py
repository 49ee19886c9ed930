"""Stage 2: the NFormer on frozen features of the training set (official NFormer recipe)."""
import logging
import os
import time
from typing import List, Optional

import torch

import nformer_kernels as nk
from nformer_reid.config import CENTER_LR, CENTER_WEIGHT, TRIPLET_MARGIN, WEIGHT_DECAY, TrainConfig
from nformer_kernels.modules import draw_landmarks
from nformer_reid.engine import ddp
from nformer_reid.engine.backbone_training import StepEstimate
from nformer_reid.engine.checkpoints import load_checkpoint, save_checkpoint
from nformer_reid.engine.device import autocast, grad_scaler, resolve_device
from nformer_reid.losses import ReIDLoss
from nformer_reid.neighborhood import NeighborhoodSampler
from nformer_reid.solver import make_optimizer, optimizer_step
from nformer_reid.utils.checks import as_float, as_int, as_tensor
from nformer_reid.utils.errors import ReIDInputError, TrainingDiverged, one_line
from nformer_reid.utils.logging import progress

logger = logging.getLogger(__name__)


def train_nformer(model, feats: torch.Tensor, pids: torch.Tensor, *, out_dir: str,
                  epochs: int = TrainConfig.nformer_epochs, steps: Optional[int] = None,
                  seq_len: int = TrainConfig.seq_len, batch_size: int = TrainConfig.nformer_batch,
                  lr: float = TrainConfig.nformer_lr, weight_decay: float = WEIGHT_DECAY, center_lr: float = CENTER_LR,
                  center_weight: float = CENTER_WEIGHT, margin: float = TRIPLET_MARGIN, amp: str = "auto",
                  device=None, seed: int = 0, resume: Optional[str] = None, sampling: str = "centres",
                  log_period: int = 50, save_last: bool = True) -> List[dict]:
    """Train an NFormer on features `feats` (M, in_dim) with labels `pids` (0..C-1).

    model: an nk.NFormer, or a model holding one as `.nformer` (ReIDModel); the whole model is
    what out_dir/stage2_last.pth saves (save_last=False: nothing is written) and `resume`
    restores. feats are the NFormer's in_dim wide (its input projection, if any, is trained
    with it); the losses work on its dim-wide output. Each step draws batch_size neighbourhood
    sequences of seq_len features (NeighborhoodSampler) and applies CE + triplet + center loss
    to all refined features; Adam (official lr 1e-5). `steps` overrides
    epochs x (M // 30 // batch_size). Before the progress bar it logs the s/step measured on the
    first steps (after a warm-up step) and the expected duration (StepEstimate). Returns the
    loss history (one dict per step). TrainingDiverged (a ValueError) at the first step whose
    loss is NaN or Inf.

    The checkpoint also holds the sequence sampler's generator state and torch's CPU RNG state
    (the NFormer draws its landmarks from it); `resume` restores both, so a resumed run continues
    as the uninterrupted one would, on any number of processes (older checkpoints: the generator
    is reseeded with seed + step).

    Under a process group of more than one (engine.ddp, torchrun) every rank makes the same call:
    rank 0's feats and pids are used by all; each step every rank draws the same global batch of
    batch_size sequences and trains on its contiguous share (batch_size must be a multiple of
    the number of processes), the NFormer is wrapped in DistributedDataParallel, its BatchNorm
    head uses the global batch's statistics, the landmarks of each block are drawn on rank 0
    from torch's RNG (the draws one process makes) and shared, and the triplet / center losses
    see the global batch's refined features (ddp.global_batch_loss); the history holds the
    global batch's losses. Only rank 0 writes the checkpoint. Dropout masks are each rank's own:
    with dropout 0 the steps are those of one process up to summation order.
    """
    epochs = as_int(epochs, "epochs", minimum=1)
    steps = None if steps is None else as_int(steps, "steps", minimum=1)
    seq_len = as_int(seq_len, "seq_len", minimum=2)
    batch_size = as_int(batch_size, "batch_size", minimum=1)
    log_period = as_int(log_period, "log_period", minimum=1)
    seed = as_int(seed, "seed", minimum=0)
    for name, value in (("center_lr", center_lr), ("center_weight", center_weight)):
        as_float(value, name, minimum=0, open_min=True)
    as_float(margin, "margin", minimum=0)
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    if not isinstance(save_last, bool):
        raise TypeError(f"save_last must be True or False, got {save_last!r}")
    if not isinstance(model, nk.NFormer) and not isinstance(getattr(model, "nformer", None), nk.NFormer):
        raise TypeError(f"model must be an nk.NFormer or hold one as .nformer, got {type(model).__name__}")
    feats, pids = as_tensor(feats, "feats"), as_tensor(pids, "pids")
    if feats.dim() != 2 or not feats.is_floating_point() or feats.shape[0] < 2:
        raise ValueError(f"feats must be a float (M, d) matrix with M >= 2, got {tuple(feats.shape)} {feats.dtype}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("feats contains NaN or Inf")
    if pids.shape != feats.shape[:1] or pids.is_floating_point() or pids.dtype == torch.bool:
        raise ValueError(f"pids must be M = {feats.shape[0]} integers, got {tuple(pids.shape)} {pids.dtype}")
    distributed, world = ddp.is_distributed(), ddp.world_size()
    ddp.check_even_split(batch_size, "batch_size", world)
    device = resolve_device(device)
    nformer = (model if isinstance(model, nk.NFormer) else model.nformer).to(device)
    if nformer.classifier is None:
        raise ValueError("the NFormer needs a classifier (num_classes) for training")
    num_classes, dim = nformer.classifier.out_features, nformer.dim  # dim: the refined features' width
    if feats.shape[1] != nformer.in_dim:
        raise ValueError(f"feats are {feats.shape[1]}-d, the NFormer takes {nformer.in_dim}-d input (in_dim="
                         f"{nformer.in_dim}, dim={dim})")
    if int(pids.max()) >= num_classes or int(pids.min()) < 0:
        raise ValueError(f"training pids must lie in [0, {num_classes}), got [{int(pids.min())}, {int(pids.max())}]")
    feats, pids = feats.to(device), pids.to(device)
    if distributed:  # every rank samples from the same features: rank 0's
        feats = ddp.broadcast_(feats.contiguous().clone(), 0)
        pids = ddp.broadcast_(pids.contiguous().clone(), 0)
    criterion = ReIDLoss(num_classes, dim, margin, center_weight).to(device)
    optimizer = make_optimizer(nformer, lr, weight_decay)
    center_optimizer = torch.optim.SGD(criterion.center.parameters(), lr=center_lr)
    scaler = grad_scaler(device, amp)
    generator = torch.Generator().manual_seed(seed)
    sampler = NeighborhoodSampler(feats, pids, seq_len, batch_size, sampling, generator=generator,
                                  knn_precision=nformer.knn_precision, rank=ddp.rank(), world_size=world)
    total = steps if steps is not None else epochs * len(sampler)
    width = f"{nformer.in_dim}-d" + (f", projected to {dim}-d" if nformer.in_dim != dim else "")
    logger.info("stage 2: %d train features (%s), sequences of %d x %d, %d steps, neighbour sampling '%s'",
                feats.shape[0], width, sampler.seq_len, batch_size, total, sampler.strategy)
    history, start = [], 0
    if resume:
        state = load_checkpoint(resume, model, optimizer, criterion, center_optimizer)
        history, start = state["history"], int(state["extra"].get("step", 0))
        if start >= total:
            raise ValueError(f"resume {resume} is at step {start}, this run has {total} steps: nothing to train")
        _restore_rng(state, resume, generator, seed + start)
        logger.info("resumed stage 2 from %s at step %d", resume, start)
    ddp.broadcast_module_state(criterion)  # the centres are not DDP's: rank 0's on every rank
    ckpt = os.path.join(out_dir, "stage2_last.pth")
    started = time.time()
    nformer.train()
    with ddp.synchronized_batchnorm(nformer, device):
        net = ddp.wrap_ddp(nformer, device)
        _train_steps(net, nformer, sampler, criterion, optimizer, center_optimizer, scaler, history, start, total,
                     num_classes, dim, batch_size, device, amp, log_period, distributed)
    if save_last:
        extra = {"step": total, "sampler_rng": generator.get_state(), "torch_rng": torch.get_rng_state()}
        ddp.on_main_process(lambda: save_checkpoint(ckpt, model, 2, epochs, optimizer, criterion, center_optimizer,
                                                    history=history, extra=extra), f"checkpoint {ckpt}")
    logger.info("stage 2 done: %d steps in %.0f s; %s", total - start, time.time() - started,
                f"checkpoint {ckpt}" if save_last else "no checkpoint written (save_last=False)")
    return history


def _restore_rng(state: dict, path: str, generator: torch.Generator, fallback_seed: int) -> None:
    extra = state["extra"]
    if extra.get("sampler_rng") is None:  # a checkpoint from before the RNG states were saved
        generator.manual_seed(fallback_seed)
        return
    try:
        generator.set_state(extra["sampler_rng"])
        if extra.get("torch_rng") is not None:
            torch.set_rng_state(extra["torch_rng"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ReIDInputError(f"checkpoint {path}: key 'extra' holds no usable RNG state: "
                             f"{one_line(exc)[:160]}") from exc


def _shared_landmarks(nformer, n: int, device) -> List[torch.Tensor]:
    """Each block's landmarks for sequences of n, drawn from torch's RNG as nformer's forward
    draws them (one draw per block, in order) on rank 0 and broadcast: one set for the whole
    global batch, as in one process."""
    drawn = torch.stack([draw_landmarks(n, block.num_landmarks, device="cpu") for block in nformer.blocks])
    drawn = ddp.broadcast_(drawn.to(ddp.comm_device()), 0)
    return list(drawn.to(device))


def _train_steps(net, nformer, sampler, criterion, optimizer, center_optimizer, scaler, history, start, total,
                 num_classes, dim, batch_size, device, amp, log_period, distributed):
    """Steps start..total-1 of train_nformer (net: nformer, or its DDP wrapper), history appended."""

    def train_step(step):
        x, y = sampler.sample()
        try:
            with autocast(device, amp):
                if distributed:
                    logits, refined = net(x, landmarks=_shared_landmarks(nformer, x.shape[1], x.device))
                else:
                    logits, refined = net(x)
        except ValueError as exc:  # the inputs were checked: what changed is the weights
            if step == start:
                raise
            raise TrainingDiverged(f"stage 2 step {step + 1}: the NFormer's weights grew out of range (lr "
                                   f"{optimizer.param_groups[0]['lr']:g}): {one_line(exc)}; training "
                                   "stopped, no weights from this step on are saved") from exc
        where = f"stage 2 step {step + 1}"
        if distributed:
            loss, value, parts, _ = ddp.global_batch_loss(criterion, logits.reshape(-1, num_classes).float(),
                                                          refined.reshape(-1, dim).float(), y.reshape(-1))
            value = float(value)
            optimizer_step(loss, optimizer, center_optimizer, scaler, criterion, where=where, value=value)
        else:
            loss, parts = criterion(logits.reshape(-1, num_classes).float(), refined.reshape(-1, dim).float(),
                                    y.reshape(-1))
            optimizer_step(loss, optimizer, center_optimizer, scaler, criterion, where=where)
            value = float(loss.detach())  # also waits for the device: step times are wall times
        history.append({"step": step + 1, "loss": value, **parts})
        if (step + 1) % log_period == 0 or step + 1 == total:
            logger.info("stage2 step %d/%d: loss %.3f (ce %.3f, triplet %.3f)", step + 1, total, value, parts["ce"],
                        parts["triplet"])
        return value

    # The first steps train like the others; they also tell how long the run will take.
    estimate = StepEstimate(logger, "stage 2", total - start, f"{batch_size} x {sampler.seq_len}", device)
    step = start
    while step < total:
        train_step(step)
        step += 1
        if estimate.tick():
            break
    bar = progress(range(step, total), "stage2", initial=step - start, total=total - start)
    for step in bar:
        bar.set_postfix(loss=f"{train_step(step):.3f}")
