"""nformer_reid: person re-identification with NFormer on top of nformer_kernels.

Datasets (Market-1501, DukeMTMC-reID, MSMT17, CUHK03 new protocol, synthetic), a ResNet + BNNeck
backbone, the two-stage training recipe, evaluation (CMC/mAP), k-reciprocal re-ranking and the
`nformer-reid` command line. Uses only the public API of nformer_kernels.
"""
from nformer_reid.metrics import compute_distance_matrix, evaluate_rank, plot_cmc
from nformer_reid.rerank import re_ranking, re_ranking_sparse

__version__ = "0.1.0"
__all__ = ["compute_distance_matrix", "evaluate_rank", "plot_cmc", "re_ranking", "re_ranking_sparse"]
