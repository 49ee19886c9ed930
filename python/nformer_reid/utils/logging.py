"""Logging of nformer_reid through the standard `logging` module.

Every module logs to `logging.getLogger(__name__)`, a child of the "nformer_reid" logger. The
package installs only a NullHandler, so library calls print nothing unless the application
configures logging; the CLI calls setup_logging (console on stdout, optionally a log file)
and reset_logging. Progress bars (tqdm, on stderr) show only when INFO is enabled and stderr
is a terminal.
"""
import logging
import sys
from typing import Iterable, List, Optional

from tqdm import tqdm

ROOT_LOGGER = "nformer_reid"
_FORMAT = "[nformer-reid %(asctime)s] %(message)s"
_DATE_FORMAT = "%H:%M:%S"
_installed: List[logging.Handler] = []


class _Formatter(logging.Formatter):
    def format(self, record):
        line = super().format(record)
        if record.levelno >= logging.WARNING:  # "[nformer-reid 12:00:00] warning: ..."
            head, _, tail = line.partition("] ")
            line = f"{head}] {record.levelname.lower()}: {tail}"
        return line


class _ConsoleHandler(logging.Handler):
    """Writes through tqdm.write, which keeps an active progress bar intact; sys.stdout is looked
    up per record so a replaced stdout (tests, notebooks) is honoured."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001  (logging's contract: report, never raise)
            self.handleError(record)


def setup_logging(log_file: Optional[str] = None, level: int = logging.INFO) -> logging.Logger:
    """Log nformer_reid records at `level` and above to stdout and, if given, append them to log_file.

    Replaces the handlers an earlier call installed, so it can run once per command."""
    reset_logging()
    logger = logging.getLogger(ROOT_LOGGER)
    _installed.append(_ConsoleHandler())
    if log_file:
        _installed.append(logging.FileHandler(log_file, mode="a", encoding="utf-8", delay=True))
    for handler in _installed:
        handler.setFormatter(_Formatter(_FORMAT, _DATE_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def reset_logging() -> None:
    """Remove (and close) the handlers setup_logging installed: library calls are quiet again."""
    logger = logging.getLogger(ROOT_LOGGER)
    while _installed:
        handler = _installed.pop()
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.NOTSET)


def progress(iterable: Iterable, desc: str, **kwargs) -> tqdm:
    """A transient tqdm bar, shown only when nformer_reid logs INFO and stderr is a terminal."""
    shown = logging.getLogger(ROOT_LOGGER).isEnabledFor(logging.INFO)
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None if shown else True, **kwargs)
