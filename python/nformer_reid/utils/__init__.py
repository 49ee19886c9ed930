"""Logging, progress bars and optional dependencies of nformer_reid."""
from nformer_reid.utils.deps import MissingDependency, import_torchvision
from nformer_reid.utils.logging import progress, reset_logging, setup_logging

__all__ = ["MissingDependency", "import_torchvision", "progress", "reset_logging", "setup_logging"]
