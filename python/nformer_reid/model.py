"""Re-ID model: torchvision ResNet backbone (last stride 1, GAP, 2048->256 projection, BNNeck,
classifier) with the NFormer of nformer_kernels on top, plus weight loading (local ImageNet
file, the official nformer_model.pth). Needs torchvision (the `[reid]` extra)."""
import logging
import os
import re
import warnings
from typing import Optional

import torch
from torch import nn

import nformer_kernels as nk
from nformer_reid.config import ARCHS, KnnOptions, TrainConfig
from nformer_reid.utils.checks import as_int
from nformer_reid.utils.deps import import_torchvision
from nformer_reid.utils.errors import ReIDInputError, one_line
from nformer_reid.utils.io import load_torch

torchvision = import_torchvision()
logger = logging.getLogger(__name__)



def _load_state_dict(path_or_state, what: str = "weights file"):
    """A state dict from a file (a state dict, or a dict holding one under "state_dict" / "model";
    loaded weights-only, so a pickled module or any other object is refused, never run) or given
    directly; ReIDInputError naming the file when it is unreadable or holds something else
    (TypeError for a non-mapping given directly)."""
    source = None
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        state = load_torch(source, what)
    else:
        state = path_or_state
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        if source is not None:
            raise ReIDInputError(f"{what} {source}: expected a state dict, got {type(state).__name__}")
        raise TypeError(f"expected a state dict, got {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        where = f"{what} {source}: " if source else ""
        raise ReIDInputError(f"{where}entry {bad[0]!r} of the state dict is not a named tensor")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


class Backbone(nn.Module):
    """ResNet (torchvision) -> GAP -> Linear(C, feat_dim) -> BatchNorm1d (bias frozen) -> classifier.

    Training returns (logits, feat before BN) for CE / (triplet, center); eval returns the
    feature after BN (reid-strong-baseline's "neck feat after"). stem_relu=False reproduces the
    official NFormer / reid-strong-baseline ResNet, whose stem has no ReLU after bn1 (needed to
    evaluate its checkpoints); torchvision's network has it.
    """

    def __init__(self, num_classes: int, arch: str = TrainConfig.arch, feat_dim: int = TrainConfig.feat_dim,
                 last_stride: int = 1, pretrained: Optional[str] = None, stem_relu: bool = True, verbose: bool = True):
        super().__init__()
        num_classes = as_int(num_classes, "num_classes", minimum=1)
        feat_dim = as_int(feat_dim, "feat_dim", minimum=1)
        last_stride = as_int(last_stride, "last_stride")
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        base = getattr(torchvision.models, arch)(weights=None)
        if last_stride == 1:
            block = base.layer4[0]
            (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        in_planes = base.fc.in_features
        del base.fc, base.avgpool
        self.base, self.stem_relu = base, stem_relu
        self.arch, self.feat_dim, self.num_classes = arch, feat_dim, num_classes
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.projection = nn.Linear(in_planes, feat_dim)
        self.bottleneck = nn.BatchNorm1d(feat_dim)
        self.bottleneck.bias.requires_grad_(False)  # BNNeck: no shift
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)
        if pretrained:
            self.load_imagenet(pretrained, verbose=verbose)
        elif verbose:
            logger.warning("%s: random initialisation (no ImageNet weights file given; expect far lower accuracy "
                           "than published numbers)", arch)

    def load_imagenet(self, path: str, verbose: bool = True) -> None:
        """Load torchvision-layout ImageNet weights (e.g. resnet50-19c8e357.pth) into the ResNet; fc is skipped."""
        state = {k: v for k, v in _load_state_dict(path, "--pretrained").items() if not k.startswith("fc.")}
        own = self.base.state_dict()
        wrong = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if not wrong:
            wrong = sorted(k for k in state if state[k].is_floating_point() != own[k].is_floating_point()
                           or (state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())))
        if wrong or missing or unexpected:
            raise ReIDInputError(f"{path} does not fit {self.arch}: {len(wrong)} shape mismatches / dtype / NaN-Inf problems (e.g. {wrong[:3]}), "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.base.load_state_dict(state)
        if verbose:
            logger.info("%s: loaded ImageNet weights from %s", self.arch, path)

    def feature_map(self, x):
        b = self.base
        x = b.bn1(b.conv1(x))
        if self.stem_relu:
            x = b.relu(x)
        x = b.maxpool(x)
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x):
        feat = self.projection(self.gap(self.feature_map(x)).flatten(1))
        bn_feat = self.bottleneck(feat)
        if self.training:
            return self.classifier(bn_feat), feat
        return bn_feat


class ReIDModel(nn.Module):
    """backbone (images -> features) + nformer (feature sets -> refined features).

    State-dict names follow the official nformer_model.pth for the backbone (backbone.base.*,
    backbone.projection, backbone.bottleneck, backbone.classifier); the NFormer is nk.NFormer.
    knn_precision (its neighbour search, nk.knn's precision) is a run setting, not part of `config`.
    """

    def __init__(self, num_classes: int, arch: str = TrainConfig.arch, feat_dim: int = TrainConfig.feat_dim,
                 last_stride: int = 1, pretrained: Optional[str] = None, stem_relu: bool = True,
                 nformer_depth: int = TrainConfig.nformer_depth, nformer_heads: int = 2,
                 nformer_landmarks: int = TrainConfig.nformer_landmarks, nformer_topk: int = TrainConfig.nformer_topk,
                 nformer_ffn_dim: Optional[int] = None, nformer_dropout: float = 0.1, verbose: bool = True,
                 knn_precision: str = KnnOptions.knn_precision):
        super().__init__()
        self.config = dict(num_classes=num_classes, arch=arch, feat_dim=feat_dim, last_stride=last_stride,
                           stem_relu=stem_relu, nformer_depth=nformer_depth, nformer_heads=nformer_heads,
                           nformer_landmarks=nformer_landmarks, nformer_topk=nformer_topk,
                           nformer_ffn_dim=nformer_ffn_dim, nformer_dropout=nformer_dropout)
        self.backbone = Backbone(num_classes, arch, feat_dim, last_stride, pretrained, stem_relu, verbose)
        self.nformer = nk.NFormer(dim=feat_dim, depth=nformer_depth, num_heads=nformer_heads,
                                  num_landmarks=nformer_landmarks, topk=nformer_topk, ffn_dim=nformer_ffn_dim,
                                  dropout=nformer_dropout, num_classes=num_classes, knn_precision=knn_precision)

    def forward(self, images):
        return self.backbone(images)

    def refine(self, feats, **kwargs):
        """NFormer over a feature set (N,d)|(B,N,d); kwargs: landmarks, generator, query_mask."""
        return self.nformer(feats, **kwargs)

    @classmethod
    def from_config(cls, config: dict, verbose: bool = False,
                    knn_precision: str = KnnOptions.knn_precision) -> "ReIDModel":
        return cls(**{**config, "verbose": verbose, "knn_precision": knn_precision})


def _infer_arch(state, prefix):
    """torchvision ResNet name from the blocks per stage (and bottleneck vs basic blocks)."""
    block_ids = {stage: set() for stage in range(1, 5)}
    for key in state:
        m = re.match(re.escape(prefix) + r"layer([1-4])\.(\d+)\.", key)
        if m:
            block_ids[int(m.group(1))].add(int(m.group(2)))
    blocks = tuple(len(block_ids[stage]) for stage in range(1, 5))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
             ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
    if (blocks, bottleneck) not in known:
        raise ValueError(f"backbone with blocks per stage {blocks} is not a torchvision ResNet")
    return known[blocks, bottleneck]


def load_official_checkpoint(path_or_state, num_landmarks: int = TrainConfig.nformer_landmarks,
                             topk: int = TrainConfig.nformer_topk, num_heads: int = 2,
                             strict: bool = True, knn_precision: str = KnnOptions.knn_precision,
                             depth: Optional[int] = None) -> ReIDModel:
    """ReIDModel from the official NFormer release (nformer_model.pth: backbone.* + nformer.*).

    The backbone is ResNet-50 without the stem ReLU (as the official code); the nformer.* part is
    read by nk.NFormer.from_official (Conv1D (in,out) weights transposed, BatchNorm head included).
    num_landmarks / topk / num_heads are not stored in the file: the official defaults are 5/20/2.
    knn_precision: the NFormer's neighbour search (nk.knn's precision). depth: the NFormer blocks the
    file must hold (None: whatever it holds; `eval --official` asks for the release's 4, or
    --nformer-depth), so a truncated file is refused.
    """
    where = f"{os.fspath(path_or_state)}: " if isinstance(path_or_state, (str, os.PathLike)) else ""
    state = _load_state_dict(path_or_state, "--official")
    for key in ("backbone.classifier.weight", "nformer.h.0.mlp.c_fc.w"):
        if key not in state:
            raise ReIDInputError(f"{where}not an official nformer_model.pth: no {key!r} key")
    for key, value in state.items():
        if key.startswith("backbone.") and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ReIDInputError(f"{where}weight {key!r} holds NaN or Inf")
    if state["backbone.classifier.weight"].dim() != 2 or state["nformer.h.0.mlp.c_fc.w"].dim() != 2:
        raise ReIDInputError(f"{where}backbone.classifier.weight and nformer.h.0.mlp.c_fc.w must be 2-D")
    num_classes, feat_dim = state["backbone.classifier.weight"].shape
    found = sum(1 for k in state if k.startswith("nformer.h.") and k.endswith(".attn.c_attn.w"))
    if depth is not None and found != depth:
        raise ReIDInputError(f"{where}holds {found} NFormer blocks, not {depth}: a truncated or edited checkpoint "
                             f"(--nformer-depth {found} loads it as it is)")
    depth = found
    try:
        arch = _infer_arch(state, "backbone.base.")
        nformer = nk.NFormer.from_official(state, num_classes=num_classes, strict=strict, num_heads=num_heads,
                                           num_landmarks=num_landmarks, topk=topk, knn_precision=knn_precision)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        if not where:
            raise
        raise ReIDInputError(f"{where}{one_line(exc)[:300]}") from exc
    model = ReIDModel(num_classes, arch=arch, feat_dim=feat_dim, stem_relu=False, nformer_depth=depth,
                      nformer_heads=num_heads, nformer_landmarks=num_landmarks, nformer_topk=topk,
                      nformer_ffn_dim=state["nformer.h.0.mlp.c_fc.w"].shape[1], verbose=False)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    wrong = sorted(k for k in backbone_state.keys() & own.keys() if backbone_state[k].shape != own[k].shape)
    if wrong:
        raise ReIDInputError(f"{where}official backbone: shape mismatches {wrong[:3]}")
    missing, unexpected = model.backbone.load_state_dict(backbone_state, strict=False)
    if missing or unexpected:
        msg = f"{where}official backbone: missing keys {missing}, unexpected keys {unexpected}"
        if strict:
            raise ReIDInputError(msg)
        warnings.warn(msg, stacklevel=2)
    model.nformer = nformer
    return model
