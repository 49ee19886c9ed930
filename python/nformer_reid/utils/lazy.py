"""Lazy package exports (PEP 562): a package's public names import their modules on first use, so
importing one light module (nformer_reid.utils.io, .errors) does not pull numpy, tqdm or
matplotlib with it (nformer_bench writes its files with utils.io on a bare GPU machine)."""
import importlib
from typing import Callable, Dict


def exports(package: str, names: Dict[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: names maps each exported name to its module."""
    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
