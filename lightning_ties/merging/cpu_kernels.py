"""TIES's two passes on the CPU as compiled loops (numba, when installed: ``pip install lightning-ties[fast]``).

The global trim reads every entry twice: once to count each task's ``|ft - base|`` against a bracket
of its threshold (:mod:`.thresholds`), once to trim, elect and merge (:func:`.steps.ties_chunk_`). With
torch's CPU ops each pass is many small ops per entry, and their cost differs between CPUs far more
than the arithmetic does: ``bincount`` alone costs 4 ns per entry on a first-generation EPYC, 0.7 on a
later one. These loops read the inputs once per pass and keep only what the pass needs.

They give the torch path's bits: the counts are integers (the same in any order), and the merge loop
does the same IEEE float32 operations in the same order as ``ties_chunk_`` (sums over tasks added in
task order, as :func:`.steps.sum_tasks`). The rare chunks where the torch path has more to do (a task
keeping only some of its threshold ties; an entry whose elected score is exactly zero) are handed back
to it, whole.

Used for float32 inputs on the CPU when numba imports and the merge is large enough to repay loading
the loops (:data:`MIN_ENTRIES`, or :data:`MIN_LOADED_ENTRIES` once a process has loaded them);
``LIGHTNING_TIES_NUMBA=0`` turns them off.

Example:
    >>> import torch
    >>> count = bracket_counter(force=True)
    >>> if count is not None:  # numba installed
    ...     base, ft = torch.zeros(4), torch.tensor([0.5, -1.0, 2.0, float("nan")])
    ...     lo, hi = (int(torch.tensor(v).view(torch.int32)) for v in (0.75, 1.5))
    ...     hist, counts = torch.zeros(hi - lo + 1, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    ...     count(base, ft, lo, hi, hist, counts)
    ...     print(counts.tolist(), int(hist.sum()))  # below, above (NaN too), NaN/Inf; one entry (1.0) inside
    ... else:
    ...     print([1, 2, 1], 1)
    [1, 2, 1] 1
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch

#: Entries (over every task) a merge must hold before the loops are loaded in a process: importing numba and
#: loading both loops from its cache took 0.8-1.4 s on a first-generation EPYC (compiling them, once per machine
#: and number of tasks, a few seconds more), and they saved ~6 ns per entry there (8 x 20M float32: 1.94 s ->
#: 1.01 s): 2^28 entries repay it. Once loaded, every pass of at least :data:`MIN_LOADED_ENTRIES` uses them.
MIN_ENTRIES = 1 << 28
MIN_LOADED_ENTRIES = 1 << 20
# Entries kept between a loop's passes over a block: L1-sized, so the later passes read them from cache.
_BLOCK = 4096
_MERGE_BLOCK = 1024  # columns per block of the merge loop: N + 3 rows of it stay in L1/L2
_INF_BITS = 0x7F800000  # float32 +Inf's bit pattern: every NaN's |x| lies above it

Counter = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor, torch.Tensor], None]
Merger = Callable[[torch.Tensor, Sequence[torch.Tensor], Sequence[float], Sequence[float], torch.Tensor], tuple[int, bool]]


def _loop(loader: Any, entries: int, force: bool) -> Any:
    """``loader``'s compiled loop when numba imports, it is not turned off and the pass repays loading it
    (:data:`MIN_ENTRIES`, :data:`MIN_LOADED_ENTRIES` once loaded; ``force``: whatever ``entries``), else None."""
    if os.environ.get("LIGHTNING_TIES_NUMBA", "1") == "0":
        return None
    loaded = loader.cache_info().currsize > 0
    if not force and entries < (MIN_LOADED_ENTRIES if loaded else MIN_ENTRIES):
        return None
    return loader()


def bracket_counter(entries: int = 0, force: bool = False) -> Counter | None:
    """The compiled count for a pass over ``entries`` entries, or None (numba missing or off, or too few to repay it).

    ``force``: whatever ``entries`` (tests). The counter is ``count(base, ft, lo, hi, hist, counts)``: float32
    CPU 1-D contiguous ``base`` and ``ft`` of one length; ``lo``, ``hi`` the bracket's bit patterns (int32
    view of |tau|); ``hist`` (int64, ``hi - lo + 1``) and ``counts`` (int64 ``[below, above, nonfinite]``)
    are added to. A NaN or Inf counts above the bracket and as nonfinite (the caller then refuses the task).
    """
    kernel = _loop(_count_loop, entries, force)
    if kernel is None:
        return None

    def count(base: torch.Tensor, ft: torch.Tensor, lo: int, hi: int, hist: torch.Tensor, counts: torch.Tensor) -> None:
        kernel(base.numpy(), ft.numpy(), lo, hi, hist.numpy(), counts.numpy())

    return count


def ties_merger(entries: int = 0, force: bool = False) -> Merger | None:
    """The compiled TIES merge (sign ``"mass"``, disjoint ``"mean"``) for a merge of ``entries`` entries, or None.

    ``merge(base, fts, cuts, tie_values, out) -> (sum of the elected signs, handed back)``: float32 CPU 1-D
    contiguous ``base``, each of ``fts`` and ``out`` of one length; task i keeps ``|tau| > cuts[i]``
    (:class:`.steps.ThresholdTrim`'s cuts); ``tie_values[i] > 0`` is the threshold of a task that keeps only
    some of its ties. ``out`` gets tau_m, unless the chunk is handed back (True): a tie of such a task, or
    an entry whose score is zero while some value agrees with +1 (contested), which the torch path resolves.
    """
    kernel = _loop(_merge_loop, entries, force)
    if kernel is None:
        return None

    def merge(
        base: torch.Tensor, fts: Sequence[torch.Tensor], cuts: Sequence[float], tie_values: Sequence[float],
        out: torch.Tensor,
    ) -> tuple[int, bool]:  # fmt: skip
        import numpy as np

        total, handed_back = kernel(base.numpy(), tuple(ft.numpy() for ft in fts), np.asarray(cuts, np.float32),
                                    np.asarray(tie_values, np.float32), out.numpy())
        return int(total), bool(handed_back)

    return merge


@lru_cache(maxsize=1)
def _numba() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


@lru_cache(maxsize=1)
def _count_loop() -> Any:
    """The compiled count (numba caches it on disk), or None when numba does not import."""
    numba = _numba()
    if numba is None:
        return None
    import numpy as np

    @numba.njit(nogil=True, cache=True)
    def count_bracket(base, ft, lo, hi, hist, counts):  # pragma: no cover - compiled
        block = np.empty(_BLOCK, np.float32)
        bits = block.view(np.int32)  # |tau| as its IEEE bit pattern, ordered as the magnitude (NaN above Inf)
        lo32, hi32, inf32, span = np.int32(lo), np.int32(hi), np.int32(_INF_BITS), np.uint32(hi - lo)
        below = above = nonfinite = 0
        for start in range(0, base.shape[0], _BLOCK):
            n = min(base.shape[0], start + _BLOCK) - start
            b, f = base[start : start + n], ft[start : start + n]
            for j in range(n):  # vectorised: |ft - base| in float32, as torch computes it
                block[j] = abs(f[j] - b[j])
            for j in range(n):  # vectorised: integer compares of the bit patterns
                u = bits[j]
                below += u < lo32
                above += u > hi32
                nonfinite += u >= inf32
            for j in range(n):  # the few entries inside the bracket: one bin per bit pattern
                d = np.uint32(bits[j] - lo32)
                if d <= span:
                    hist[d] += 1
        counts[0] += below
        counts[1] += above
        counts[2] += nonfinite

    return count_bracket


@lru_cache(maxsize=1)
def _merge_loop() -> Any:
    """The compiled merge (numba caches it on disk), or None when numba does not import."""
    numba = _numba()
    if numba is None:
        return None
    import numpy as np

    @numba.njit(nogil=True, cache=True)
    def ties_mean(base, fts, cuts, tie_values, out):  # pragma: no cover - compiled
        # ties_chunk_'s arithmetic, column block by column block; every row loop is vectorised
        ntask, n = len(fts), base.shape[0]
        trimmed = np.empty((ntask, _MERGE_BLOCK), np.float32)
        score = np.empty(_MERGE_BLOCK, np.float32)
        magnitude = np.empty(_MERGE_BLOCK, np.float32)
        agreeing = np.empty(_MERGE_BLOCK, np.float32)
        zero, one = np.float32(0.0), np.float32(1.0)
        total, handed_back = 0, False
        for start in range(0, n, _MERGE_BLOCK):
            m = min(n, start + _MERGE_BLOCK) - start
            b = base[start : start + m]
            for i in range(ntask):  # trim: hardshrink(ft - base, cut)
                f, cut, row = fts[i][start : start + m], cuts[i], trimmed[i]
                for j in range(m):
                    t = f[j] - b[j]
                    row[j] = t if abs(t) > cut else zero
                if tie_values[i] > zero:  # this task keeps only some of its ties: any here goes back
                    ties = 0
                    for j in range(m):
                        ties += abs(f[j] - b[j]) == tie_values[i]
                    handed_back |= ties > 0
            for j in range(m):  # elect: the mass, rows added in task order
                score[j] = trimmed[0, j]
            for i in range(1, ntask):
                for j in range(m):
                    score[j] = score[j] + trimmed[i, j]
            for j in range(m):
                magnitude[j] = zero
                agreeing[j] = zero
            for i in range(ntask):  # disjoint merge: the values agreeing with gamma (zero score -> +1)
                for j in range(m):
                    value = trimmed[i, j] if score[j] >= zero else -trimmed[i, j]
                    agrees = value > zero
                    magnitude[j] = magnitude[j] + (value if agrees else zero)
                    agreeing[j] = agreeing[j] + (one if agrees else zero)
            for j in range(m):
                gamma = one
                if score[j] > zero:
                    total += 1
                elif score[j] < zero:
                    total -= 1
                    gamma = -one
                elif magnitude[j] > zero:  # contested: the scope's majority decides
                    handed_back = True
                out[start + j] = (magnitude[j] / max(agreeing[j], one)) * gamma
        return total, handed_back

    return ties_mean


__all__ = ["MIN_ENTRIES", "MIN_LOADED_ENTRIES", "bracket_counter", "ties_merger"]
