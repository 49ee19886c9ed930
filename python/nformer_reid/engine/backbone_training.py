"""Stage 1: the backbone with label-smoothed CE + batch-hard triplet + center loss (reid-strong-baseline)."""
import datetime
import logging
import os
import time
from typing import List, Optional, Sequence

import torch

from nformer_reid.config import CENTER_LR, CENTER_WEIGHT, TRIPLET_MARGIN, WEIGHT_DECAY, TrainConfig
from nformer_reid.engine import ddp
from nformer_reid.engine.checkpoints import load_checkpoint, save_checkpoint
from nformer_reid.engine.device import autocast, describe_device, grad_scaler, resolve_device
from nformer_reid.losses import ReIDLoss
from nformer_reid.solver import make_optimizer, optimizer_step, warmup_multistep
from nformer_reid.utils.checks import as_float, as_int
from nformer_reid.utils.errors import ReIDInputError, one_line
from nformer_reid.utils.logging import progress

logger = logging.getLogger(__name__)

ESTIMATE_STEPS = 3  # steps timed after the warm-up step for the duration estimate ...
ESTIMATE_SECONDS = 10.0  # ... or fewer, once the timed ones took this long


class StepEstimate:
    """A training loop's speed, measured on its first steps, and the one log line that says how long
    the run will take.

    Call tick() after every step of the `steps` this run makes. The first step is a warm-up
    (allocations, kernel choices, data-loader start) and is not timed; the next ESTIMATE_STEPS
    are, or fewer once they took ESTIMATE_SECONDS (or the run ends). Then `log` gets, once,
    "<stage>: N steps x (<shape>) ~ X s/step, about H:MM:SS total on <device>", the total being
    the time so far plus the remaining steps at X (a one-step run: its one step). tick() returns
    whether the estimate has been logged; seconds_per_step holds it from then on.
    """

    def __init__(self, log: logging.Logger, stage: str, steps: int, shape: str, device: torch.device):
        self.log, self.stage, self.steps, self.shape = log, stage, steps, shape
        self.device = describe_device(device, threads=True)
        self.started = time.perf_counter()
        self.warm = None  # when the warm-up step ended
        self.ticks = 0
        self.seconds_per_step: Optional[float] = None

    def tick(self) -> bool:
        if self.seconds_per_step is not None:
            return True
        now = time.perf_counter()
        self.ticks += 1
        if self.warm is None:
            self.warm = now
        timed, elapsed = self.ticks - 1, now - self.warm
        if timed < ESTIMATE_STEPS and elapsed < ESTIMATE_SECONDS and self.ticks < self.steps:
            return False
        self.seconds_per_step = elapsed / timed if timed else now - self.started
        total = now - self.started + (self.steps - self.ticks) * self.seconds_per_step
        self.log.info("%s: %d steps x (%s) ~ %.3g s/step, about %s total on %s", self.stage, self.steps, self.shape,
                      self.seconds_per_step, datetime.timedelta(seconds=round(total)), self.device)
        return True


def _restore_progress(state: dict, path: str, sampler) -> None:
    """The sampler's and torch's CPU RNG states of a checkpoint (saved at an epoch's end), so the
    resumed run draws what the uninterrupted one would have; older checkpoints hold neither."""
    extra = state["extra"]
    try:
        if sampler is not None and extra.get("sampler") is not None:
            sampler.load_state_dict(extra["sampler"])
        if extra.get("torch_rng") is not None:
            torch.set_rng_state(extra["torch_rng"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ReIDInputError(f"checkpoint {path}: key 'extra' holds no usable RNG state: "
                             f"{one_line(exc)[:160]}") from exc


def _pk_sampler(train_loader):
    """The loader's RandomIdentitySampler-like sampler (state_dict + world_size), or None."""
    sampler = getattr(train_loader, "sampler", None)
    return sampler if hasattr(sampler, "state_dict") and hasattr(sampler, "world_size") else None


def train_backbone(model, train_loader, num_classes: int, *, out_dir: str, epochs: int = TrainConfig.epochs,
                   max_steps: Optional[int] = None, lr: float = TrainConfig.lr, weight_decay: float = WEIGHT_DECAY,
                   milestones: Sequence[int] = TrainConfig.milestones,
                   warmup_epochs: int = TrainConfig.warmup_epochs, center_lr: float = CENTER_LR,
                   center_weight: float = CENTER_WEIGHT, margin: float = TRIPLET_MARGIN, amp: str = "auto",
                   device=None, resume: Optional[str] = None, checkpoint_period: int = 10,
                   log_period: int = 50, save_last: bool = True) -> List[dict]:
    """Train model.backbone on (images, pids, camids) batches: Adam with warm-up + step decay (per
    epoch), checkpoint out_dir/stage1_last.pth every checkpoint_period epochs and at the end
    (save_last=False: never). max_steps stops early (smoke runs). After the first steps it logs
    the measured s/step and the expected duration (StepEstimate). Returns the loss history (one
    dict per step). TrainingDiverged (a ValueError) at the first step whose loss is NaN or Inf.

    Checkpoints also hold the global step, the loader's PK-sampler RNG state and torch's CPU RNG
    state at the epoch's end; `resume` restores them, so a resumed run continues as the
    uninterrupted one would, on any number of processes.

    Under a process group of more than one (engine.ddp, torchrun) every rank calls this with a
    loader yielding its share of each global batch (build_train_loader does): the backbone is
    wrapped in DistributedDataParallel, its BatchNorms use the global batch's statistics
    (ddp.synchronized_batchnorm), the triplet and center losses the global batch's embeddings
    (ddp.global_batch_loss), and the history holds the global batch's losses and accuracy, equal
    on every rank. Only rank 0 writes the checkpoint. A loader whose sampler is split for another
    world size is a ValueError."""
    num_classes = as_int(num_classes, "num_classes", minimum=1)
    epochs = as_int(epochs, "epochs", minimum=1)
    max_steps = None if max_steps is None else as_int(max_steps, "max_steps", minimum=1)
    checkpoint_period = as_int(checkpoint_period, "checkpoint_period", minimum=1)
    log_period = as_int(log_period, "log_period", minimum=1)
    center_lr = as_float(center_lr, "center_lr", minimum=0, open_min=True)
    center_weight = as_float(center_weight, "center_weight", minimum=0, open_min=True)
    margin = as_float(margin, "margin", minimum=0)
    if not isinstance(out_dir, str) or not out_dir:
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    if not isinstance(save_last, bool):
        raise TypeError(f"save_last must be True or False, got {save_last!r}")
    distributed, world = ddp.is_distributed(), ddp.world_size()
    sampler = _pk_sampler(train_loader)
    if sampler is not None and sampler.world_size != world:
        raise ValueError(f"train_loader's sampler splits batches over {sampler.world_size} process(es), this run has "
                         f"{world}: build the loader after the process group is initialised")
    device = resolve_device(device)
    backbone = model.backbone.to(device)
    criterion = ReIDLoss(num_classes, backbone.feat_dim, margin, center_weight).to(device)
    optimizer = make_optimizer(backbone, lr, weight_decay)
    center_optimizer = torch.optim.SGD(criterion.center.parameters(), lr=center_lr)
    scheduler = warmup_multistep(optimizer, milestones, warmup_epochs=warmup_epochs)
    scaler = grad_scaler(device, amp)
    history, start_epoch = [], 0
    if resume:
        state = load_checkpoint(resume, model, optimizer, criterion, center_optimizer, scheduler)
        history, start_epoch = state["history"], state["epoch"]
        _restore_progress(state, resume, sampler)
        logger.info("resumed stage 1 from %s at epoch %d", resume, start_epoch)
    ddp.broadcast_module_state(criterion)  # the centres are not DDP's: rank 0's on every rank
    ckpt = os.path.join(out_dir, "stage1_last.pth")
    step = 0
    try:
        planned = (epochs - start_epoch) * len(train_loader)
    except TypeError:  # a loader without len(): no estimate
        planned = 0
    if max_steps is not None:
        planned = min(planned, max_steps)
    estimate = StepEstimate(logger, "stage 1", planned, "batch", device) if planned else None
    with ddp.synchronized_batchnorm(backbone, device):
        net = ddp.wrap_ddp(backbone, device)
        for epoch in range(start_epoch, epochs):
            net.train()
            bar = progress(train_loader, f"stage1 epoch {epoch + 1}/{epochs}")
            for imgs, pids, _ in bar:
                imgs, pids = imgs.to(device, non_blocking=True), pids.to(device, non_blocking=True)
                with autocast(device, amp):
                    logits, feats = net(imgs)
                where = f"stage 1 epoch {epoch + 1} step {step + 1}"
                if distributed:
                    loss, value, parts, acc = ddp.global_batch_loss(criterion, logits.float(), feats.float(), pids)
                    value = float(value)
                    optimizer_step(loss, optimizer, center_optimizer, scaler, criterion, where=where, value=value)
                else:
                    loss, parts = criterion(logits.float(), feats.float(), pids)
                    optimizer_step(loss, optimizer, center_optimizer, scaler, criterion, where=where)
                    acc = float((logits.argmax(1) == pids).float().mean())
                    value = float(loss.detach())
                history.append({"epoch": epoch, "loss": value, "acc": acc, **parts})
                bar.set_postfix(loss=f"{value:.3f}", acc=f"{acc:.2f}")
                step += 1
                if estimate is not None:  # images x channels x height x width (per process under DDP)
                    estimate.shape = " x ".join(map(str, imgs.shape)) + (f" on each of {world} processes"
                                                                         if distributed else "")
                    estimate.tick()
                if step % log_period == 0:
                    logger.info("stage1 epoch %d step %d: loss %.3f acc %.3f lr %.2e", epoch + 1, step, value, acc,
                                optimizer.param_groups[0]["lr"])
                if max_steps is not None and step >= max_steps:
                    break
            scheduler.step()
            if save_last and ((epoch + 1) % checkpoint_period == 0 or epoch + 1 == epochs
                              or (max_steps and step >= max_steps)):
                extra = {"step": len(history), "sampler": sampler.state_dict() if sampler is not None else None,
                         "torch_rng": torch.get_rng_state()}
                ddp.on_main_process(lambda: save_checkpoint(ckpt, model, 1, epoch + 1, optimizer, criterion,
                                                            center_optimizer, scheduler, history, extra=extra),
                                    f"checkpoint {ckpt}")
            if max_steps is not None and step >= max_steps:
                break
    if not history:
        logger.info("stage 1: nothing to do (start epoch %d of %d)", start_epoch, epochs)
        return history
    logger.info("stage 1 done: %d steps, last loss %.3f; %s", step, history[-1]["loss"],
                f"checkpoint {ckpt}" if save_last else "no checkpoint written (save_last=False)")
    return history
