"""Optimisers, the warm-up + step-decay schedule and the optimisation step of reid-strong-baseline."""
import bisect
import math
from typing import Optional, Sequence

import torch

from nformer_reid.config import WEIGHT_DECAY
from nformer_reid.utils.checks import as_float, as_int
from nformer_reid.utils.errors import TrainingDiverged


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY, bias_lr_factor: float = 1.0,
                   weight_decay_bias: float = WEIGHT_DECAY) -> torch.optim.Adam:
    """Adam over the trainable parameters, biases in their own group (lr factor, weight decay)."""
    lr = as_float(lr, "lr", minimum=0, open_min=True)
    weight_decay = as_float(weight_decay, "weight_decay", minimum=0)
    bias_lr_factor = as_float(bias_lr_factor, "bias_lr_factor", minimum=0)
    weight_decay_bias = as_float(weight_decay_bias, "weight_decay_bias", minimum=0)
    weights, biases = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay},
              {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": weight_decay_bias}]
    return torch.optim.Adam([g for g in groups if g["params"]])


def warmup_multistep(optimizer, milestones: Sequence[int], gamma: float = 0.1, warmup_factor: float = 0.01,
                     warmup_epochs: int = 10) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: linear warm-up from warmup_factor to 1 over warmup_epochs, then gamma^(#milestones passed).
    Step it once per epoch."""
    milestones = sorted(as_int(m, "milestones", minimum=0) for m in milestones)
    gamma = as_float(gamma, "gamma", minimum=0, open_min=True)
    warmup_factor = as_float(warmup_factor, "warmup_factor", minimum=0, open_min=True)
    warmup_epochs = as_int(warmup_epochs, "warmup_epochs", minimum=0)

    def factor(epoch):
        warm = 1.0
        if epoch < warmup_epochs:
            alpha = epoch / warmup_epochs
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * gamma ** bisect.bisect_right(milestones, epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_center_optimizer(center_optimizer, criterion) -> None:
    """Undo the loss weight on the center gradients before their own SGD step (reid-strong-baseline)."""
    for p in criterion.center.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / criterion.center_weight)
    center_optimizer.step()


def optimizer_step(loss, optimizer, center_optimizer, scaler, criterion, where: str = "training",
                   value: Optional[float] = None) -> None:
    """One (AMP-scaled) step of the model optimizer and of the center-loss centres: loss is
    backpropagated.

    TrainingDiverged (nothing is stepped) when the loss is NaN or Inf; `where` (e.g. "stage 2
    step 7") goes into its message. value: the loss value to check instead of loss's own (under
    DDP the global batch's, equal on every rank, so every rank stops at the same step)."""
    value = float(loss.detach()) if value is None else float(value)
    if not math.isfinite(value):
        lr = optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(f"{where}: the loss is {value} (lr {lr:g}); training stopped, no weights from this "
                               "step on are saved. Try a smaller learning rate or check the input features")
    optimizer.zero_grad(set_to_none=True)
    center_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    step_center_optimizer(center_optimizer, criterion)
