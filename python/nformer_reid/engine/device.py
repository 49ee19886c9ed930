"""Device choice and mixed precision, shared by training and evaluation."""
import contextlib

import torch

from nformer_reid.utils.checks import as_device

AMP_MODES = ("auto", "bf16", "fp16", "none")


def resolve_device(device=None) -> torch.device:
    """None / "auto": cuda when available, else cpu; else the device named, which must be present
    (ValueError naming `device` otherwise)."""
    return as_device(device)


def describe_device(device=None, threads: bool = False) -> str:
    """What numbers were measured on: "cpu" ("cpu (2 threads)" with threads), "cuda:0 (<GPU name>)"."""
    device = resolve_device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu" and threads:
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def autocast(device: torch.device, amp: str = "auto"):
    """bf16/fp16 autocast on CUDA ("auto" = bf16); CPU runs in fp32. device: a torch.device or its name."""
    device = as_device(device)
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'none', got {amp!r}")
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling, needed (and enabled) only for fp16 on CUDA."""
    device = as_device(device)
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'none', got {amp!r}")
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")
