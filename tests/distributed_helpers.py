"""Spawning gloo / NCCL worlds for the torch.distributed tests: a free port, `world` processes
started with torch.multiprocessing (spawn), the test failing with the first failing rank's
traceback or after WORLD_TIMEOUT_S, and no child left behind. Each child writes its results to
out_dir/rank{r}.pt; spawn returns them in rank order."""
import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world, backend, out_dir, child, *extra):
    """Run child(rank, world, backend, port, out_dir, *extra) on `world` processes (a module-level
    function, importable by the spawned interpreters, as are `extra`); returns every rank's
    torch.load(out_dir/rank{r}.pt)."""
    ctx = mp.start_processes(child, args=(world, backend, free_port(), str(out_dir), *extra), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"a {backend} world of {world} did not finish within {WORLD_TIMEOUT_S} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        pytest.fail(f"a {backend} world of {world} failed:\n{exc}")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def error_of(fn):
    """(exception type name, message) of the TypeError / ValueError fn() raises, ("no error", "") if none."""
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return "no error", ""


def _cases_child(rank, world, backend, port, out_dir, run_cases):
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S // 2))
    try:
        torch.save(run_cases(rank, world, device), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def world_results(kind, run_cases, tmp_path_factory):
    """(world size, every rank's run_cases(rank, world, device) result) of one world: "single-process"
    (no process group), "gloo-1" (a group of one in this process), "gloo-P" or "nccl-P" (P spawned
    processes; NCCL skipped with the reason where fewer than P GPUs exist)."""
    if kind == "single-process":
        assert not dist.is_initialized()
        with torch.random.fork_rng():
            return 1, [run_cases(0, 1, torch.device("cpu"))]
    if kind == "gloo-1":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            return 1, [run_cases(0, 1, torch.device("cpu"))]
        except Exception:  # the traceback of a case, not of the teardown
            pytest.fail(traceback.format_exc())
        finally:
            dist.destroy_process_group()
    backend, size = kind.split("-")
    size = int(size)
    if backend == "nccl" and torch.cuda.device_count() < size:
        pytest.skip(f"NCCL needs {size} CUDA GPUs, this machine has {torch.cuda.device_count()}")
    return size, spawn(size, backend, tmp_path_factory.mktemp(kind), _cases_child, run_cases)
