"""Argument types and the user-error exit of `nformer-bench`: a bad argument is one line on stderr
and exit status 2 (as nformer-reid), never a traceback or a run on nonsense sizes."""
import argparse


class BenchArgumentError(SystemExit):
    """A user error: cli.main prints `nformer-bench: error: <message>` and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse with its errors as BenchArgumentError (one line, exit 2), for every subcommand."""

    def error(self, message):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""  # "nformer-bench run" -> "run"
        raise BenchArgumentError(f"{command}: {message}" if command else message)


def _int(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts)."""
    return _int(text, 1, ">= 1")


def nonnegative_int(text: str) -> int:
    return _int(text, 0, ">= 0")


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def int_list(text: str) -> list:
    """Comma-separated integers >= 1 ("1e6" style accepted), at least one."""
    try:
        values = [int(float(tok)) for tok in text.split(",") if tok.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


DEVICES = ("cpu", "cuda")


def device(name):
    """torch.device for --device (None: cuda when available); BenchArgumentError for anything but
    cpu/cuda, or cuda without a GPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in DEVICES:
        raise BenchArgumentError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchArgumentError("--device cuda: no CUDA device is available")
    return torch.device(name)
