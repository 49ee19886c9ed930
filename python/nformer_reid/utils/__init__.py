"""Logging, progress bars, argument checks, files, user errors and optional dependencies of nformer_reid."""
from nformer_reid.utils.deps import MissingDependency, import_torchvision
from nformer_reid.utils.errors import ReIDInputError, TrainingDiverged
from nformer_reid.utils.io import atomic_write, load_torch, save_figure, save_torch, write_json
from nformer_reid.utils.logging import progress, reset_logging, setup_logging

__all__ = ["MissingDependency", "ReIDInputError", "TrainingDiverged", "atomic_write", "import_torchvision",
           "load_torch", "progress", "reset_logging", "save_figure", "save_torch", "setup_logging", "write_json"]
