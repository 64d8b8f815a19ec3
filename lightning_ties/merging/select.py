"""Exact top-m magnitude threshold over tensors that arrive one at a time.

The paper's code flattens the whole model and calls ``kthvalue``: O(model) extra memory and
a selection over hundreds of millions of floats. We instead use a radix select over the bit
patterns of |x|. For non-negative IEEE floats the integer view is ordered like the value, so
the m-th largest magnitude can be found digit by digit: one pass histograms the top 16 bits,
the next pass histograms the following 16 bits of only those entries whose prefix matched,
and so on (2 passes for float32, 4 for float64). Memory is one 65536-bin histogram; the
result is bit-exact, equal to a full sort.

Ties at the threshold are resolved deterministically: every |x| > t is kept, and of the
entries with |x| == t only the first ``ties_to_keep`` in stream order (key order, then flat
index) are kept, so exactly ``m`` entries survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}
_FLOAT_OF = {torch.int32: torch.float32, torch.int64: torch.float64}


def keep_count(k: float, n: int) -> int:
    """Number of entries the trim keeps out of ``n``: ``int(k * n)``, as PEFT and mergekit.

    The paper's code keeps every ``|x| >= kthvalue(n - int(k*n))``, i.e. one entry more.
    """
    return int(k * n)


@dataclass(frozen=True)
class MagnitudeThreshold:
    """The result of a selection: keep ``|x| > value`` plus the first ``ties_to_keep`` ties."""

    value: float
    kept: int
    n_greater: int
    n_equal: int

    @property
    def ties_to_keep(self) -> int:
        return self.kept - self.n_greater

    @property
    def keeps_all_ties(self) -> bool:
        return self.ties_to_keep >= self.n_equal

    @classmethod
    def keep_none(cls) -> MagnitudeThreshold:
        return cls(value=float("inf"), kept=0, n_greater=0, n_equal=0)

    def effective_bound(self, dtype: torch.dtype) -> float:
        """Bound ``b`` such that ``|x| >= b`` keeps every entry above the threshold.

        Ties are included when all of them are kept; otherwise the caller keeps the first
        :attr:`ties_to_keep` of them itself.
        """
        if self.value == 0.0:
            return _smallest(dtype)  # keep exactly the non-zeros: kept zeros change no merge
        if self.keeps_all_ties:
            return self.value
        return torch.nextafter(torch.tensor(self.value, dtype=dtype), torch.tensor(float("inf"), dtype=dtype)).item()


def _smallest(dtype: torch.dtype) -> float:
    """The smallest positive (denormal) value of ``dtype``: ``|x| >= it`` keeps exactly the non-zeros."""
    return torch.nextafter(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)).item()


class MagnitudeSelector:
    """Find the m-th largest |x| over a stream of tensors, exactly, in a few passes.

    Feed every tensor of the stream to :meth:`observe` once per pass, calling
    :meth:`next_pass` between passes, until :attr:`done`.

    Example:
        >>> sel = MagnitudeSelector(m=2, dtype=torch.float32)
        >>> while not sel.done:
        ...     for t in (torch.tensor([0.5, -3.0]), torch.tensor([1.0, 2.0])):
        ...         sel.observe(t)
        ...     sel.next_pass()
        >>> sel.result().value
        2.0
    """

    def __init__(self, m: int, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in _INT_VIEW:
            raise ValueError(f"selection runs in float32 or float64, got {dtype}")
        self.m = m
        self.dtype = dtype
        self._int = _INT_VIEW[dtype]
        self._width = torch.finfo(dtype).bits
        self._levels = self._width // _DIGIT_BITS
        self._level = 0
        self._prefix = 0  # digits found so far (high bits of the threshold's bit pattern)
        self._greater = 0  # entries known to be strictly above the prefix
        self._hist = torch.zeros(_BINS, dtype=torch.int64)
        self._buffers: dict[str, torch.Tensor] = {}
        # first top-16-bit digit of +Inf; NaNs lie above it
        self._nonfinite_bin = int(torch.tensor(float("inf"), dtype=dtype).view(self._int).item()) >> (self._width - _DIGIT_BITS)
        self._result: MagnitudeThreshold | None = MagnitudeThreshold.keep_none() if m <= 0 else None

    @property
    def done(self) -> bool:
        return self._result is not None

    def observe(self, x: torch.Tensor, name: str = "tensor") -> None:
        """Add one tensor (any shape, already in the selector's dtype) to the current pass.

        Raises ``ValueError`` naming ``name`` when the tensor holds a NaN or an Inf (seen for
        free in the first pass: their bit patterns fill the top bins).
        """
        if self.done:
            return
        flat = x.reshape(-1)
        bits = torch.abs(flat, out=self._scratch("magnitudes", flat.numel(), self.dtype)).view(self._int)
        shift = self._width - _DIGIT_BITS * (self._level + 1)
        digits = torch.bitwise_right_shift(bits, shift, out=self._scratch("digits", flat.numel(), self._int))
        if self._level == 0:
            counts = torch.bincount(digits, minlength=_BINS)
            if bool(counts[self._nonfinite_bin :].any()):
                raise ValueError(f"{name} holds NaN or Inf values; fix or exclude it before merging")
        else:
            # Candidates (high digits == prefix) land in bins 1.._BINS, all others in 0 or _BINS + 1:
            # integer arithmetic on every entry is cheaper than a boolean mask and a gather.
            digits.sub_((self._prefix << _DIGIT_BITS) - 1).clamp_(0, _BINS + 1)
            counts = torch.bincount(digits, minlength=_BINS + 2)[1 : _BINS + 1]
        self._hist += counts

    def _scratch(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable flat buffer: allocating fresh large tensors per call costs page faults."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            self._buffers[name] = buf
        return buf[:numel]

    def next_pass(self) -> None:
        """Close the current pass: fix one more digit of the threshold."""
        if self.done:
            return
        hist = self._hist
        rank = self.m - self._greater  # we need the rank-th largest among the candidates
        total = int(hist.sum())
        if self._level == 0 and total < self.m:
            raise ValueError(f"selector asked for the {self.m}-th largest of {total} entries")
        # counts of entries in bins strictly above each bin, scanning from the top bin down
        above = torch.cumsum(hist.flip(0), 0).flip(0) - hist
        digit = int(torch.nonzero((above < rank) & (above + hist >= rank)).max())
        self._greater += int(above[digit])
        self._prefix = (self._prefix << _DIGIT_BITS) | digit
        self._level += 1
        if self._level == self._levels:
            value = torch.tensor(self._prefix, dtype=self._int).view(self.dtype).item()
            self._result = MagnitudeThreshold(value, kept=self.m, n_greater=self._greater, n_equal=int(hist[digit]))
        self._hist = torch.zeros(_BINS, dtype=torch.int64)

    def result(self) -> MagnitudeThreshold:
        if self._result is None:
            raise RuntimeError("selection is not finished: keep calling observe()/next_pass()")
        return self._result


def top_magnitude_threshold(tensors: list[torch.Tensor] | torch.Tensor, k: float) -> MagnitudeThreshold:
    """Exact threshold keeping the top-``k`` fraction of magnitudes over ``tensors`` taken together.

    Example:
        >>> top_magnitude_threshold(torch.tensor([1.0, -4.0, 2.0, 3.0]), k=0.5).value
        3.0
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    n = sum(t.numel() for t in tensors)
    sel = MagnitudeSelector(keep_count(k, n), dtype)
    while not sel.done:
        for t in tensors:
            sel.observe(t.to(dtype))
        sel.next_pass()
    return sel.result()
