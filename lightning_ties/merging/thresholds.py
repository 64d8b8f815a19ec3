"""The trim's exact thresholds for the engine: per task over the whole model, or per tensor.

Global scope (the paper's code): each task's m-th largest |tau| over every merged key, from a
strided sample that brackets it and one counting pass over the bit patterns inside the
bracket (:class:`~lightning_ties.merging.select.MagnitudeSelector`; radix passes when the
bracket misses). On W ranks every rank counts its own entries and the counts are all-summed,
the sample is gathered (so it is the one process's sample, whatever the split), and the ties
at the threshold a task keeps are shared out in global (key, flat index) order from one
all_gather of per-key tie counts. Per-tensor scope does the same for each tensor split over
ranks; a tensor one rank holds whole needs no communication.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from .collectives import SINGLE_PROCESS, Collectives, ShardLayout
from .cpu_kernels import Counter, bracket_counter
from .fused import FusedPaths
from .reading import TaskReader, single_threaded_pool
from .select import MagnitudeSelector, MagnitudeThreshold, next_passes
from .sources import read_strided

# The select passes do ~3 cheap ops per entry, where the per-chunk Python overhead shows: they
# read chunks this many times larger (measured on 8 x 20M float32: 64K for the merge, 256K here).
_SELECT_CHUNK_FACTOR = 4
# Global thresholds over at least this many entries start from a sample of this many entries
# per task: its quantiles bracket the threshold, so one exact pass usually replaces two.
_MIN_BRACKETED = 1 << 22
_SAMPLE = 1 << 17
# A key's sample smaller than this is taken on the calling thread: the hand-off to the pool costs more than it
# (82 model-shaped tensors at 2 threads: the sample pass 0.074 -> ~0.04 s).
_POOL_SAMPLE = 1 << 14
# The bracket's histogram has up to MAX_BRACKET_BINS bins, a cost per observed tensor: larger chunks.
_BRACKET_CHUNK_FACTOR = 16
# The CPU bracket pass gathers its digits in a buffer of this many bytes per worker (see _BracketCounts).
_DIGITS_BYTES = 32 << 20
_SMALL_TENSOR = 1 << 16  # per-tensor thresholds below this size use one batched kthvalue
# Spare bins on each side of a bracket's histogram (see _BracketCounts); a power of two.
_SPARE = 1 << 12


class ThresholdFinder:
    """Exact trim thresholds over this rank's share of the task vectors, agreed by all ranks.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> reader = TaskReader(StateDictSource({"w": torch.zeros(4)}), [StateDictSource({"w": torch.arange(4.0)})])
        >>> ThresholdFinder(reader).select(["w"], m=2)[0].value
        2.0
    """

    def __init__(
        self,
        reader: TaskReader,
        collectives: Collectives = SINGLE_PROCESS,
        layout: ShardLayout | None = None,
        fused: FusedPaths | None = None,
    ) -> None:
        self.reader = reader
        self.collectives = collectives
        self.layout = layout
        self.fused = fused
        self.distributed = collectives.world_size > 1
        #: bracket the global threshold from a sample of ``sample_size`` entries per task when at
        #: least ``min_bracketed`` entries are selected over (the module's defaults, read here)
        self.min_bracketed, self.sample_size = _MIN_BRACKETED, _SAMPLE
        # this rank's own counts of the last CPU bracket pass (before the ranks' sum): its
        # threshold ties, for tie_budgets, without reading the entries again
        self._bracket_counts: _RankTieCounts | None = None

    # ---- thresholds -----------------------------------------------------------------------
    def select(self, keys: Sequence[str], m: int, reduce: bool | None = None) -> list[MagnitudeThreshold]:
        """Exact threshold of every task over ``keys`` taken together (on every rank: all ranks' entries).

        One pass over a sampled bracket when it holds the threshold (the usual case on large
        models), else the radix select passes. ``reduce`` (default: on W ranks) sums the
        counts over ranks; every rank must then call this with the same keys.
        """
        reduce = self.distributed if reduce is None else reduce
        self._bracket_counts = None  # only this call's bracket pass may answer tie_budgets
        on_cpu = self.reader.on_cpu
        threads = torch.get_num_threads()
        # The CPU's sample and bracket pass split their work over threads that each run
        # single-threaded ops; this thread's own ops around them (building the selectors, closing
        # the pass) are small: on one core, so that no OpenMP team spins beside the workers.
        bracketable = self._bracketable(keys)
        workers = threads if on_cpu and threads > 1 and bracketable else 1
        scratch: dict[str, torch.Tensor] = {}
        summed = self.collectives.all_sum if reduce else None
        cd = self.reader.compute_dtype
        with single_threaded_pool(workers) if workers > 1 else nullcontext() as pool, _one_thread(on_cpu):
            brackets = self.sample_brackets(keys, m, gather=reduce, pool=pool)
            selectors = [MagnitudeSelector(m, cd, bracket, scratch, reduce=summed) for bracket in brackets]
            all_bracketed = all(s.bracket_bits is not None for s in selectors)
            if all_bracketed and self.fused is not None and self.fused.active() and self.fused.bracket_pass(keys, selectors):
                next_passes(selectors)  # a miss falls through to the radix passes below
            elif all_bracketed and on_cpu and not any(s.gather for s in selectors):
                self._bracket_pass(keys, selectors, pool, workers)  # closes the pass
        # a selection too small for a bracket is many small ops: on one core (see _one_thread)
        with _one_thread(on_cpu and not bracketable):
            self._radix_passes(keys, selectors, on_cpu)
        return [s.result() for s in selectors]

    def _radix_passes(self, keys: Sequence[str], selectors: list[MagnitudeSelector], on_cpu: bool) -> None:
        """The passes left after the bracket's (all of them without one): each narrows every selector's digit."""
        while not all(s.done for s in selectors):
            bracketed = any(s.bracketed for s in selectors)
            size = self.reader.chunk_size
            if on_cpu:  # off the CPU chunks are already whole tensors
                size *= _BRACKET_CHUNK_FACTOR if bracketed else _SELECT_CHUNK_FACTOR
            for key in keys:
                for _, taus in self.reader.chunks(key, size):
                    for sel, model, tau in zip(selectors, self.reader.models, taus):
                        sel.observe(tau, name=f"task vector of {model.label} at {key!r}")
            next_passes(selectors)

    def _bracketable(self, keys: Sequence[str]) -> bool:
        """Whether a selection over ``keys`` starts from a sampled bracket (enough entries)."""
        return sum(self.reader.numel(key) for key in keys) >= self.min_bracketed

    def _bracket_pass(
        self, keys: Sequence[str], selectors: list[MagnitudeSelector], pool: ThreadPoolExecutor | None, workers: int
    ) -> None:
        """The bracketed select pass on the CPU, all tasks of a chunk at once: the counts ``observe`` makes.

        Each key's columns are cut into one range per worker of ``pool`` (``workers`` threads,
        see :func:`.reading.single_threaded_pool`; None: one worker, this thread), counted side
        by side (counts do not depend on the order they are made in), each worker into its
        own :class:`_BracketCounts`. A key too small to cut goes to the first worker.
        """
        reader = self.reader
        brackets: list[tuple[int, int]] = [s.bracket_bits for s in selectors]  # type: ignore[misc]
        entries = sum(reader.local_numel(key) for key in keys) * len(selectors)
        counter = bracket_counter(entries) if reader.compute_dtype == torch.float32 else None
        work = [_BracketCounts(brackets, reader, counter) for _ in range(workers)]
        for key in keys:
            if reader.local_numel(key) == 0:  # nothing of it on this rank (its source may not even hold it)
                continue
            base, fts = reader.inputs(key)
            n = base.numel()
            parts = max(1, min(workers, n // reader.chunk_size))
            cuts = [n * w // parts for w in range(parts + 1)]
            jobs = [functools.partial(work[w].count, base, fts, cuts[w], cuts[w + 1], f"@{w}") for w in range(parts)]
            found = _map(pool, lambda job: job(), jobs)
            for i in sorted(set().union(*found)):
                selectors[i].report_nonfinite(f"task vector of {reader.models[i].label} at {key!r}")
            # let go of this key's tensors before the next is read: a file source reads into the
            # buffer nothing else holds (held, each source took a second one of the largest size)
            del base, fts, jobs
        _map(pool, _BracketCounts.flush, work)  # each worker's last digits, side by side
        reducing = any(s.reduce is not None for s in selectors)

        def close(task: int) -> torch.Tensor:
            # the task's counts (in place: no copy of the histogram); the pass closed here unless
            # the ranks sum their counts first (one collective for every task, below)
            hist = _BracketCounts.total(work, task)
            selectors[task].set_bracket_counts(_BracketCounts.pass_layout(hist))
            if not reducing:
                selectors[task].next_pass()
            return hist[_SPARE:-_SPARE]

        inside = _map(pool, close, range(len(selectors)))
        if reducing:
            next_passes(selectors)
        if self.distributed:  # this rank's own counts (before the ranks' sum), for tie_budgets
            self._bracket_counts = _RankTieCounts(tuple(keys), [lo for lo, _ in brackets], inside)

    def tensor_thresholds(self, key: str, m: int, split: bool = False) -> list[MagnitudeThreshold]:
        """Per-tensor thresholds of ``key`` (m kept of its entries); ``split``: its pieces lie on several ranks."""
        reader = self.reader
        n = reader.numel(key)
        if m == 0:
            return [MagnitudeThreshold.keep_none() for _ in reader.models]
        if split or n > _SMALL_TENSOR:
            return self.select([key], m, reduce=split)
        taus = reader.task_vectors(key)
        reader.check_finite(taus, key)
        mags = taus.abs()
        values = mags.kthvalue(n - m + 1, dim=1, keepdim=True).values
        # three host syncs per tensor, not three per task (they dominate off the CPU)
        greater = (mags > values).sum(1).tolist()
        equal = (mags == values).sum(1).tolist()
        return [
            MagnitudeThreshold(v, kept=m, n_greater=g, n_equal=e)
            for v, g, e in zip(values.squeeze(1).tolist(), greater, equal)
        ]

    # ---- the bracket ----------------------------------------------------------------------
    def sample_brackets(
        self, keys: Sequence[str], m: int, gather: bool = False, pool: ThreadPoolExecutor | None = None
    ) -> list[tuple[float, float] | None]:
        """Per task, a magnitude range that holds the m-th largest |tau| with near certainty.

        From an evenly strided sample of the task vector over ``keys`` (strided by the global
        flat index, so each rank samples the same entries one process would): the sample's
        ranks around the expected one, +-5 binomial standard deviations. A miss costs time
        only (the selector verifies the bracket by counting). ``gather``: the ranks' samples
        are gathered, so every rank derives the one process's bracket. ``pool``: threads that
        share out the tasks (see :func:`.reading.single_threaded_pool`).
        """
        reader = self.reader
        n = sum(reader.numel(key) for key in keys)
        if n < self.min_bracketed:
            return [None] * reader.n_tasks
        stride = (n // self.sample_size) | 1  # odd, so it does not alias with power-of-two row lengths
        parts: list[list[torch.Tensor]] = [[] for _ in reader.models]
        offset = 0
        for key in keys:
            start, stop = reader.local_range(key)
            if stop > start:
                first = (-(offset + start)) % stride
                # strided where the source is (a file reads only the picked entries), then moved:
                # only the sample travels. Read here: sources need not be thread-safe.
                base = read_strided(reader.base, key, first, stride).to(reader.device, reader.compute_dtype)
                picked = [read_strided(model, key, first, stride) for model in reader.models]

                def tau(t: torch.Tensor) -> torch.Tensor:
                    return (t.to(reader.device, reader.compute_dtype) - base).abs_()

                small = base.numel() < _POOL_SAMPLE  # a few entries per task: the threads' hand-off costs more
                for part, sample in zip(parts, _map(None if small else pool, tau, picked)):
                    part.append(sample)
            offset += reader.numel(key)
        samples = torch.stack([torch.cat(part) if part else torch.empty(0, dtype=reader.compute_dtype, device=reader.device) for part in parts])
        if gather:
            samples = self._gather_samples(samples)
        # Every task's sample has the same size and the same ranks around the threshold: two
        # batched selections (or one per task, on the pool's threads) and one host transfer.
        size = samples.shape[1]
        expected = m * size / n  # rank of the threshold in the sample, counted from the top
        margin = 5 * math.sqrt(expected * (1 - m / n)) + 8
        top, bottom = math.floor(expected - margin), math.ceil(expected + margin)
        if top < 1 or bottom > size:
            return [None] * reader.n_tasks

        def ends_of(rows: torch.Tensor) -> torch.Tensor:
            # the `bottom` largest (NaN above everything, as in a sort; a third of a sort's time),
            # then both ends among them: kthvalue(k) is the k-th smallest
            largest = rows.topk(bottom, dim=1, sorted=False).values
            return torch.stack([largest.kthvalue(1, dim=1).values, largest.kthvalue(bottom - top + 1, dim=1).values], dim=1)

        ends = torch.cat(_map(pool, ends_of, [samples] if pool is None else samples.split(1))).tolist()
        return [(a, b) if math.isfinite(b) else None for a, b in ends]

    def _gather_samples(self, samples: torch.Tensor) -> torch.Tensor:
        """Every rank's samples ``[N, c_r]`` side by side: the same multiset (hence sort) as one process's."""
        sizes = self.collectives.all_gather(torch.tensor([samples.shape[1]], dtype=torch.int64)).reshape(-1).tolist()
        padded = torch.zeros(samples.shape[0], max(sizes), dtype=samples.dtype, device=samples.device)
        padded[:, : samples.shape[1]] = samples
        gathered = self.collectives.all_gather(padded)
        return torch.cat([gathered[r, :, :c] for r, c in enumerate(sizes)], dim=1)

    # ---- ties at the threshold, in global order --------------------------------------------
    def tie_budgets(
        self, keys: Sequence[str], indices: Sequence[int], thresholds: Sequence[MagnitudeThreshold]
    ) -> list[list[int] | None] | None:
        """Per key of ``keys``, how many of each task's threshold ties this rank keeps (None: no task keeps part of its ties).

        One process keeps the first ``ties_to_keep`` entries equal to the threshold in stream
        order (key order, then flat index); on W ranks each rank counts its ties per key, one
        all_gather shares the counts, and each rank keeps the ones that fall within the budget
        in that same global order. ``indices`` are the keys' positions in the layout. Costs one
        read of this rank's entries, and only when a task keeps some but not all of its ties at
        a non-zero threshold (kept zeros change nothing). No read when every rank holds one run
        of whole keys (as ``merge_to`` splits them) and the threshold lies in the CPU bracket
        pass's histogram: a row of None then means "the budget left by this rank's previous keys".
        """
        partial = [i for i, t in enumerate(thresholds) if t.value != 0.0 and 0 < t.ties_to_keep < t.n_equal]
        if not partial or not self.distributed or self.layout is None:
            return None
        runs = self._rank_runs(indices)
        if runs is not None:
            budgets = self._run_budgets(keys, indices, thresholds, partial, runs)
            if budgets is not None:
                return budgets
        reader = self.reader
        counts = torch.zeros(len(keys), reader.n_tasks, dtype=torch.int64)
        for j, key in enumerate(keys):
            for _, taus in reader.chunks(key):
                for i in partial:
                    counts[j, i] += int((taus[i].abs() == thresholds[i].value).sum())
        every = self.collectives.all_gather(counts).tolist()  # [W][keys][N]
        left = [t.ties_to_keep if i in partial else 0 for i, t in enumerate(thresholds)]
        mine: list[list[int] | None] = [[0] * reader.n_tasks for _ in keys]
        for j, index in enumerate(indices):
            for r in self.layout.holders(index):  # the ranks' pieces of this key, in flat order
                for i in partial:
                    take = min(left[i], every[r][j][i])
                    left[i] -= take
                    if r == self.collectives.rank:
                        mine[j][i] = take  # type: ignore[index]
        return mine

    def _rank_runs(self, indices: Sequence[int]) -> list[int] | None:
        """The ranks in key order when every key lies whole on one rank and each rank's keys form one run (else None)."""
        assert self.layout is not None
        order: list[int] = []
        for index in indices:
            holders = self.layout.holders(index)
            if len(holders) > 1:
                return None
            if holders and (not order or order[-1] != holders[0]):
                if holders[0] in order:
                    return None
                order.append(holders[0])
        return order

    def _run_budgets(
        self,
        keys: Sequence[str],
        indices: Sequence[int],
        thresholds: Sequence[MagnitudeThreshold],
        partial: list[int],
        runs: list[int],
    ) -> list[list[int] | None] | None:
        """:meth:`tie_budgets` for ranks holding runs of whole keys, from the bracket pass's own counts.

        Each rank's ties are one block of the global order, so its budget is what the ranks
        before it (in key order) left, capped by its own tie count: one all_gather of ``[ok,
        ties per task]``. The budget goes to this rank's first key; the engine's trim spends
        it over the following keys in order. None on every rank when any rank lacks the counts
        (its pass was the radix or the fused one, or the threshold lies outside its bracket):
        the caller then counts by reading.
        """
        ties = [0] * self.reader.n_tasks
        counts = self._bracket_counts
        ok = counts is not None and counts.keys == tuple(keys)
        if ok:
            assert counts is not None
            for i in partial:
                found = counts.ties(i, thresholds[i].value, self.reader.compute_dtype)
                ok = ok and found is not None
                ties[i] = found or 0
        every = self.collectives.all_gather(torch.tensor([int(ok), *ties], dtype=torch.int64)).tolist()
        if not all(row[0] for row in every):
            return None
        budgets: list[list[int] | None] = [None] * len(keys)
        left = [t.ties_to_keep if i in partial else 0 for i, t in enumerate(thresholds)]
        rank = self.collectives.rank
        for r in runs:
            if r == rank:
                assert self.layout is not None
                first = next(j for j, index in enumerate(indices) if self.layout.holders(index) == [rank])
                budgets[first] = [min(budget, found) for budget, found in zip(left, every[r][1:])]
                break
            left = [budget - min(budget, found) for budget, found in zip(left, every[r][1:])]
        return budgets


class _RankTieCounts:
    """One rank's histograms of a CPU bracket pass over ``keys``: per task, one bin per bit pattern from ``starts[task]``."""

    def __init__(self, keys: tuple[str, ...], starts: list[int], inside: list[torch.Tensor]) -> None:
        self.keys, self.starts, self.inside = keys, starts, inside

    def ties(self, task: int, value: float, dtype: torch.dtype) -> int | None:
        """Entries of this rank with ``|tau| == value`` for ``task`` (None: ``value`` is outside its bracket)."""
        bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32
        index = int(torch.tensor(value, dtype=dtype).view(bits_dtype)) - self.starts[task]
        return int(self.inside[task][index]) if 0 <= index < self.inside[task].numel() else None


@contextmanager
def _one_thread(on: bool = True) -> Iterator[None]:
    """This thread's torch ops on one core for a while (``on``), the setting restored after.

    For the sample and the counts' bookkeeping around the passes' workers: small ops gain
    nothing from torch's OpenMP team, and on a busy machine each one waits for a descheduled
    team thread, then leaves it spinning for milliseconds, a core taken from the workers.
    """
    saved = torch.get_num_threads()
    if on and saved > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class _BracketCounts:
    """One worker's counts of the bracket pass: per task ``[_SPARE below][lo..hi][_SPARE above]``.

    Per chunk ``[N, c]`` of task vectors (read into the worker's own buffer, L2-sized): |tau|'s
    bit patterns minus each task's ``lo - _SPARE``, clamped between two fixed tensors: the
    entries inside the bracket keep one bin per bit pattern, the ~99% outside it land on spare
    bins picked by their column (``bincount`` adds one at a time, and a run of adds to one
    counter waits on each previous add: twice as slow). The digits gather in one large buffer
    that ``bincount`` empties per task when full: each call allocates and adds a histogram as
    large as the bracket, too costly per chunk. The first call's histogram is kept as the
    task's (none is zeroed up front: megabytes per task and worker, page faults included).
    With ``counter`` (the compiled loop of :mod:`.cpu_kernels`), keys in float32 are counted by it
    instead, straight into the same histograms (the entries below and above in the spare bins' ends).
    """

    def __init__(self, brackets: list[tuple[int, int]], reader: TaskReader, counter: Counter | None = None) -> None:
        self.reader = reader
        self.brackets, self.counter = brackets, counter
        self.bits_dtype = torch.int64 if reader.compute_dtype == torch.float64 else torch.int32
        self.inf_bits = int(torch.tensor(float("inf"), dtype=reader.compute_dtype).view(self.bits_dtype))
        self.sizes = [hi - lo + 1 + 2 * _SPARE for lo, hi in brackets]
        self.hists: list[torch.Tensor | None] = [None] * len(brackets)
        self.observed = 0
        c, n = reader.chunk_size, len(brackets)
        self.offsets = torch.tensor([lo - _SPARE for lo, _ in brackets], dtype=self.bits_dtype).unsqueeze(1)
        below = torch.arange(c, dtype=self.bits_dtype).bitwise_and_(_SPARE - 1)
        tops = torch.tensor([_SPARE + hi - lo + 1 for lo, hi in brackets], dtype=self.bits_dtype).unsqueeze(1)
        self.below, self.above = below, below + tops  # per column: its spare bin below / above the bracket
        width = max(c, _DIGITS_BYTES // (n * below.element_size()) // c * c)
        self.digits = torch.empty(n, width, dtype=self.bits_dtype)
        self.fill = 0

    def count(self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int, tag: str) -> set[int]:
        """Count the columns ``[begin, end)`` of one key; the tasks holding a NaN or Inf there."""
        if self.counter is not None and all(t.dtype == torch.float32 for t in (base, *fts)):
            return self._count_compiled(base, fts, begin, end)
        top = None
        for _, taus in self.reader.chunks_of(base, fts, begin, end, buffer=f"taus{tag}"):
            c = taus.shape[1]
            if self.fill + c > self.digits.shape[1]:
                self.flush()
            bits = taus.abs_().view(self.bits_dtype)  # the chunk buffer is not read again: work in place
            top = bits.amax(1) if top is None else torch.maximum(top, bits.amax(1))
            digits = torch.sub(bits, self.offsets, out=self.digits[:, self.fill : self.fill + c])
            torch.clamp(digits, min=self.below[:c], max=self.above[:, :c], out=digits)
            self.fill += c
            self.observed += c
        return set() if top is None else set(torch.nonzero(top >= self.inf_bits).flatten().tolist())

    def _count_compiled(self, base: torch.Tensor, fts: list[torch.Tensor], begin: int, end: int) -> set[int]:
        """:meth:`count` by the compiled loop (:mod:`.cpu_kernels`), task by task, straight into the histograms."""
        bad = set()
        counts = torch.zeros(3, dtype=torch.int64)
        base = base.detach()[begin:end].contiguous()
        for i, ((lo, hi), ft) in enumerate(zip(self.brackets, fts)):
            hist = self.hists[i]
            if hist is None:
                hist = self.hists[i] = torch.zeros(self.sizes[i], dtype=torch.int64)
            counts.zero_()
            self.counter(base, ft.detach()[begin:end].contiguous(), lo, hi, hist[_SPARE:-_SPARE], counts)
            hist[0] += counts[0]  # the spare bins below and above: pass_layout sums them
            hist[-1] += counts[1]
            if counts[2]:
                bad.add(i)
        self.observed += end - begin
        return bad

    def flush(self) -> None:
        """Add the digits gathered so far to the histograms (one ``bincount`` per task)."""
        if self.fill:
            for i, row in enumerate(self.digits[:, : self.fill]):
                counts = torch.bincount(row, minlength=self.sizes[i])
                known = self.hists[i]
                self.hists[i] = counts if known is None else known.add_(counts)
            self.fill = 0

    @staticmethod
    def pass_layout(hist: torch.Tensor) -> torch.Tensor:
        """A view of a total histogram in the selector's layout ``[below, lo..hi, above]`` (spare bins summed into its ends)."""
        below, above = hist[:_SPARE].sum(), hist[-_SPARE:].sum()
        counts = hist[_SPARE - 1 : hist.numel() - _SPARE + 1]
        counts[0], counts[-1] = below, above  # spare bins, already summed
        return counts

    @staticmethod
    def total(work: list[_BracketCounts], task: int) -> torch.Tensor:
        """Task ``task``'s histogram over every worker of ``work`` (flushed), summed into the first one's."""
        hists = [h for h in (w.hists[task] for w in work) if h is not None]
        if not hists:  # nothing observed (a rank holding none of the keys): empty counts of the same layout
            return torch.zeros(work[0].sizes[task], dtype=torch.int64)
        return functools.reduce(torch.Tensor.add_, hists[1:], hists[0])


def _map(pool: ThreadPoolExecutor | None, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, on the threads of ``pool`` when there is one."""
    return [fn(x) for x in items] if pool is None else list(pool.map(fn, items))


__all__ = ["ThresholdFinder"]
