"""Training (stage 1 backbone, stage 2 NFormer), feature extraction, refinement, evaluation,
checkpoints. Plain PyTorch loops with tqdm progress and a concise log."""
import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nformer_reid.losses import ReIDLoss
from nformer_reid.metrics import compute_distance_matrix, evaluate_rank
from nformer_reid.neighborhood import NeighborhoodSampler
from nformer_reid.rerank import re_ranking_sparse
from nformer_reid.solver import make_optimizer, warmup_multistep


_log_file: Optional[str] = None


def set_log_file(path: Optional[str]) -> None:
    """Also append every log line to path (None: stdout only)."""
    global _log_file
    _log_file = path


def log(msg: str) -> None:
    line = f"[nformer-reid {time.strftime('%H:%M:%S')}] {msg}"
    tqdm.write(line, file=sys.stdout)  # keeps an active progress bar intact
    if _log_file:
        with open(_log_file, "a") as fh:
            fh.write(line + "\n")


def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, amp: str = "auto"):
    """bf16/fp16 autocast on CUDA ("auto" = bf16); CPU runs in fp32."""
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'none', got {amp!r}")
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def _grad_scaler(device, amp):
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")


def step_center_optimizer(center_optimizer, criterion: ReIDLoss) -> None:
    """Undo the loss weight on the center gradients before their own SGD step (reid-strong-baseline)."""
    for p in criterion.center.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / criterion.center_weight)
    center_optimizer.step()


# ------------------------------------------------------------------------------------ checkpoints


def _optimize(loss, optimizer, center_optimizer, scaler, criterion):
    """One AMP-scaled step of the model optimizer and of the center-loss centres."""
    optimizer.zero_grad(set_to_none=True)
    center_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    step_center_optimizer(center_optimizer, criterion)


def save_checkpoint(path: str, model, stage: int, epoch: int, optimizer=None, criterion=None,
                    center_optimizer=None, scheduler=None, history=None, extra=None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"model": model.state_dict(), "config": getattr(model, "config", None), "stage": stage, "epoch": epoch,
             "optimizer": optimizer.state_dict() if optimizer else None,
             "criterion": criterion.state_dict() if criterion else None,
             "center_optimizer": center_optimizer.state_dict() if center_optimizer else None,
             "scheduler": scheduler.state_dict() if scheduler else None, "history": history or [],
             "extra": extra or {}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a truncated checkpoint behind
    return path


def load_checkpoint(path: str, model=None, optimizer=None, criterion=None, center_optimizer=None, scheduler=None):
    """Restore whatever is given from a save_checkpoint file; returns the checkpoint dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "stage" not in state:
        raise ValueError(f"{path} is not an nformer-reid checkpoint (use --official for nformer_model.pth)")
    if model is not None:
        model.load_state_dict(state["model"])
    for obj, key in ((optimizer, "optimizer"), (criterion, "criterion"), (center_optimizer, "center_optimizer"),
                     (scheduler, "scheduler")):
        if obj is not None and state.get(key) is not None:
            obj.load_state_dict(state[key])
    return state


# ------------------------------------------------------------------------------------ stage 1
def train_backbone(model, train_loader, num_classes: int, *, out_dir: str, epochs: int = 120,
                   max_steps: Optional[int] = None, lr: float = 3.5e-4, weight_decay: float = 5e-4,
                   milestones: Sequence[int] = (40, 70), warmup_epochs: int = 10, center_lr: float = 0.5,
                   center_weight: float = 5e-4, margin: float = 0.3, amp: str = "auto", device=None,
                   resume: Optional[str] = None, checkpoint_period: int = 10, log_period: int = 50) -> List[dict]:
    """Stage 1: label-smoothed CE + batch-hard triplet + center loss on the backbone, Adam with
    warm-up + step decay (per epoch). max_steps stops early (smoke runs). Returns the loss history."""
    device = resolve_device(device)
    backbone = model.backbone.to(device)
    criterion = ReIDLoss(num_classes, backbone.feat_dim, margin, center_weight).to(device)
    optimizer = make_optimizer(backbone, lr, weight_decay)
    center_optimizer = torch.optim.SGD(criterion.center.parameters(), lr=center_lr)
    scheduler = warmup_multistep(optimizer, milestones, warmup_epochs=warmup_epochs)
    scaler = _grad_scaler(device, amp)
    history, start_epoch = [], 0
    if resume:
        state = load_checkpoint(resume, model, optimizer, criterion, center_optimizer, scheduler)
        history, start_epoch = state["history"], state["epoch"]
        log(f"resumed stage 1 from {resume} at epoch {start_epoch}")
    ckpt = os.path.join(out_dir, "stage1_last.pth")
    step = 0
    for epoch in range(start_epoch, epochs):
        backbone.train()
        bar = tqdm(train_loader, desc=f"stage1 epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for imgs, pids, _ in bar:
            imgs, pids = imgs.to(device, non_blocking=True), pids.to(device, non_blocking=True)
            with autocast(device, amp):
                logits, feats = backbone(imgs)
            loss, parts = criterion(logits.float(), feats.float(), pids)
            _optimize(loss, optimizer, center_optimizer, scaler, criterion)
            acc = float((logits.argmax(1) == pids).float().mean())
            value = float(loss.detach())
            history.append({"epoch": epoch, "loss": value, "acc": acc, **parts})
            bar.set_postfix(loss=f"{value:.3f}", acc=f"{acc:.2f}")
            step += 1
            if step % log_period == 0:
                log(f"stage1 epoch {epoch + 1} step {step}: loss {value:.3f} acc {acc:.3f} "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}")
            if max_steps is not None and step >= max_steps:
                break
        scheduler.step()
        if (epoch + 1) % checkpoint_period == 0 or epoch + 1 == epochs or (max_steps and step >= max_steps):
            save_checkpoint(ckpt, model, 1, epoch + 1, optimizer, criterion, center_optimizer, scheduler, history)
        if max_steps is not None and step >= max_steps:
            break
    log(f"stage 1 done: {step} steps, last loss {history[-1]['loss']:.3f}; checkpoint {ckpt}")
    return history


# ------------------------------------------------------------------------------------ features
@torch.no_grad()
def extract_features(backbone, loader, flip: bool = False, device=None,
                     amp: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode backbone features (after BNNeck), optionally averaged with the flipped image."""
    device = resolve_device(device)
    backbone = backbone.to(device).eval()
    feats, pids, camids = [], [], []
    for imgs, pid, cam in tqdm(loader, desc="features", leave=False, dynamic_ncols=True):
        imgs = imgs.to(device, non_blocking=True)
        with autocast(device, amp):
            f = backbone(imgs).float()
            if flip:
                f = (f + backbone(imgs.flip(3)).float()) / 2
        feats.append(f.cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(cam))
    return torch.cat(feats), torch.cat(pids).long(), torch.cat(camids).long()


@torch.no_grad()
def refine_features(nformer, qf: torch.Tensor, gf: torch.Tensor, mode: str = "official", seed: int = 0,
                    device=None, amp: str = "none") -> Tuple[torch.Tensor, torch.Tensor]:
    """NFormer refinement of query + gallery features as one set.

    mode "official": one joint query+gallery sequence (as the released code); "paper": the same
    with query-query isolation (queries never neighbour each other nor serve as landmarks).
    Inputs are L2-normalised first (as the official evaluation); landmarks come from a
    torch.Generator seeded with `seed`, so numbers are reproducible.
    """
    if mode not in ("official", "paper"):
        raise ValueError(f"mode must be 'official' or 'paper', got {mode!r}")
    device = resolve_device(device)
    nformer = nformer.to(device).eval()
    x = torch.nn.functional.normalize(torch.cat([qf, gf]).float(), dim=1).to(device)
    query_mask = None
    if mode == "paper":
        query_mask = torch.arange(x.shape[0], device=device) < qf.shape[0]
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    with autocast(device, amp):
        out = nformer(x, generator=generator, query_mask=query_mask).float()
    log(f"NFormer ({mode}) refined {x.shape[0]} features on {device} in {time.time() - started:.1f} s")
    return out[: qf.shape[0]].cpu(), out[qf.shape[0]:].cpu()


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank: bool = False, max_rank: int = 50,
                      k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> Dict:
    """mAP / CMC of L2-normalised features (squared Euclidean), optionally k-reciprocal re-ranked."""
    if rerank:
        dist = re_ranking_sparse(qf, gf, k1, k2, lambda_value)
    else:
        dist = compute_distance_matrix(qf, gf, "euclidean", normalize=True)
    cmc, mAP = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    return {"mAP": mAP, "cmc": cmc, "R1": float(cmc[0]), "R5": float(cmc[min(4, len(cmc) - 1)]),
            "R10": float(cmc[min(9, len(cmc) - 1)])}


def format_result(name: str, res: Dict) -> str:
    return f"{name:<24} mAP {res['mAP']:6.1%}  R1 {res['R1']:6.1%}  R5 {res['R5']:6.1%}  R10 {res['R10']:6.1%}"


# ------------------------------------------------------------------------------------ stage 2
class NFormerHolder(torch.nn.Module):
    """Holds an NFormer as `.nformer` (what train_nformer and checkpoints expect) without an image backbone."""

    def __init__(self, nformer, config: Optional[dict] = None):
        super().__init__()
        self.nformer = nformer
        self.config = dict(config or {})


def train_nformer(model, feats: torch.Tensor, pids: torch.Tensor, *, out_dir: str, epochs: int = 20,
                  steps: Optional[int] = None, seq_len: int = 7000, batch_size: int = 2, lr: float = 1e-5,
                  weight_decay: float = 5e-4, center_lr: float = 0.5, center_weight: float = 5e-4,
                  margin: float = 0.3, amp: str = "auto", device=None, seed: int = 0,
                  resume: Optional[str] = None, sampling: str = "centres", log_period: int = 50,
                  callback=None) -> List[dict]:
    """Stage 2: NFormer on frozen backbone features of the training set (labels 0..C-1).

    Each step draws batch_size neighbourhood sequences of seq_len features (NeighborhoodSampler)
    and applies CE + triplet + center loss to all refined features; Adam (official lr 1e-5).
    `steps` overrides epochs x (M // 30 // batch_size). callback(step, nformer) runs every log_period.
    Returns the loss history (one dict per step).
    """
    device = resolve_device(device)
    nformer = model.nformer.to(device)
    if nformer.classifier is None:
        raise ValueError("the NFormer needs a classifier (num_classes) for training")
    num_classes, dim = nformer.classifier.out_features, nformer.classifier.in_features
    if int(pids.max()) >= num_classes or int(pids.min()) < 0:
        raise ValueError(f"training pids must lie in [0, {num_classes}), got [{int(pids.min())}, {int(pids.max())}]")
    criterion = ReIDLoss(num_classes, dim, margin, center_weight).to(device)
    optimizer = make_optimizer(nformer, lr, weight_decay)
    center_optimizer = torch.optim.SGD(criterion.center.parameters(), lr=center_lr)
    scaler = _grad_scaler(device, amp)
    generator = torch.Generator().manual_seed(seed)
    sampler = NeighborhoodSampler(feats.to(device), pids.to(device), seq_len, batch_size, sampling,
                                  generator=generator)
    total = steps if steps is not None else epochs * len(sampler)
    log(f"stage 2: {feats.shape[0]} train features, sequences of {sampler.seq_len} x {batch_size}, "
        f"{total} steps, neighbour sampling '{sampler.strategy}'")
    history, start = [], 0
    if resume:
        state = load_checkpoint(resume, model, optimizer, criterion, center_optimizer)
        history, start = state["history"], state["extra"].get("step", 0)
        generator.manual_seed(seed + start)
        log(f"resumed stage 2 from {resume} at step {start}")
    ckpt = os.path.join(out_dir, "stage2_last.pth")
    started = time.time()
    nformer.train()
    bar = tqdm(range(start, total), desc="stage2", leave=False, dynamic_ncols=True)
    for step in bar:
        x, y = sampler.sample()
        with autocast(device, amp):
            logits, refined = nformer(x)
        loss, parts = criterion(logits.reshape(-1, num_classes).float(), refined.reshape(-1, dim).float(),
                                y.reshape(-1))
        _optimize(loss, optimizer, center_optimizer, scaler, criterion)
        value = float(loss.detach())
        history.append({"step": step + 1, "loss": value, **parts})
        bar.set_postfix(loss=f"{value:.3f}")
        if (step + 1) % log_period == 0 or step + 1 == total:
            log(f"stage2 step {step + 1}/{total}: loss {value:.3f} (ce {parts['ce']:.3f}, "
                f"triplet {parts['triplet']:.3f})")
            if callback is not None:
                callback(step + 1, nformer)
                nformer.train()
    save_checkpoint(ckpt, model, 2, epochs, optimizer, criterion, center_optimizer, history=history,
                    extra={"step": total})
    log(f"stage 2 done: {total - start} steps in {time.time() - started:.0f} s; checkpoint {ckpt}")
    return history


def plot_losses(histories: Dict[str, List[dict]], path: str, key: str = "loss") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, hist in histories.items():
        values = np.array([h[key] for h in hist])
        ax.plot(np.arange(1, len(values) + 1), values, alpha=0.35, label=f"{label} (per step)")
        if len(values) >= 10:
            w = max(2, len(values) // 20)
            ax.plot(np.arange(w, len(values) + 1), np.convolve(values, np.ones(w) / w, mode="valid"),
                    label=f"{label} (moving avg {w})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
