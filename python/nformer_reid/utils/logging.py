"""Logging of nformer_reid through the standard `logging` module.

Every module logs to `logging.getLogger(__name__)`, a child of the "nformer_reid" logger. The
package installs only a NullHandler, so library calls print nothing unless the application
configures logging; the CLI calls setup_logging (console on stdout, optionally a log file)
and reset_logging. Progress: a tqdm bar on stderr when INFO is enabled and stderr is a
terminal; otherwise (a pipe, a file, CI) plain log lines at most every PROGRESS_LOG_SECONDS,
never carriage-return updates.
"""
import logging
import sys
import time
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


PROGRESS_LOG_SECONDS = 30.0
_progress_logger = logging.getLogger(ROOT_LOGGER + ".progress")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """The non-terminal stand-in of a tqdm bar: iterates, keeps set_postfix values, and logs
    "<desc>: i/total (p%) elapsed H:MM:SS eta H:MM:SS key=value ..." at most every `interval`
    seconds (none for short loops). initial/total as tqdm's: the count starts at `initial` (items
    done before), of `total` (default initial + len(iterable)); the ETA is the remaining items at
    the rate of this loop's own items."""

    def __init__(self, iterable: Iterable, desc: str, interval: float = None, initial: int = 0,
                 total: Optional[int] = None):
        self.iterable, self.desc, self.initial = iterable, desc, initial
        self.interval = PROGRESS_LOG_SECONDS if interval is None else interval
        if total is None:
            try:
                total = initial + len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.postfix = {}

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs

    def _line(self, done: int, elapsed: float) -> str:
        count = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else f"{done}"
        timing = f"elapsed {_clock(elapsed)}"
        if self.total and done > self.initial:
            timing += f" eta {_clock(elapsed / (done - self.initial) * max(0, self.total - done))}"
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {count} {timing}" + (f" {extra}" if extra else "")

    def __iter__(self):
        start = last = time.monotonic()
        for done, item in enumerate(self.iterable, self.initial + 1):
            yield item
            now = time.monotonic()
            if now - last >= self.interval:
                last = now
                _progress_logger.info("%s", self._line(done, now - start))

    def close(self) -> None:
        pass


def progress(iterable: Iterable, desc: str, **kwargs):
    """A transient tqdm bar when nformer_reid logs INFO and stderr is a terminal; otherwise a
    LogProgress (periodic plain log lines). Both iterate `iterable` and take set_postfix."""
    shown = logging.getLogger(ROOT_LOGGER).isEnabledFor(logging.INFO)
    stream = sys.stderr
    try:
        interactive = shown and stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        interactive = False
    if not interactive:
        return LogProgress(iterable, desc, initial=kwargs.get("initial", 0), total=kwargs.get("total"))
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=stream, **kwargs)
