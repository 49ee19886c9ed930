"""Spawning gloo / NCCL worlds for the torch.distributed tests: a free port, `world` processes
started with torch.multiprocessing (spawn), the test failing with the first failing rank's
traceback or after WORLD_TIMEOUT_S, and no child left behind. Each child writes its results to
out_dir/rank{r}.pt; spawn returns them in rank order."""
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world, backend, out_dir, child):
    """Run child(rank, world, backend, port, out_dir) on `world` processes (a module-level function,
    importable by the spawned interpreters); returns every rank's torch.load(out_dir/rank{r}.pt)."""
    ctx = mp.start_processes(child, args=(world, backend, free_port(), str(out_dir)), nprocs=world,
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
