"""Logging, progress bars, argument checks, files, user errors and optional dependencies of nformer_reid."""
from typing import TYPE_CHECKING

from nformer_reid.utils.errors import ReIDInputError, TrainingDiverged
from nformer_reid.utils.lazy import exports

# The rest on first use: utils.logging imports tqdm (nformer_reid.utils.lazy).
__getattr__ = exports(__name__, {
    "MissingDependency": "nformer_reid.utils.deps", "import_torchvision": "nformer_reid.utils.deps",
    "atomic_write": "nformer_reid.utils.io", "load_torch": "nformer_reid.utils.io",
    "save_figure": "nformer_reid.utils.io", "save_torch": "nformer_reid.utils.io",
    "write_json": "nformer_reid.utils.io", "progress": "nformer_reid.utils.logging",
    "reset_logging": "nformer_reid.utils.logging", "setup_logging": "nformer_reid.utils.logging"})
if TYPE_CHECKING:
    from nformer_reid.utils.deps import MissingDependency, import_torchvision
    from nformer_reid.utils.io import atomic_write, load_torch, save_figure, save_torch, write_json
    from nformer_reid.utils.logging import progress, reset_logging, setup_logging

__all__ = ["MissingDependency", "ReIDInputError", "TrainingDiverged", "atomic_write", "import_torchvision",
           "load_torch", "progress", "reset_logging", "save_figure", "save_torch", "setup_logging", "write_json"]
