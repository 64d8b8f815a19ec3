"""TIES's merge pass over one key on the CPU: chunk by chunk, its columns split over threads.

The in-place kernel ``steps.ties_chunk_`` runs tens of small torch ops per chunk. With several
torch threads each op is a fork/join of torch's intra-op pool, and on a VM (or a busy host) a
join can wait ~0.5 ms for a descheduled core: tens of thousands of them made two threads far
slower than one. :class:`TiesPass` instead cuts a key's columns into one range per thread and
merges the ranges side by side with single-threaded ops (:func:`.reading.single_threaded_pool`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .contested import Contested
from .cpu_kernels import ties_merger
from .reading import TaskReader, single_threaded_pool
from .steps import ThresholdTrim, ties_chunk_

# The compiled loop's chunks are this many of the reader's: fewer calls; a chunk handed back is rare
_COMPILED_CHUNK_FACTOR = 4


class TiesPass:
    """TIES's merge pass (trim, elect, disjoint merge) over every chunk of a key, in place.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> from lightning_ties.merging.steps import disjoint_merge
        >>> from lightning_ties.merging.select import MagnitudeThreshold
        >>> reader = TaskReader(StateDictSource({"w": torch.zeros(3)}), [StateDictSource({"w": torch.tensor([1.0, -2.0, 3.0])})])
        >>> out = torch.empty(3)
        >>> step = ThresholdTrim([MagnitudeThreshold(1.0, kept=2, n_greater=2, n_equal=1)], torch.float32)
        >>> int(TiesPass(reader, "mass", "mean").run("w", step, out, Contested(disjoint_merge, "mean"))), out
        (0, tensor([ 0., -2.,  3.]))
    """

    def __init__(self, reader: TaskReader, sign: str, merge: str, entries: int = 0) -> None:
        self.reader, self.sign, self.merge = reader, sign, merge
        # the compiled loop of .cpu_kernels for TIES's default recipe on float32 CPU inputs (None: torch ops)
        compiled = sign == "mass" and merge == "mean" and reader.on_cpu and reader.compute_dtype == torch.float32
        self._compiled = ties_merger(entries) if compiled else None
        self._pool: Any = None
        self._pool_size = 0
        self._pool_context: Any = None

    def run(self, key: str, trim_step: ThresholdTrim, out: torch.Tensor, contested: Contested) -> torch.Tensor:
        """TIES's in-place kernel over every chunk of ``key``; the sum of its elected signs.

        On the CPU with several torch threads, the key's columns are cut into one range per
        thread, merged side by side by single-threaded ops (see
        :func:`.reading.single_threaded_pool`): the columns are independent, the sign sums
        are exact integers and the contested entries are kept per range. The threshold ties a
        task may still keep are kept afterwards (:meth:`_keep_ties`): the ranges merge without
        them and note where they lie, then the first ones in flat order are kept and their
        columns merged again, so the result is the one thread's, bit for bit.
        """
        reader = self.reader
        base, fts = reader.inputs(key)
        n = base.numel()
        workers = min(torch.get_num_threads(), n // reader.chunk_size)
        if not reader.on_cpu or workers < 2:
            return self._range(base, fts, 0, n, trim_step, out, contested, "", [])
        if self._pool is None or self._pool_size != workers:
            self.close()
            self._pool_context = single_threaded_pool(workers)
            self._pool, self._pool_size = self._pool_context.__enter__(), workers
        cuts = [n * w // workers for w in range(workers + 1)]
        # the tasks that keep some but not all of their ties (kept zeros change nothing: not looked
        # for); a range looks for no more of them than the budget (the first ones are kept)
        needy = {i: left for i, left in enumerate(trim_step.tie_budget) if left > 0 and trim_step.thresholds[i].value != 0.0}
        steps = [trim_step.restart() for _ in range(workers)]
        for step in steps:
            step.tie_budget, step.watch = [0] * reader.n_tasks, dict(needy)
        parts = [Contested(contested.combine, contested.merge) for _ in range(workers)]
        ties: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(workers)]
        tags = [f"@{w}" for w in range(workers)]
        totals = self._pool.map(self._range, [base] * workers, [fts] * workers, cuts[:-1], cuts[1:], steps, [out] * workers, parts, tags, ties)
        total = torch.stack(list(totals)).sum()
        for part in parts:
            contested.extend(part)
        if needy:
            total += self._keep_ties(base, fts, trim_step, out, [found for range_ties in ties for found in range_ties], contested)
        return total

    def _range(
        self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, trim_step: ThresholdTrim,
        out: torch.Tensor, found: Contested, tag: str, ties: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:  # fmt: skip
        """``ties_chunk_`` over the columns ``[begin, end)``, chunk by chunk, in scratch buffers ``tag``.

        The ties of the tasks ``trim_step`` watches go to ``ties`` as ``(task, flat positions)``, in flat order.
        """
        if self._compiled is not None and all(t.dtype == torch.float32 for t in (base, *fts)):
            return self._range_compiled(base, fts, begin, end, trim_step, out, found, tag, ties)
        return self._range_torch(base, fts, begin, end, trim_step, out, found, tag, ties)

    def _range_torch(
        self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, trim_step: ThresholdTrim,
        out: torch.Tensor, found: Contested, tag: str, ties: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:  # fmt: skip
        """:meth:`_range` by ``ties_chunk_``'s torch ops."""
        total = torch.zeros((), dtype=torch.int64, device=self.reader.device)
        for start, taus in self.reader.chunks_of(base, fts, begin, end, buffer=f"taus{tag}"):
            trimmed = self.reader.buffer(f"trimmed{tag}", taus.shape[1])
            stop = start + taus.shape[1]
            chunk_signs, cols = ties_chunk_(taus, trim_step, out[start:stop], trimmed, self.sign, self.merge)
            total += chunk_signs
            if cols is not None:
                found.collect_columns(start, cols, trimmed)
            ties.extend((task, positions + start) for task, positions in trim_step.seen)
        return total

    def _range_compiled(
        self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, trim_step: ThresholdTrim,
        out: torch.Tensor, found: Contested, tag: str, ties: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:  # fmt: skip
        """:meth:`_range` by the compiled loop, chunk by chunk; a chunk it hands back (a tie some task keeps only
        in part, a contested entry) is merged again by the torch ops, which keep, note and collect them."""
        total = 0
        size = self.reader.chunk_size * _COMPILED_CHUNK_FACTOR
        base, fts = base.detach(), [ft.detach() for ft in fts]
        for start in range(begin, end, size):
            stop = min(end, start + size)
            # the tasks keeping some but not all of their (non-zero) threshold ties here: their ties go back
            tie_values = [t.value if (left > 0 or i in trim_step.watch) and t.value != 0.0 else 0.0
                          for i, (t, left) in enumerate(zip(trim_step.thresholds, trim_step.tie_budget))]
            signs, handed_back = self._compiled(base[start:stop], [ft[start:stop] for ft in fts], trim_step.cuts,
                                                tie_values, out[start:stop])
            if handed_back:
                signs = int(self._range_torch(base, fts, start, stop, trim_step, out, found, tag, ties))
            total += signs
        return torch.tensor(total, dtype=torch.int64, device=self.reader.device)

    def _keep_ties(
        self, base: torch.Tensor, fts: list[torch.Tensor], trim_step: ThresholdTrim, out: torch.Tensor,
        ties: list[tuple[int, torch.Tensor]], contested: Contested,
    ) -> torch.Tensor:  # fmt: skip
        """Keep the first of ``ties`` (flat order) that ``trim_step``'s budget allows; the change of the sign sum.

        ``out`` was merged without any threshold tie. The columns of the kept ones are merged
        again with them (the same arithmetic as the pass, on the gathered columns), their
        contested entries replace those of the merge without, and the budget they did not
        take goes on to the next keys.
        """
        left = list(trim_step.tie_budget)
        kept: dict[int, list[torch.Tensor]] = {}
        for task, positions in ties:
            take = positions[: left[task]]
            if take.numel():
                kept.setdefault(task, []).append(take)
                left[task] -= take.numel()
        trim_step.tie_budget = left
        if not kept:
            return torch.zeros((), dtype=torch.int64, device=out.device)
        cd = self.reader.compute_dtype
        cols = torch.unique(torch.cat([p for parts in kept.values() for p in parts]))  # sorted
        where = {task: torch.searchsorted(cols, torch.cat(parts)) for task, parts in kept.items()}
        b = base[cols].to(cd)
        taus = torch.stack([ft[cols].to(cd) - b for ft in fts])  # as reading.TaskReader.chunks_of computes them

        def trim(with_ties: bool) -> Callable[..., torch.Tensor]:
            def apply(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                for i, (row, cut) in enumerate(zip(t, trim_step.cuts)):  # ThresholdTrim's arithmetic
                    torch.hardshrink(row, cut, out=out[i])
                    if with_ties and i in where:
                        out[i, where[i]] = row[where[i]]
                return out

            return apply

        scratch = torch.empty(cols.numel(), dtype=cd, device=out.device)
        without, _ = ties_chunk_(taus.clone(), trim(False), scratch, torch.empty_like(taus), self.sign, self.merge)  # type: ignore[arg-type]
        trimmed = torch.empty_like(taus)
        with_ties, found = ties_chunk_(taus, trim(True), scratch, trimmed, self.sign, self.merge)  # type: ignore[arg-type]
        out[cols] = scratch
        contested.drop(cols)
        if found is not None:
            contested.collect_columns(0, found, trimmed, index=cols)
        return with_ties - without

    def close(self) -> None:
        """Stop the worker threads (if any started); the next :meth:`run` starts them again."""
        if self._pool is not None:
            self._pool_context.__exit__(None, None, None)
            self._pool = None


__all__ = ["TiesPass"]
