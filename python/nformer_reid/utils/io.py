"""Files of nformer_reid: atomic writes, checked reads, and the output-folder policy.

Every file the application writes goes through `atomic_write` (or a helper built on it): the
bytes go to a temporary file next to the target, are flushed to disk, and the temporary file is
renamed over the target. A crash or Ctrl-C during the write leaves the previous file intact and
no partial file under the target's name (an interrupted write removes its temporary file; a
killed process can leave one `.<name>.tmp-*` behind, never a truncated target).

Reading: `load_torch` turns every way a torch file can be unreadable (missing, a folder, text,
truncated, not a zip/pickle) into a ReIDInputError naming the file. It loads with
torch.load(weights_only=True): tensors, numbers, strings and containers only, and with
allow_numpy=True also numeric numpy arrays (the few numpy globals `numpy_safe_globals` lists);
any other object in the pickle is refused without being built.

Output policy (`check_outputs`): a run refuses to replace a previous run's outputs unless
overwrite is set (the CLI's --overwrite), and never writes over one of its own input files.
`OutputLock`: one run per output at a time (an exclusively created lock file, held for the run).
`OutputManifest`: the files a run wrote, so that an --overwrite run removes the earlier run's
outputs it does not rewrite (and nothing else).
"""
import atexit
import contextlib
import datetime
import json
import os
import socket
import tempfile
from typing import Dict, Iterable, Iterator, Optional, Tuple

from nformer_reid.utils.errors import ReIDInputError


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def temporary_beside(path: str) -> Tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder (created if missing), named after it;
    ReIDInputError naming `path` when that is not possible."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    except OSError as exc:
        raise ReIDInputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def publish(tmp: str, path: str) -> None:
    """Rename the finished temporary file `tmp` to `path`, with the mode open() would have given it
    (mkstemp makes 0600). Raises OSError as os.replace does."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path` for writing; on a clean exit it is flushed, fsync'ed
    and renamed to `path`; on any exception (KeyboardInterrupt included) it is removed and `path`
    is left as it was. An OSError (disk full, no permission, a folder named `path`) becomes a
    ReIDInputError naming `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):  # disk full, permissions, a folder in the way: the file named, one line
            raise ReIDInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def save_torch(obj, path: str) -> str:
    """torch.save(obj) to path, atomically."""
    import torch

    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return path


def write_json(obj, path: str) -> str:
    """JSON (indent 2) to path, atomically."""
    text = json.dumps(obj, indent=2)
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path


def save_figure(fig, path: str, **kwargs) -> str:
    """A matplotlib figure as PNG to path, atomically."""
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", **kwargs)
    return path


def check_input_file(path: str, what: str) -> str:
    """path, if it names an existing regular file (symlinks followed); else ReIDInputError naming `what`."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ReIDInputError(f"{what}: expected a file path, got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise ReIDInputError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise ReIDInputError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ReIDInputError(f"{what} {path}: not readable (permission denied)")
    return path


def numpy_safe_globals() -> list:
    """What torch.load(weights_only=True) must allow to rebuild numeric numpy arrays, and nothing
    more: numpy's array reconstructor (under its numpy 1.x and 2.x module names, so a file written
    with either loads under either), ndarray, dtype and the dtype classes of bool, integer, float
    and complex arrays (numpy >= 1.25 builds a dtype as an instance of such a class). Object,
    string, bytes, void and datetime dtypes are left out: their arrays stay refused."""
    import numpy as np

    core = np.core if int(np.__version__.split(".")[0]) < 2 else np._core  # np.core warns on numpy 2
    reconstruct = core.multiarray._reconstruct
    allowed = [(reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    for code in "?bhilqBHILQefdgFDG":
        cls = type(np.dtype(code))
        if cls is not np.dtype and cls not in allowed:
            allowed.append(cls)
    return allowed


def load_torch(path: str, what: str, allow_numpy: bool = False):
    """torch.load(path, weights_only=True) on the CPU: no file can run code, whatever it holds.
    ReIDInputError naming `what` and the file for a missing, unreadable, truncated or non-PyTorch
    file, and for one holding objects that weights-only loading refuses (a pickled module, classes).
    allow_numpy also rebuilds numeric numpy arrays (and nothing else)."""
    weights_only = True
    import pickle
    import re
    import zipfile

    import torch

    path = check_input_file(path, what)
    if zipfile.is_zipfile(path):  # torch.save's format: every member's CRC, before anything is read from it
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise ReIDInputError(f"{what} {path}: a damaged PyTorch file ({type(exc).__name__}: "
                                 f"{str(exc).strip()[:120]})") from exc
        if damaged is not None:
            raise ReIDInputError(f"{what} {path}: a damaged PyTorch file: member {damaged!r} fails its CRC check")
    try:
        if weights_only and allow_numpy:
            with torch.serialization.safe_globals(numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, ImportError, TypeError, IndexError, UnicodeDecodeError, MemoryError) as exc:
        text = str(exc).strip()
        # weights-only refusals of an object (a global, a class to build) vs. bytes that are no pickle at all
        if weights_only and "Weights only load failed" in text and re.search(r"GLOBAL|global|Can only build|reduce",
                                                                              text):
            if allow_numpy:
                found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", text)
                culprit = f" (found {found.group(1) or found.group(2)})" if found else ""
                raise ReIDInputError(f"{what} {path}: holds Python objects other than tensors, numeric numpy "
                                     f"arrays, numbers, strings and containers{culprit}; such objects are never "
                                     "unpickled from files: save tensors or numpy arrays of numbers") from exc
            raise ReIDInputError(f"{what} {path}: holds Python objects other than tensors, numbers and containers "
                                 "(numpy arrays, classes), which are not loaded from untrusted files; save torch "
                                 "tensors (or a .npz archive for features)") from exc
        reason = text.splitlines()[0][:160] if text else ""
        raise ReIDInputError(f"{what} {path}: not a readable PyTorch file (truncated, or not written by "
                             f"torch.save): {type(exc).__name__}{': ' + reason if reason else ''}") from exc


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(out_dir: str, outputs: Iterable[str], inputs: Dict[str, Optional[str]], overwrite: bool,
                  flag: str = "--overwrite") -> None:
    """Refuse (ReIDInputError) an output folder that is a file, outputs that would replace a previous
    run's files (unless overwrite), and any output that is one of `inputs` ({option: path})."""
    out_dir = os.path.expanduser(out_dir)
    if not out_dir:
        raise ReIDInputError("--out: expected a folder, got an empty string")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ReIDInputError(f"--out {out_dir}: exists and is not a folder")
    probe = out_dir
    while not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if os.path.exists(probe) and (not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK)):
        raise ReIDInputError(f"--out {out_dir}: cannot create files under {probe}")
    paths = [os.path.join(out_dir, name) for name in outputs]
    for path in paths:
        if os.path.isdir(path):
            raise ReIDInputError(f"--out {out_dir}: {os.path.basename(path)} is a folder, but this run writes a "
                                 "file of that name")
        for option, given in inputs.items():
            if given and os.path.exists(path) and os.path.exists(given) and _same_file(path, given):
                raise ReIDInputError(f"{option} {given} is also an output of this run ({os.path.basename(path)} in "
                                     f"--out {out_dir}); choose another --out (inputs are never overwritten)")
    existing = [os.path.basename(p) for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise ReIDInputError(f"--out {out_dir} already holds {', '.join(existing)} from an earlier run; pass "
                             f"{flag} to replace them, or choose another --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a pid this system cannot hold: assume it runs
    return True


class OutputLock:
    """One run per output: `acquire` creates `path` exclusively (O_EXCL: of two runs started together
    exactly one succeeds) holding the run's pid, host and start time, and `release` removes it. A
    lock whose run is gone (same host, process dead; or this process's own, not held) is taken over;
    any other refuses the run (ReIDInputError naming `option` and `target`). Locks still held when
    the process exits are released (atexit), so a library caller's failed run does not block the
    next one."""

    _held = []

    def __init__(self, path: str, option: str, target: str):
        self.path, self.option, self.target = path, option, target

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as fh:
                holder = json.load(fh)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as held

    def _stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        if pid == os.getpid():
            return all(lock.path != self.path for lock in OutputLock._held)
        return not _alive(pid)

    def acquire(self) -> "OutputLock":
        """Take the lock (creating its folder), or raise ReIDInputError."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise ReIDInputError(f"{self.option} {self.target}: cannot create its folder: "
                                 f"{exc.strerror or exc}") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                       if holder else "starting")
                raise ReIDInputError(f"{self.option} {self.target} is in use by another run ({who}); wait for it "
                                     f"to finish or choose another {self.option} (no run active? delete {self.path})")
            except OSError as exc:
                raise ReIDInputError(f"{self.option} {self.target}: cannot create {self.path}: "
                                     f"{exc.strerror or exc}") from exc
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.datetime.now().isoformat(timespec="seconds")}, fh)
            OutputLock._held.append(self)
            return self
        raise ReIDInputError(f"{self.option} {self.target}: could not take {self.path} (other runs keep "
                             "starting and stopping); try again")

    def release(self) -> None:
        if self in OutputLock._held:
            OutputLock._held.remove(self)
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held):
            lock.release()

    @classmethod
    @contextlib.contextmanager
    def scope(cls):
        """Release the locks taken inside the block when it ends, however it ends."""
        before = list(cls._held)
        try:
            yield
        finally:
            for lock in [lock for lock in cls._held if lock not in before]:
                lock.release()

    @classmethod
    def beside(cls, path: str, option: str) -> "OutputLock":
        """The lock of a named output file: .<name>.nformer-reid.lock in its folder."""
        folder, name = os.path.split(os.path.abspath(path))
        return cls(os.path.join(folder, f".{name}.nformer-reid.lock"), option, path)

    @classmethod
    def of_folder(cls, out_dir: str) -> "OutputLock":
        """The lock of an --out folder: .nformer-reid.lock in it."""
        return cls(os.path.join(out_dir, ".nformer-reid.lock"), "--out", out_dir)


atexit.register(OutputLock.release_all)

MANIFEST = ".nformer-reid-outputs.json"


class OutputManifest:
    """The files the runs wrote in an --out folder (MANIFEST there). An --overwrite run removes,
    once it has succeeded (`finish`), the files an earlier run recorded that it did not rewrite, so
    the folder holds one run's results. Files no run recorded (a user's own) are never touched."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, MANIFEST)

    def recorded(self) -> list:
        try:
            with open(self.path) as fh:
                names = json.load(fh).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [n for n in names if isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..")]

    def finish(self, outputs: Iterable[str], overwrite: bool) -> list:
        """Record the outputs of this run that exist, with the earlier runs' recorded files that are
        still there; with overwrite, first remove those earlier files this run did not rewrite.
        Returns the names removed."""
        outputs, recorded = set(outputs), self.recorded()
        removed = []
        for name in (n for n in recorded if overwrite and n not in outputs):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.out_dir, name))
                removed.append(name)
        written = sorted(n for n in outputs | set(recorded) if os.path.isfile(os.path.join(self.out_dir, n)))
        with atomic_write(self.path, "w") as fh:
            json.dump({"outputs": written}, fh)
        return removed

