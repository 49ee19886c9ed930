"""The child processes of `nformer-bench check`: their environment, and one run streamed into the
check's log with its result lines handed over, interrupted at a time limit.

Each stage runs in a process of its own (a GPU fault ends that stage, not the run); a child prints
result items as RESULT_MARK + JSON lines (check_stages.py) and everything else goes to the log.
"""
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from nformer_bench import RESULT_MARK
from nformer_bench.environment import package_dir

INTERRUPT_GRACE_S = 20.0  # after SIGINT at a stage's limit (pytest writes its JUnit XML), then SIGKILL


def child_env(extra=None):
    """This process's environment, with nformer_bench and nformer_kernels importable as they are here.
    TRITON_INTERPRET is dropped unless extra sets it: only the dry run interprets Triton."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    roots = [str(Path(__file__).resolve().parent.parent)]
    package = package_dir()
    if package is not None:
        roots.append(str(package.parent))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, [*roots, env.get("PYTHONPATH")])))
    env.update(extra or {})
    return env


def stream(cmd, limit_s, log, cwd, on_item=None, env=None, lines=None):
    """Run cmd in cwd with its output going to log(line) (and into `lines` when given); result lines
    go to on_item(item). At limit_s the process group gets SIGINT, then SIGKILL after
    INTERRUPT_GRACE_S. Returns "ok", "timeout (> N s)" or "failed (exit N)"."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env or child_env(), cwd=cwd, start_new_session=True)
    timed_out = threading.Event()

    def signal_group(sig):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop():
        timed_out.set()
        signal_group(signal.SIGINT)
        try:
            proc.wait(INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)

    timer = threading.Timer(limit_s, stop)
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_MARK):
                if on_item is not None:
                    on_item(json.loads(line[len(RESULT_MARK):]))
            else:
                log(line.rstrip("\n"))
                if lines is not None:
                    lines.append(line.rstrip("\n"))
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # this process is being interrupted: take the stage down with it
            signal_group(signal.SIGKILL)
    if timed_out.is_set():
        return f"timeout (> {limit_s:.0f} s)"
    return "ok" if returncode == 0 else f"failed (exit {returncode})"
