"""Training stages, evaluation and checkpoints (plain PyTorch loops).

  backbone_training  stage 1: the backbone (CE + triplet + center loss)
  nformer_training   stage 2: the NFormer on frozen features
  evaluation         feature extraction, NFormer refinement, mAP/mINP/CMC (score), the compare pipeline
  checkpoints        the one checkpoint format
  device             device choice and autocast
  ddp                torchrun process groups, rank-0 writes, global-batch losses and BatchNorm (DDP training)
"""
from nformer_reid.engine.backbone_training import train_backbone
from nformer_reid.engine.checkpoints import load_checkpoint, load_model, save_checkpoint
from nformer_reid.engine.device import autocast, resolve_device
from nformer_reid.engine.evaluation import (Comparison, RerankParams, compare, extract_features, format_result, refine,
                                            refine_features, score, score_distances)
from nformer_reid.engine.nformer_training import train_nformer

__all__ = ["Comparison", "RerankParams", "autocast", "compare", "extract_features", "format_result", "load_checkpoint",
           "load_model", "refine", "refine_features", "resolve_device", "save_checkpoint", "score", "score_distances",
           "train_backbone", "train_nformer"]
