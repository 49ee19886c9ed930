"""nformer_kernels: fused O(N*k) kernels and modules for NFormer (CVPR 2022)."""
from nformer_kernels._extension import extension_available, extension_has_cuda
from nformer_kernels.backends import BACKENDS, available_backends, get_backend, set_backend, use_backend
from nformer_kernels.modules import NFormer, NFormerLayer, draw_landmarks
from nformer_kernels.ops import (KnnStats, affinity_knn, knn, landmark_affinity_knn, landmark_factors, neighbor_attention,
                                 reciprocal_mask, sparse_attention)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "KnnStats", "NFormer", "NFormerLayer", "affinity_knn", "available_backends", "draw_landmarks",
           "extension_available", "extension_has_cuda", "get_backend", "knn", "landmark_affinity_knn",
           "landmark_factors", "neighbor_attention", "reciprocal_mask", "set_backend", "sparse_attention",
           "use_backend"]
