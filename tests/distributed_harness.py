"""Run a function on W gloo ranks on the CPU and collect what each rank returns.

``run_ranks(fn, world, *args)`` spawns ``world`` processes, each with a gloo process group
(60 s timeout), calls ``fn(rank, world, *args)`` and returns the ranks' results in rank order
(exchanged through ``torch.save`` files, so they may hold tensors). A rank that raises makes
the call raise with that rank's traceback; nothing waits longer than ``timeout`` seconds.
``fn`` must be a module-level function of an importable module (spawned processes import it).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

GROUP_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 150) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; their results in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, out, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            path = Path(out) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} wrote no result (hung: {hung}, exit codes {[p.exitcode for p in procs]})")
            record = torch.load(path, weights_only=False)  # our own children's files
            if "error" in record:
                raise RuntimeError(f"rank {r} failed:\n{record['error']}")
            results.append(record["ok"])
        return results
