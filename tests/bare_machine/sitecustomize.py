"""A bare machine, simulated: with this folder first on PYTHONPATH, the top-level packages named in
NFORMER_HIDE_PACKAGES (comma-separated) are not found on sys.path, as if not installed (import
raises ModuleNotFoundError, importlib.util.find_spec returns None). Pair it with
PYTEST_ADDOPTS="-p no:hypothesispytest" when hypothesis is hidden: its pytest plugin is installed
beside it. Used by tests/test_gpu_check.py."""
import importlib.machinery
import os

HIDDEN = frozenset(filter(None, os.environ.get("NFORMER_HIDE_PACKAGES", "").split(",")))

if HIDDEN:
    _find_spec = importlib.machinery.PathFinder.find_spec

    def _find_unhidden(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return _find_spec(name, path, target)

    importlib.machinery.PathFinder.find_spec = classmethod(_find_unhidden)
