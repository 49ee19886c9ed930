"""The user-error type of nformer_reid.

ReIDInputError (a ValueError) is what every check of a user's input raises: a bad option value,
a file that is missing, unreadable or of the wrong layout, an output folder that would lose
results. Its message names the file or the option. The CLI catches it in one place
(nformer_reid.cli.main), prints the message as one line on stderr and exits with status 2
(`--debug` shows the traceback instead). Subclasses: DatasetLayoutError (a dataset folder),
MissingDependency (an optional package), TrainingDiverged (a non-finite loss).
"""


class ReIDInputError(ValueError):
    """A user error: the message names the file or option and says what is wrong."""


class TrainingDiverged(ReIDInputError):
    """The training loss became NaN or Inf; training stopped before the weights were saved."""
