"""Optional dependencies: torchvision (the image pipeline: backbone, transforms) is the `[reid]` extra.

Only the modules that need it (nformer_reid.model, nformer_reid.data.loader) import it, so the
feature commands (`features`, `demo`) run without it.
"""

from nformer_reid.utils.errors import ReIDInputError

INSTALL_HINT = "pip install nformer_kernels[reid] (or: pip install torchvision)"


class MissingDependency(ImportError, ReIDInputError):
    """An optional dependency is not installed; the message says what to install (an ImportError,
    and a ReIDInputError for the CLI: one line, exit status 2)."""


def import_torchvision():
    """The torchvision module, or MissingDependency with the install command."""
    try:
        import torchvision
        import torchvision.transforms  # noqa: F401  (the loaders use it; some builds import it lazily)
    except ImportError as exc:
        raise MissingDependency(f"torchvision is not installed; the image pipeline (train, eval) needs it: "
                                f"{INSTALL_HINT}") from exc
    return torchvision
