"""TIES's merge pass over one key on the CPU: chunk by chunk, its columns split over threads.

The in-place kernel ``steps.ties_chunk_`` runs tens of small torch ops per chunk. With several
torch threads each op is a fork/join of torch's intra-op pool, and on a VM (or a busy host) a
join can wait ~0.5 ms for a descheduled core: tens of thousands of them made two threads far
slower than one. :class:`TiesPass` instead cuts a key's columns into one range per thread and
merges the ranges side by side with single-threaded ops (:func:`.reading.single_threaded_pool`).
"""

from __future__ import annotations

from typing import Any

import torch

from .contested import Contested
from .reading import TaskReader, single_threaded_pool
from .steps import ThresholdTrim, ties_chunk_


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

    def __init__(self, reader: TaskReader, sign: str, merge: str) -> None:
        self.reader, self.sign, self.merge = reader, sign, merge
        self._pool: Any = None
        self._pool_size = 0
        self._pool_context: Any = None

    def run(self, key: str, trim_step: ThresholdTrim, out: torch.Tensor, contested: Contested) -> torch.Tensor:
        """TIES's in-place kernel over every chunk of ``key``; the sum of its elected signs.

        On the CPU with several torch threads, the key's columns are cut into one range per
        thread, merged side by side by single-threaded ops (see
        :func:`.reading.single_threaded_pool`): the columns are independent, the sign sums
        are exact integers, the contested entries are kept per range, and the threshold ties
        a task may still keep are shared out over the ranges in flat order (each range counts
        its ties first), so the result is the one thread's, bit for bit.
        """
        reader = self.reader
        base, fts = reader.inputs(key)
        n = base.numel()
        workers = min(torch.get_num_threads(), n // reader.chunk_size)
        if not reader.on_cpu or workers < 2:
            return self._range(base, fts, 0, n, trim_step, out, contested, "")
        if self._pool is None or self._pool_size != workers:
            self.close()
            self._pool_context = single_threaded_pool(workers)
            self._pool, self._pool_size = self._pool_context.__enter__(), workers
        cuts = [n * w // workers for w in range(workers + 1)]
        tags = [f"@{w}" for w in range(workers)]
        steps = [trim_step.restart() for _ in range(workers)]
        budget = list(trim_step.tie_budget)
        needy = [i for i, left in enumerate(budget) if left > 0]
        for step, found in zip(steps, self._leading_tie_counts(base, fts, cuts, trim_step, needy)):
            step.tie_budget = [min(left, c) for left, c in zip(budget, found)]  # ranges in flat order take the ties first come
            budget = [left - took for left, took in zip(budget, step.tie_budget)]
        steps[-1].tie_budget = budget  # the last range takes what is left: nothing after it in this key
        parts = [Contested(contested.combine, contested.merge) for _ in range(workers)]
        totals = list(self._pool.map(self._range, [base] * workers, [fts] * workers, cuts[:-1], cuts[1:], steps, [out] * workers, parts, tags))
        trim_step.tie_budget = list(steps[-1].tie_budget)  # what it did not spend goes on to the next keys
        for part in parts:
            contested.extend(part)
        return torch.stack(totals).sum()

    def _leading_tie_counts(
        self, base: torch.Tensor, fts: list[torch.Tensor], cuts: list[int], trim_step: ThresholdTrim, needy: list[int]
    ) -> list[list[int]]:
        """Per range but the last, its entries at each needy task's threshold, counted side by side.

        The last range needs no count (no range after it waits on its ties), so the workers
        share out the columns before it: pieces cut at the ranges' edges and in ``workers``
        equal parts, each counted in its own scratch buffer.
        """
        workers = len(cuts) - 1
        if not needy:
            return [[0] * self.reader.n_tasks for _ in range(workers - 1)]
        end = cuts[-2]
        marks = sorted(set(cuts[:-1]) | {end * w // workers for w in range(workers + 1)})
        pieces = [(a, b) for a, b in zip(marks[:-1], marks[1:]) if b > a]
        found = self._pool.map(
            lambda piece, j: (piece[0], self._count_ties(base, fts, piece[0], piece[1], trim_step, needy, f"@count{j}")),
            pieces, range(len(pieces)),
        )  # fmt: skip
        counts = [[0] * self.reader.n_tasks for _ in range(workers - 1)]
        for start, piece_counts in found:
            r = max(w for w in range(workers - 1) if cuts[w] <= start)
            counts[r] = [a + b for a, b in zip(counts[r], piece_counts)]
        return counts

    def _range(
        self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, trim_step: ThresholdTrim,
        out: torch.Tensor, found: Contested, tag: str,
    ) -> torch.Tensor:  # fmt: skip
        """``ties_chunk_`` over the columns ``[begin, end)``, chunk by chunk, in scratch buffers ``tag``."""
        total = torch.zeros((), dtype=torch.int64, device=self.reader.device)
        for start, taus in self.reader.chunks_of(base, fts, begin, end, buffer=f"taus{tag}"):
            trimmed = self.reader.buffer(f"trimmed{tag}", taus.shape[1])
            stop = start + taus.shape[1]
            chunk_signs, cols = ties_chunk_(taus, trim_step, out[start:stop], trimmed, self.sign, self.merge)
            total += chunk_signs
            if cols is not None:
                found.collect_columns(start, cols, trimmed)
        return total

    def _count_ties(
        self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, trim_step: ThresholdTrim,
        needy: list[int], tag: str,
    ) -> list[int]:  # fmt: skip
        """Per task, the entries of ``[begin, end)`` at its threshold (tasks in ``needy`` only; others 0)."""
        found = [0] * self.reader.n_tasks
        if not needy:
            return found
        # only the needy tasks' rows (usually one or two of N): their task vectors are computed as the merge computes them
        for _, taus in self.reader.chunks_of(base, [fts[i] for i in needy], begin, end, buffer=f"taus{tag}"):
            for row, i in enumerate(needy):  # the comparison ThresholdTrim makes
                ties = trim_step.ties_in(taus[row], i, in_place=True)
                found[i] += 0 if ties is None else ties.numel()
        return found

    def close(self) -> None:
        """Stop the worker threads (if any started); the next :meth:`run` starts them again."""
        if self._pool is not None:
            self._pool_context.__exit__(None, None, None)
            self._pool = None


__all__ = ["TiesPass"]
