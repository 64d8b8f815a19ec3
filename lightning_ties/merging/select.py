"""Exact top-m magnitude threshold over tensors that arrive one at a time.

The paper's code flattens the whole model and calls ``kthvalue``: O(model) extra memory and
a selection over hundreds of millions of floats. We instead use a radix select over the bit
patterns of |x|. For non-negative IEEE floats the integer view is ordered like the value, so
the m-th largest magnitude can be found digit by digit: one pass histograms the top 16 bits,
the next pass histograms the following 16 bits of only those entries whose prefix matched,
and so on (2 passes for float32, 4 for float64). Memory is one 65536-bin histogram; the
result is bit-exact, equal to a full sort.

With a *bracket* (a magnitude range that very likely holds the threshold, e.g. from a sample),
one pass suffices: it counts the entries above the bracket and histograms every bit pattern
inside it. When the counts show that the threshold is not inside (an unlucky sample), the
selector falls back to the radix passes: the bracket changes the cost, never the result.

On W ranks each rank observes its own entries and the counts of every pass are summed over
ranks before the pass closes (``reduce``, e.g. an all-reduce): the histogram, hence the
threshold, is the one of all entries together, and no task vector crosses ranks.

Ties at the threshold are resolved deterministically: every |x| > t is kept, and of the
entries with |x| == t only the first ``ties_to_keep`` in stream order (key order, then flat
index) are kept, so exactly ``m`` entries survive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .collectives import SINGLE_PROCESS, Collectives

Reduce = Callable[[torch.Tensor], torch.Tensor]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}
# Widest bracket, in bit patterns, histogrammed in one pass (a 4 MB int64 histogram).
MAX_BRACKET_BINS = 1 << 19
# The gather strategy sends the entries that cannot hold the threshold to this many spare bins
# (picked by their low mantissa bits, so that a GPU's atomic adds do not queue on one counter).
_SPARE_BINS = 1 << 12


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
    :meth:`next_pass` between passes, until :attr:`done`. ``bracket=(lo, hi)``, magnitudes
    that likely enclose the result, makes one pass enough when they do (and costs one pass
    when they do not); ranges wider than :data:`MAX_BRACKET_BINS` bit patterns are ignored.
    Selectors fed one after the other may share one ``scratch`` dict of buffers. Histogram and
    scratch live on the device of the observed tensors.

    ``reduce`` (W ranks, each observing its own entries): a function summing an int64 tensor
    over ranks (an all-reduce), called once per pass on the pass's counts, so that every rank
    reads the same histogram and finds the same threshold (:func:`next_passes` batches the
    selectors of N tasks into one call). A NaN or Inf on any rank is then reported on every
    rank when the pass closes, rather than where it was seen, so that no rank is left waiting.

    ``gather`` (default: on any device but the CPU) histograms only the entries that can hold
    the threshold (inside the bracket, or matching the digits found so far) and counts the
    others by reductions. The histogram, hence the result, is the same; but a GPU's
    histogram is built with atomic adds, and mapping the ~99% of entries outside the range
    onto two bins would serialise them on those two counters. It also never waits for the
    device within a pass (no ``bincount``, boolean indexing or ``.item()``: each is a host
    sync, and a model has hundreds of tensors): the other entries go to spare bins, counts
    stay device tensors, and a NaN or Inf is reported when the pass closes.

    Example:
        >>> sel = MagnitudeSelector(m=2, dtype=torch.float32)
        >>> while not sel.done:
        ...     for t in (torch.tensor([0.5, -3.0]), torch.tensor([1.0, 2.0])):
        ...         sel.observe(t)
        ...     sel.next_pass()
        >>> sel.result().value
        2.0
    """

    def __init__(
        self,
        m: int,
        dtype: torch.dtype = torch.float32,
        bracket: tuple[float, float] | None = None,
        scratch: dict[str, torch.Tensor] | None = None,
        gather: bool | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        if dtype not in _INT_VIEW:
            raise ValueError(f"selection runs in float32 or float64, got {dtype}")
        self.m = m
        self.dtype = dtype
        self.gather = gather
        self.reduce = reduce
        self._bad: str | None = None  # with reduce: the first tensor seen holding a NaN/Inf this pass
        self._int = _INT_VIEW[dtype]
        self._width = torch.finfo(dtype).bits
        self._levels = self._width // _DIGIT_BITS
        self._level = 0
        self._prefix = 0  # digits found so far (high bits of the threshold's bit pattern)
        self._greater = 0  # entries known to be strictly above the prefix
        # this pass's histogram: allocated when first needed (see _counts), as the tasks' selectors
        # of one merge would zero megabytes up front that the CPU bracket pass never fills
        self._hist = torch.zeros(0, dtype=torch.int64)
        # selectors observing one after the other may share their scratch buffers
        self._buffers: dict[str, torch.Tensor] = {} if scratch is None else scratch
        # first top-16-bit digit of +Inf; NaNs lie above it
        self._nonfinite_bin = int(torch.tensor(float("inf"), dtype=dtype).view(self._int).item()) >> (self._width - _DIGIT_BITS)
        self._result: MagnitudeThreshold | None = MagnitudeThreshold.keep_none() if m <= 0 else None
        # gather strategy: entries observed in this pass, device counts of entries above the
        # bracket, and per observed tensor (name, "holds a NaN or Inf" as a device bool)
        self._observed = 0
        self._above: torch.Tensor | int = 0
        self._nonfinite: list[tuple[str, torch.Tensor]] = []
        self._bracket_hit = False
        self._inf_bits = int(torch.tensor(float("inf"), dtype=dtype).view(self._int).item())
        self._bracket = self._bracket_bits(bracket) if m > 0 else None

    def _bracket_bits(self, bracket: tuple[float, float] | None) -> tuple[int, int] | None:
        """Bit patterns of a usable bracket ``(lo, hi)`` of magnitudes, or None."""
        if bracket is None:
            return None
        lo, hi = (int(torch.tensor(abs(v), dtype=self.dtype).view(self._int).item()) for v in bracket)
        if not lo <= hi < self._inf_bits or hi - lo + 1 > MAX_BRACKET_BINS:
            return None
        return lo, hi

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
        if self._hist.device != flat.device:
            self._hist = self._hist.to(flat.device)
        gather = self.gather if self.gather is not None else flat.device.type != "cpu"
        bits = torch.abs(flat, out=self._scratch("magnitudes", flat.numel(), self.dtype, flat.device)).view(self._int)
        if gather:
            self._observe_gather(bits, name)
            return
        if self._bracket is not None:
            self._observe_bracket(bits, name)
            return
        shift = self._width - _DIGIT_BITS * (self._level + 1)
        digits = torch.bitwise_right_shift(bits, shift, out=self._scratch("digits", flat.numel(), self._int, flat.device))
        if self._level == 0:
            counts = torch.bincount(digits, minlength=_BINS)
            if bool(counts[self._nonfinite_bin :].any()):
                self.report_nonfinite(name)
        else:
            # Candidates (high digits == prefix) land in bins 1.._BINS, all others in 0 or _BINS + 1:
            # integer arithmetic on every entry is cheaper than a boolean mask and a gather.
            digits.sub_((self._prefix << _DIGIT_BITS) - 1).clamp_(0, _BINS + 1)
            counts = torch.bincount(digits, minlength=_BINS + 2)[1 : _BINS + 1]
        self._counts().add_(counts)

    def report_nonfinite(self, name: str) -> None:
        """``name`` holds a NaN or Inf: raise now, or (with reduce) when the pass closes, on every rank.

        Callers that count elsewhere (the fused kernels) report what they saw here too.
        """
        if self.reduce is None:
            raise ValueError(f"{name} holds NaN or Inf values; fix or exclude it before merging")
        if self._bad is None:
            self._bad = name

    def _observe_gather(self, bits: torch.Tensor, name: str) -> None:
        """The gather strategy: histogram the candidates by index_add, without a host sync.

        Candidates (inside the bracket, or with the high digits found so far) go to their bin
        of ``hist[:bins]``; all other entries to spare bins past it, discarded when the pass
        closes. Entries above the bracket are counted by a reduction.
        """
        if not bits.numel():
            return
        self._nonfinite.append((name, bits.max() >= self._inf_bits))
        self._observed += bits.numel()
        if self._bracket is not None:
            lo, hi = self._bracket
            bins = hi - lo + 1
            self._above = self._above + (bits > hi).sum()
            candidate = (bits >= lo) & (bits <= hi)
            digits = bits - lo
        else:
            bins = _BINS
            shift = self._width - _DIGIT_BITS * (self._level + 1)
            digits = torch.bitwise_right_shift(bits, shift)
            if self._level > 0:
                candidate = torch.bitwise_right_shift(digits, _DIGIT_BITS) == self._prefix
                digits.bitwise_and_(_BINS - 1)
            else:
                candidate = None  # the first digit of every entry is counted
        if candidate is not None:
            spare = torch.bitwise_and(bits, _SPARE_BINS - 1).add_(bins)
            digits = torch.where(candidate, digits, spare)
        if self._hist.numel() != bins + _SPARE_BINS:
            self._hist = torch.zeros(bins + _SPARE_BINS, dtype=torch.int64, device=bits.device)
        self._hist.index_add_(0, digits, torch.ones(1, dtype=torch.int64, device=bits.device).expand(digits.numel()))

    def _close_gather(self) -> None:
        """End a gather pass: report a NaN/Inf, then lay the counts out as the other strategy does."""
        if self._nonfinite:
            flags = torch.stack([flag for _, flag in self._nonfinite]).tolist()  # one host sync per pass
            bad = [name for (name, _), flag in zip(self._nonfinite, flags) if flag]
            self._nonfinite = []
            if bad:
                self.report_nonfinite(bad[0])
        if not self._observed:  # nothing observed: the histogram is still the empty standard one
            return
        if self._bracket is not None:
            lo, hi = self._bracket
            inside = self._hist[: hi - lo + 1]
            above = torch.as_tensor(self._above, dtype=torch.int64, device=self._hist.device).reshape(1)
            below = self._observed - inside.sum().reshape(1) - above
            self._hist = torch.cat([below, inside, above])
        else:
            self._hist = self._hist[:_BINS]
        self._observed, self._above = 0, 0

    def _observe_bracket(self, bits: torch.Tensor, name: str) -> None:
        if bits.numel() and int(bits.max()) >= self._inf_bits:
            self.report_nonfinite(name)
        lo, hi = self._bracket
        # below the bracket -> bin 0, inside -> 1 + (bits - lo), above -> the last bin
        digits = torch.sub(bits, lo - 1, out=self._scratch("digits", bits.numel(), self._int, bits.device))
        digits.clamp_(0, hi - lo + 2)
        self._counts().add_(torch.bincount(digits, minlength=hi - lo + 3))

    def _counts(self) -> torch.Tensor:
        """This pass's histogram in its usual layout (what :meth:`pass_counts` sends): zeros until counted into."""
        size = _BINS if self._bracket is None else self._bracket[1] - self._bracket[0] + 3
        if self._hist.numel() != size:
            self._hist = torch.zeros(size, dtype=torch.int64, device=self._hist.device)
        return self._hist

    def _close_bracket_pass(self) -> None:
        """Read the threshold off the bracket's histogram, or fall back to the radix passes."""
        lo, _ = self._bracket
        hist = self._counts()
        below, above, inside = int(hist[0]), int(hist[-1]), hist[1:-1]
        # from the bottom: cumulative[i] entries inside lie at bit patterns lo..lo + i
        cumulative = torch.cumsum(inside, 0)
        n_inside = int(cumulative[-1])
        if below + n_inside + above < self.m:
            raise ValueError(f"selector asked for the {self.m}-th largest of {below + n_inside + above} entries")
        rank = self.m - above  # the threshold is the rank-th largest entry inside the bracket
        if 0 < rank <= n_inside:
            # the highest bin with at least `rank` entries at or above it: n_inside - rank entries lie
            # strictly below it (cumulative[index - 1] <= n_inside - rank < cumulative[index])
            index = int(torch.searchsorted(cumulative, n_inside - rank, right=True))
            n_equal = int(inside[index])
            value = torch.tensor(lo + index, dtype=self._int).view(self.dtype).item()
            n_greater = above + n_inside - int(cumulative[index])
            self._result = MagnitudeThreshold(value, kept=self.m, n_greater=n_greater, n_equal=n_equal)
        self._bracket = None  # on a miss the next passes are the radix ones
        self._hist = hist.new_zeros(0)

    @property
    def bracket_bits(self) -> tuple[int, int] | None:
        """The current bracket as the bit patterns ``(lo, hi)`` of its magnitudes (None: no bracket pass)."""
        return None if self.done else self._bracket

    def add_bracket_counts(self, inside: torch.Tensor, above: torch.Tensor | int, observed: int) -> None:
        """Add counts made elsewhere (the fused kernel of :mod:`.kernels`) to this bracketed pass.

        ``inside[j]`` counts the entries whose ``|x|`` has bit pattern ``lo + j`` (int64,
        ``hi - lo + 1`` bins), ``above`` those above ``hi``, out of ``observed`` entries in
        all; the caller has checked them for NaN and Inf. :meth:`next_pass` then reads them
        as if :meth:`observe` had seen the entries.
        """
        if self._bracket is None or self.done:
            raise RuntimeError("add_bracket_counts needs a selector in its bracketed pass")
        if not observed:  # a rank holding none of the keys: its counts keep the layout every rank sums
            return
        lo, hi = self._bracket
        bins = hi - lo + 1
        if inside.numel() != bins:
            raise ValueError(f"expected {bins} bracket bins, got {inside.numel()}")
        if self._hist.numel() != bins + _SPARE_BINS or self._hist.device != inside.device:  # the first counts
            self._hist = torch.cat([inside, inside.new_zeros(_SPARE_BINS)])
        else:
            self._hist[:bins] += inside
        self._above = self._above + above
        self._observed += observed

    def set_bracket_counts(self, hist: torch.Tensor) -> None:
        """This bracketed pass's counts, made elsewhere (the CPU's batched bracket pass), as the pass's histogram.

        ``hist`` (int64, ``hi - lo + 3`` bins, the layout :meth:`pass_counts` sends) counts the
        entries below the bracket, then those at each bit pattern ``lo..hi``, then those above
        it; the caller has checked them for NaN and Inf. It is kept, not copied: :meth:`next_pass`
        then reads it as if :meth:`observe` had counted the entries.
        """
        if self._bracket is None or self.done:
            raise RuntimeError("set_bracket_counts needs a selector in its bracketed pass")
        lo, hi = self._bracket
        if hist.numel() != hi - lo + 3 or hist.dtype != torch.int64:
            raise ValueError(f"expected {hi - lo + 3} int64 bracket counts, got {hist.numel()} of {hist.dtype}")
        self._hist = hist
        self._observed, self._above, self._nonfinite = 0, 0, []

    @property
    def bracketed(self) -> bool:
        """Whether the current pass is the one-pass bracket."""
        return self._bracket is not None

    @property
    def used_bracket(self) -> bool:
        """Whether the result came from the one-pass bracket (False: radix passes)."""
        return self._bracket_hit

    def _scratch(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable flat buffer: allocating fresh large tensors per call costs page faults."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]

    def pass_counts(self) -> torch.Tensor:
        """This pass's counts as one int64 tensor (the histogram, then a NaN/Inf flag): what ranks sum.

        Its size depends only on the pass (and the bracket), never on the entries observed.
        """
        if self._observed or self._nonfinite:
            self._close_gather()
        hist = self._counts()
        flag = torch.tensor([self._bad is not None], dtype=torch.int64, device=hist.device)
        return torch.cat([hist, flag])

    def next_pass(self, counts: torch.Tensor | None = None) -> None:
        """Close the current pass: fix one more digit of the threshold.

        With ``reduce``, the pass's counts are summed over ranks first (one call), unless
        ``counts`` brings them already summed (:func:`next_passes`).
        """
        if self.done:
            return
        if counts is None and self.reduce is not None:
            counts = self.reduce(self.pass_counts())
        if counts is not None:
            self._set_counts(counts)
        if self._observed or self._nonfinite:
            self._close_gather()
        if self._bracket is not None:
            self._close_bracket_pass()
            self._bracket_hit = self.done
            return
        hist = self._counts()
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
        self._hist = hist.new_zeros(0)

    def _set_counts(self, counts: torch.Tensor) -> None:
        """Take the counts of every rank (from :meth:`pass_counts`, summed): a NaN/Inf anywhere raises."""
        if int(counts[-1]) > 0:
            where = self._bad or "a task vector held by another rank"
            self._bad = None
            raise ValueError(f"{where} holds NaN or Inf values; fix or exclude it before merging")
        self._hist = counts[:-1].to(self._hist.device)
        self._observed, self._above, self._nonfinite = 0, 0, []

    def result(self) -> MagnitudeThreshold:
        if self._result is None:
            raise RuntimeError("selection is not finished: keep calling observe()/next_pass()")
        return self._result


def next_passes(selectors: Sequence[MagnitudeSelector]) -> None:
    """Close the pass of several selectors; those with a ``reduce`` share one call of it.

    All selectors of one merge (one per task) reduce with the same function, so their counts
    travel together: one all-reduce per pass, not one per task.
    """
    open_ = [s for s in selectors if not s.done]
    reducing = [s for s in open_ if s.reduce is not None]
    if reducing:
        parts = [s.pass_counts() for s in reducing]
        summed = reducing[0].reduce(torch.cat(parts))
        offset = 0
        for sel, part in zip(reducing, parts):
            sel.next_pass(summed[offset : offset + part.numel()])
            offset += part.numel()
    for sel in open_:
        if sel.reduce is None:
            sel.next_pass()


def top_magnitude_threshold(
    tensors: list[torch.Tensor] | torch.Tensor, k: float, collectives: Collectives = SINGLE_PROCESS
) -> MagnitudeThreshold:
    """Exact threshold keeping the top-``k`` fraction of magnitudes over ``tensors`` taken together.

    On W ranks (``collectives``) each rank passes the tensors it holds and every rank gets the
    threshold over all ranks' tensors together (the counts are all-summed; no tensor moves).

    Example:
        >>> top_magnitude_threshold(torch.tensor([1.0, -4.0, 2.0, 3.0]), k=0.5).value
        3.0
    """
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    wide = any(t.dtype == torch.float64 for t in tensors)
    n = sum(t.numel() for t in tensors)
    reduce = None
    if collectives.world_size > 1:  # the total and the selection dtype, agreed by every rank
        n, wide_ranks = collectives.all_sum(torch.tensor([n, int(wide)], dtype=torch.int64)).tolist()
        wide, reduce = wide_ranks > 0, collectives.all_sum
    dtype = torch.float64 if wide else torch.float32
    sel = MagnitudeSelector(keep_count(k, n), dtype, reduce=reduce)
    while not sel.done:
        for t in tensors:
            sel.observe(t.to(dtype))
        sel.next_pass()
    return sel.result()
