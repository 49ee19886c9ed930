"""The user-error type of nformer_reid.

ReIDInputError (a ValueError) is what every check of a user's input raises: a bad option value,
a file that is missing, unreadable or of the wrong layout, an output folder that would lose
results. Its message names the file or the option. The CLI catches it in one place
(nformer_reid.cli.main), prints the message as one line on stderr and exits with status 2
(`--debug` shows the traceback instead). Subclasses: DatasetLayoutError (a dataset folder),
MissingDependency (an optional package), TrainingDiverged (a non-finite loss).

RankLost (a RuntimeError, not a user error) is a distributed run's rank finding, mid-run, that
another rank stopped answering (killed, out of memory, its own error): the CLI prints it as one
line and exits with status 1; the rank that failed says why in its own output.
"""
import re

# A collective that failed in the transport (gloo's tcp pairs, NCCL, c10d's store), as torch raises it.
_TRANSPORT = re.compile(r"gloo/|NCCL|c10d|ProcessGroup|Connection (closed|reset) by peer")


def one_line(exc: BaseException) -> str:
    """exc's message on one line (the CLI's form of every error it prints), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


class RankLost(RuntimeError):
    """Another rank of a distributed run stopped answering mid-run."""


def is_transport_failure(exc: BaseException) -> bool:
    """Is exc a collective's failure in the transport (a peer gone), not an error of the work?"""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or (
        isinstance(exc, RuntimeError) and bool(_TRANSPORT.search(str(exc))))


class ReIDInputError(ValueError):
    """A user error: the message names the file or option and says what is wrong."""


class TrainingDiverged(ReIDInputError):
    """The training loss became NaN or Inf; training stopped before the weights were saved."""
