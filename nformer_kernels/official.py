"""The official NFormer checkpoint layout (haochenheheda/NFormer, nformer_model.pth) -> NFormer.

Official blocks are GPT-style: Conv1D weights stored (in, out) as `*.w`, LayerNorm gain/bias as
`g`/`b`, under `nformer.h.{i}.` (or `h.{i}.` without the full model's prefix), then the
BatchNorm head and the classifier.
"""
import re
from collections.abc import Mapping
from typing import Dict, List, Tuple

import torch

BLOCK = {  # official name -> (our name, transpose the Conv1D (in,out) weight)
    "attn.c_attn.w": ("qkv.weight", True), "attn.c_attn.b": ("qkv.bias", False),
    "attn.c_proj.w": ("out_proj.weight", True), "attn.c_proj.b": ("out_proj.bias", False),
    "ln_1.g": ("norm1.weight", False), "ln_1.b": ("norm1.bias", False),
    "mlp.c_fc.w": ("fc1.weight", True), "mlp.c_fc.b": ("fc1.bias", False),
    "mlp.c_proj.w": ("fc2.weight", True), "mlp.c_proj.b": ("fc2.bias", False),
    "ln_2.g": ("norm2.weight", False), "ln_2.b": ("norm2.bias", False),
}
HEAD = ("bottleneck.weight", "bottleneck.bias", "bottleneck.running_mean", "bottleneck.running_var",
        "bottleneck.num_batches_tracked", "classifier.weight")


def nformer_subset(state_dict) -> Dict[str, torch.Tensor]:
    """The NFormer part of an official state dict, without `module.` / `nformer.` prefixes."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    sd = {re.sub(r"^module\.", "", str(key)): val for key, val in state_dict.items()}
    for key, val in state_dict.items():
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"state_dict[{str(key)!r}] must be a tensor, got {type(val).__name__}")
    if any(key.startswith("nformer.") for key in sd):  # a full model: keep the NFormer part
        sd = {key[len("nformer."):]: val for key, val in sd.items() if key.startswith("nformer.")}
    return sd


def architecture(state_dict) -> dict:
    """dim, depth, ffn_dim (when stored) and num_classes (None without a classifier), read from the tensors."""
    sd = nformer_subset(state_dict)
    if "h.0.attn.c_attn.w" not in sd:
        raise ValueError("state_dict has no official NFormer block 'h.0.attn.c_attn.w' "
                         "(with or without the 'nformer.' prefix)")
    blocks = sorted({int(m.group(1)) for key in sd if (m := re.match(r"h\.(\d+)\.", key))})
    if blocks != list(range(len(blocks))):
        missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
        raise ValueError(f"state_dict has blocks {blocks} but not {missing}: a truncated or edited checkpoint")
    config = {"dim": sd["h.0.attn.c_attn.w"].shape[0], "depth": len(blocks)}
    if "h.0.mlp.c_fc.w" in sd:
        config["ffn_dim"] = sd["h.0.mlp.c_fc.w"].shape[1]
    config["num_classes"] = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else None
    return config


def convert(state_dict, depth: int, with_classifier: bool,
            own: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """(our state dict, missing official keys, unexpected official keys) for a model of `depth`
    blocks whose own state dict is `own` (shapes are checked against it)."""
    sd = nformer_subset(state_dict)
    ours, used = {}, set()
    expected = [f"h.{i}.{name}" for i in range(depth) for name in BLOCK]
    expected += [k for k in HEAD if k != "classifier.weight" or with_classifier]
    for key in expected:
        if key not in sd:
            continue
        used.add(key)
        tensor = sd[key]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict entry {key} must be a tensor, got {type(tensor).__name__}")
        if key != "bottleneck.num_batches_tracked":
            if not tensor.is_floating_point():
                raise TypeError(f"state_dict tensor {key} must be floating point, got {tensor.dtype}")
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"state_dict tensor {key} contains NaN or Inf")
        m = re.match(r"h\.(\d+)\.(.+)", key)
        if m:
            name, transpose = BLOCK[m.group(2)]
            ours[f"blocks.{m.group(1)}.{name}"] = tensor.t() if transpose else tensor
        else:
            ours[key] = tensor
    missing = [k for k in expected if k not in used]
    unexpected = [k for k in sd if k not in used]
    for key, tensor in ours.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"state_dict tensor for {key} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    return ours, missing, unexpected
