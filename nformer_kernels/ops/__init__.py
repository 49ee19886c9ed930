"""The public ops, one module per op family: knn.py, reciprocal.py, attention.py.

Each module holds the public functions (argument checks in nformer_kernels/_checks.py, dispatch
through nformer_kernels/backends.py) and the fake kernels and autograd of its library ops.
"""
from nformer_kernels._checks import check_landmarks
from nformer_kernels.ops.attention import landmark_factors, neighbor_attention, sparse_attention
from nformer_kernels.ops.knn import PRECISIONS, KnnStats, affinity_knn, knn, landmark_affinity_knn
from nformer_kernels.ops.reciprocal import reciprocal_mask

__all__ = ["PRECISIONS", "KnnStats", "affinity_knn", "check_landmarks", "knn", "landmark_affinity_knn", "landmark_factors",
           "neighbor_attention", "reciprocal_mask", "sparse_attention"]
