"""Optimisers, the warm-up + step-decay schedule and the optimisation step of reid-strong-baseline."""
import bisect
from typing import Sequence

import torch

from nformer_reid.config import WEIGHT_DECAY


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY, bias_lr_factor: float = 1.0,
                   weight_decay_bias: float = WEIGHT_DECAY) -> torch.optim.Adam:
    """Adam over the trainable parameters, biases in their own group (lr factor, weight decay)."""
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
    milestones = sorted(milestones)

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


def optimizer_step(loss, optimizer, center_optimizer, scaler, criterion) -> None:
    """One (AMP-scaled) step of the model optimizer and of the center-loss centres."""
    optimizer.zero_grad(set_to_none=True)
    center_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    step_center_optimizer(center_optimizer, criterion)
