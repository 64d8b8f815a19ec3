"""Helpers for multi-rank tests: a gloo launcher, a torch.distributed ``Collectives``, an in-process fake.

Not a test module (no ``test_`` prefix) and free of conftest magic, so any test can import it
(``from distributed_utils import run_gloo``; pytest puts ``tests/`` on ``sys.path``).

- :func:`run_gloo` runs ``fn(collectives, *args)`` in W fresh processes (one subprocess per
  rank, gloo over a FileStore, short timeouts) and returns each rank's result, in rank order.
  ``fn`` is named ``"module:function"`` with ``module`` importable from ``tests/``; its result
  travels back through ``torch.save`` (tensors, dicts, lists...).
- :class:`ProcessGroupCollectives`: :class:`lightning_ties.merging.Collectives` over an
  initialised ``torch.distributed`` process group (tensors cross on the CPU for gloo).
- :func:`run_threads` / :class:`ThreadCollectives`: W ranks simulated by W threads of this
  process with a barrier: no process start-up, fast enough for hypothesis.
- :class:`RangeSource`: a state dict seen as one rank of a sharded model sees it (each key's
  flat range), counting the reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_ties.merging.sources import TensorSpec

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
#: tests/ and its folders (tests/merging, ...): where a rank imports its ``module:function`` target from
TEST_DIRS = [str(TESTS_DIR), *sorted(str(p) for p in TESTS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))]


class ProcessGroupCollectives:
    """``Collectives`` over the default (or given) ``torch.distributed`` process group."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        # gloo reduces CPU tensors; NCCL would take them where they are
        backend = self._dist.get_backend(self.group)
        return t.detach().contiguous() if backend != "gloo" else t.detach().cpu().contiguous()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = self._host(t).clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        local = self._host(t)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(parts, local, group=self.group)
        return torch.stack(parts).to(t.device)


_RANK_SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys, warnings
    from datetime import timedelta
    sys.path[:0] = [*{tests!r}, {root!r}]
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    rank, world, store_path, out, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds={timeout}))
    from distributed_utils import ProcessGroupCollectives
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    args = torch.load(os.path.join(out, "args.pt"), weights_only=False)
    try:
        result = fn(ProcessGroupCollectives(), *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{{rank}}.pt"))
    """
)


def run_gloo(world_size: int, target: str, *args: Any, timeout: float = 90.0) -> list[Any]:
    """Run ``target`` (``"module:function"``, called as ``fn(collectives, *args)``) on ``world_size`` gloo ranks.

    Each rank is a fresh ``python`` subprocess with one thread; the process group's timeout
    is ``timeout`` seconds and the whole run is killed after ``timeout + 60``. A rank that
    fails makes this raise with every failing rank's stderr. Returns the ranks' results.
    """
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(args, os.path.join(tmp, "args.pt"))
        script = _RANK_SCRIPT.format(tests=TEST_DIRS, root=str(REPO_ROOT), timeout=int(timeout))
        store = os.path.join(tmp, "store")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(r), str(world_size), store, tmp, target],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            for r in range(world_size)
        ]
        errors = []
        for r, proc in enumerate(procs):
            try:
                _, err = proc.communicate(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise AssertionError(f"rank {r} of {world_size} did not finish within {timeout + 60:.0f} s") from None
            if proc.returncode != 0:
                errors.append(f"rank {r} exited with {proc.returncode}:\n{err[-3000:]}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


class _ThreadWorld:
    def __init__(self, world_size: int, timeout: float) -> None:
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * world_size


class ThreadCollectives:
    """Rank ``rank`` of W threads sharing one :class:`_ThreadWorld`: collectives by a barrier."""

    def __init__(self, world: _ThreadWorld, rank: int, world_size: int) -> None:
        self.world, self.rank, self.world_size = world, rank, world_size
        self.calls = 0

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        self.world.slots[self.rank] = t.detach().clone()
        self.world.barrier.wait()
        got = [s for s in self.world.slots if s is not None]
        self.world.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        shapes = {(tuple(s.shape), s.dtype) for s in got}
        if len(shapes) != 1:
            raise AssertionError(f"ranks called a collective with different tensors: {shapes}")
        return got

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        got = self._exchange(t)
        total = got[0].clone()
        for other in got[1:]:
            total += other
        return total

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(t))


def run_threads(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> list[Any]:
    """Run ``fn(collectives, *args)`` as ``world_size`` ranks, one thread each; results in rank order.

    A rank that raises breaks the barrier, so the others stop too; the first error is re-raised.
    """
    world = _ThreadWorld(world_size, timeout)
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCollectives(world, rank, world_size), *args)
        except BaseException as err:  # noqa: BLE001  (re-raised below, in the caller's thread)
            errors[rank] = err
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is not None or any(e is not None for e in errors):
        raise first or next(e for e in errors if e is not None)
    return results


class RangeSource:
    """What one rank of a sharded model holds: each key's flat range ``shards[key]`` of ``state_dict``.

    ``spec`` stays global; ``get(key)`` returns the range (keys without a range: whole).
    ``reads`` counts the ``get`` calls per key.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], shards: Mapping[str, tuple[int, int]], label: str) -> None:
        self._tensors, self.shards, self.label = dict(state_dict), dict(shards), label
        self.reads: dict[str, int] = {}

    def keys(self) -> Sequence[str]:
        return list(self._tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self._tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        self.reads[key] = self.reads.get(key, 0) + 1
        t = self._tensors[key]
        if key not in self.shards:
            return t
        start, stop = self.shards[key]
        return t.reshape(-1)[start:stop]


def even_ranges(numel: int, world_size: int) -> list[tuple[int, int]]:
    """``numel`` entries cut into ``world_size`` contiguous ranges, as even as can be (rank order)."""
    cuts = [numel * r // world_size for r in range(world_size + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


__all__ = ["ProcessGroupCollectives", "RangeSource", "ThreadCollectives", "even_ranges", "run_gloo", "run_threads"]
