"""The CPU bracket pass in one compiled loop per task (numba, when installed: ``pip install lightning-ties[fast]``).

The global trim's exact threshold comes from one counting pass over every entry (see :mod:`.thresholds`):
each task's ``|ft - base|`` counted below, above and at each bit pattern inside a bracket. With torch's
CPU ops that pass is six ops per entry (sub, abs, max, sub, clamp, ``bincount``); on some CPUs
``bincount`` alone costs 4 ns per entry (a first-generation EPYC), where another CPU takes 0.7. This loop
reads each task's and the base's entries once, keeps nothing but the counts, and costs about the same on
every CPU. The counts are integers, the same as the torch path's whatever the order: the thresholds, hence
the merge, are bit for bit unchanged.

Used for float32 inputs on the CPU when numba imports and the pass is large enough to repay loading the
compiled loop (:data:`MIN_ENTRIES`, or :data:`MIN_LOADED_ENTRIES` once a process has loaded it);
``LIGHTNING_TIES_NUMBA=0`` turns it off.

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
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

#: Entries a bracket pass must count (over every task) before the compiled loop is loaded in a process: importing
#: numba and loading the loop from its cache took 0.4-0.9 s on a first-generation EPYC (compiling it, once per
#: machine, a few seconds), and the loop saves ~3-4 ns per entry there: 2^27 entries repay it. Once loaded it
#: counts every pass of at least :data:`MIN_LOADED_ENTRIES`.
MIN_ENTRIES = 1 << 27
MIN_LOADED_ENTRIES = 1 << 20
# Entries of |tau| kept between the loop's passes over a block: L1-sized, so the later passes read them from cache.
_BLOCK = 4096
_INF_BITS = 0x7F800000  # float32 +Inf's bit pattern: every NaN's |x| lies above it

Counter = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor, torch.Tensor], None]


def bracket_counter(entries: int = 0, force: bool = False) -> Counter | None:
    """The compiled count for a pass over ``entries`` entries, or None (numba missing or off, or too few to repay it).

    ``force``: whatever ``entries`` (tests). The counter is ``count(base, ft, lo, hi, hist, counts)``: float32
    CPU 1-D contiguous ``base`` and ``ft`` of one length; ``lo``, ``hi`` the bracket's bit patterns (int32
    view of |tau|); ``hist`` (int64, ``hi - lo + 1``) and ``counts`` (int64 ``[below, above, nonfinite]``)
    are added to. A NaN or Inf counts above the bracket and as nonfinite (the caller then refuses the task).
    """
    loaded = _compiled.cache_info().currsize > 0
    if os.environ.get("LIGHTNING_TIES_NUMBA", "1") == "0":
        return None
    if not force and entries < (MIN_LOADED_ENTRIES if loaded else MIN_ENTRIES):
        return None
    kernel = _compiled()
    if kernel is None:
        return None

    def count(base: torch.Tensor, ft: torch.Tensor, lo: int, hi: int, hist: torch.Tensor, counts: torch.Tensor) -> None:
        kernel(base.numpy(), ft.numpy(), lo, hi, hist.numpy(), counts.numpy())

    return count


@lru_cache(maxsize=1)
def _compiled() -> Any:
    """numba's compiled loop (cached on disk by numba), or None when numba does not import."""
    try:
        import numba
        import numpy as np
    except ImportError:
        return None

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


__all__ = ["MIN_ENTRIES", "MIN_LOADED_ENTRIES", "bracket_counter"]
