"""nformer_reid: person re-identification with NFormer on top of nformer_kernels.

Datasets (Market-1501, DukeMTMC-reID, MSMT17, CUHK03 new protocol, synthetic), a ResNet + BNNeck
backbone, the two-stage training recipe, evaluation (CMC/mAP), k-reciprocal re-ranking and the
`nformer-reid` command line. Uses only the public API of nformer_kernels. The image pipeline
(backbone, loaders) needs torchvision: pip install nformer_kernels[reid].

Layout: config (every default), data/ (datasets, feature files), interop (features from torchreid
and fast-reid models), model, losses, solver, neighborhood, metrics, rerank, distributed
(evaluation over ranks), plotting, visualize (ranked-list pictures), engine/ (training stages,
evaluation, checkpoints), demo, commands, cli, utils/ (logging, optional dependencies). Library calls log to the "nformer_reid" logger and print nothing unless
logging is configured (nformer_reid.utils.setup_logging, which the CLI calls).

Bad input raises ValueError / TypeError naming the argument; user errors of files and options
(unreadable or malformed files, dataset layouts, option values) are ReIDInputError, a ValueError
that the CLI prints as one line (exit status 2). Every file is written atomically
(nformer_reid.utils.io).
"""
import logging
from typing import TYPE_CHECKING

from nformer_reid.utils.errors import ReIDInputError
from nformer_reid.utils.lazy import exports

logging.getLogger(__name__).addHandler(logging.NullHandler())  # quiet unless the application configures logging

# Imported on first use (nformer_reid.utils.lazy): `import nformer_reid.utils.io` stays light
# (nformer_bench check imports it before it rebuilds, and so must not load, nformer_kernels).
__getattr__ = exports(__name__, {
    "__version__": "nformer_kernels",
    "compute_distance_matrix": "nformer_reid.metrics", "evaluate_features": "nformer_reid.metrics",
    "evaluate_rank": "nformer_reid.metrics", "plot_cmc": "nformer_reid.plotting",
    "re_ranking": "nformer_reid.rerank", "re_ranking_sparse": "nformer_reid.rerank",
    "re_ranking_sparse_chunks": "nformer_reid.rerank"})
if TYPE_CHECKING:
    from nformer_kernels import __version__
    from nformer_reid.metrics import compute_distance_matrix, evaluate_features, evaluate_rank
    from nformer_reid.plotting import plot_cmc
    from nformer_reid.rerank import re_ranking, re_ranking_sparse, re_ranking_sparse_chunks

__all__ = ["ReIDInputError", "__version__", "compute_distance_matrix", "evaluate_features", "evaluate_rank",
           "plot_cmc", "re_ranking", "re_ranking_sparse", "re_ranking_sparse_chunks"]
