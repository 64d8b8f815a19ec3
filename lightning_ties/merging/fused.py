"""The fused-kernel paths of the engine (CUDA + Triton, :mod:`.kernels`): the same bits, fewer reads.

The eager engine (:mod:`.engine`) asks :class:`FusedPaths` whether the kernels run for this
merge (:meth:`FusedPaths.active`: a CUDA device, float32, Triton importable, not disabled);
when they do, the bracketed select pass and the merge pass of TIES's global trim run here,
one kernel launch per tensor, and anything a kernel cannot decide (threshold ties a task
still keeps, contested sign columns) is recomputed eagerly on the few columns concerned. A
kernel that fails turns the kernels off (:func:`.kernels.disable`) and the engine redoes the
work on its eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from .contested import Contested
from .reading import TaskReader
from .select import MagnitudeSelector
from .steps import ThresholdTrim, disjoint_merge, ties_chunk_


class FusedPaths:
    """The fused select and merge passes of one merge, reading through ``reader``.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> src = StateDictSource({"w": torch.zeros(2)})
        >>> FusedPaths(TaskReader(src, [src])).active()  # never on the CPU
        False
    """

    def __init__(self, reader: TaskReader) -> None:
        self.reader = reader
        self._cuts: torch.Tensor | None = None
        self._cuts_of: ThresholdTrim | None = None  # the trim whose cuts ``_cuts`` holds

    def active(self) -> bool:
        """Whether this merge runs the fused Triton kernels (same bits as the eager path)."""
        if self.reader.on_cpu:
            return False
        return _kernels().available(self.reader.device, self.reader.compute_dtype)

    def inputs(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Base's and the models' flat tensors of ``key`` on the device, in a dtype the kernels read."""
        tensors = [self.reader.get(self.reader.base, key)] + [self.reader.get(m, key) for m in self.reader.models]
        # other dtypes (float64 inputs) are rounded to float32 first, as the eager path's ``.to``
        tensors = [t if _kernels().readable(t) else t.to(self.reader.compute_dtype).contiguous() for t in tensors]
        return tensors[0], tensors[1:]

    def bracket_pass(self, keys: Sequence[str], selectors: list[MagnitudeSelector]) -> bool:
        """The bracketed select pass in one fused kernel per key; False (nothing counted) if it failed.

        Raises the selector's ``ValueError`` (first task, then first key) for a NaN or an Inf.
        """
        bits = [s.bracket_bits for s in selectors]
        n_tasks = self.reader.n_tasks
        lo = torch.tensor([b[0] for b in bits], dtype=torch.int32, device=self.reader.device)
        hi = torch.tensor([b[1] for b in bits], dtype=torch.int32, device=self.reader.device)
        hist = torch.zeros(n_tasks, max(h - l + 1 for l, h in bits), dtype=torch.int64, device=self.reader.device)
        above = torch.zeros(n_tasks, dtype=torch.int64, device=self.reader.device)
        flags = torch.zeros(n_tasks, len(keys), dtype=torch.int32, device=self.reader.device)
        observed = 0
        try:
            for j, key in enumerate(keys):
                if not self.reader.local_numel(key):  # none of it on this rank: read nothing
                    continue
                base, fts = self.inputs(key)
                _kernels().bracket_counts(base, fts, lo, hi, hist, above, flags, j)
                observed += base.numel()
            bad = flags.nonzero().tolist()  # the pass's one host sync
        except Exception as err:  # a compile or launch failure: count on the eager path
            _kernels().disable(f"select pass: {type(err).__name__}: {err}")
            return False
        if bad:
            task, j = min(bad)
            selectors[task].report_nonfinite(f"task vector of {self.reader.models[task].label} at {keys[j]!r}")
        for sel, (l, h), inside, count in zip(selectors, bits, hist, above):
            sel.add_bracket_counts(inside[: h - l + 1], count, observed)
        return True

    def merge(
        self, key: str, trim_step: ThresholdTrim, out: torch.Tensor, sign: str, merge: str, contested: Contested
    ) -> torch.Tensor | None:
        """tau_m of ``key`` into ``out`` by the fused kernel; the sum of its elected signs.

        The kernel keeps ``|tau| > cut`` only and flags the blocks holding a contested entry
        (zero score, non-zero candidate). The columns of those blocks and of the threshold
        ties a task's budget still keeps are recomputed eagerly (:meth:`_patch_ties`), so
        ``out``, the sign sum and the contested entries recorded into ``contested`` are the
        eager path's, and ``trim_step``'s budget is spent as the eager path spends it.

        None (``out`` to be redone on the eager path; budget and ``contested`` untouched)
        when the kernel failed.
        """
        if self._cuts is None or self._cuts_of is not trim_step:
            self._cuts = torch.tensor(trim_step.cuts, dtype=torch.float32, device=self.reader.device)
            self._cuts_of = trim_step
        cached = self._cuts
        try:
            base, fts = self.inputs(key)
            signs, blocks = _kernels().fused_ties_merge(base, fts, cached, out, sign, merge)
            flagged = torch.nonzero(blocks).squeeze(1)  # one host sync per key (the eager path: one per chunk)
            if flagged.numel() or any(trim_step.tie_budget):
                return self._patch_ties(base, fts, trim_step, out, signs, sign, merge, flagged, contested)
        except Exception as err:
            _kernels().disable(f"merge: {type(err).__name__}: {err}")
            return None
        return signs

    def _patch_ties(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        trim_step: ThresholdTrim,
        out: torch.Tensor,
        signs: torch.Tensor,
        sign: str,
        merge: str,
        flagged: torch.Tensor,
        contested: Contested,
    ) -> torch.Tensor:
        """Correct a strict fused merge of one key: threshold ties kept, contested blocks recorded.

        Per task with a tie budget, the ties it keeps here are the first ``tie_budget[i]``
        entries with ``|tau| == value`` in flat order (as :class:`ThresholdTrim` picks them).
        Those columns and the columns of the kernel's ``flagged`` blocks (a contested entry in
        its strict view) are gathered (``[N, c']`` per engine chunk), trimmed without (the
        kernel's view) and with those ties, merged by ``ties_chunk_`` (the eager bits), the
        latter written into ``out``, and the sign sum corrected by the difference. The
        contested entries of the with-ties merge go into ``contested`` at their flat offsets,
        for the majority fallback. Returns the corrected sign sum; state (budget,
        ``contested``) changes only once every column is done.
        """
        cd = self.reader.compute_dtype
        n = base.numel()
        kept: dict[int, torch.Tensor] = {}
        spent: dict[int, int] = {}
        for i, left in enumerate(trim_step.tie_budget):
            if left <= 0:
                continue
            value = trim_step.thresholds[i].value
            at_threshold = (fts[i].to(cd) - base.to(cd)).abs_() == value
            if value == 0.0:  # a kept zero is still a zero: spend the budget, change nothing
                spent[i] = min(left, int(at_threshold.sum()))
                continue
            idx = torch.nonzero(at_threshold).squeeze(1)[:left]
            spent[i] = idx.numel()
            if idx.numel():
                kept[i] = idx
        parts = list(kept.values())
        if flagged.numel():
            block = _kernels().MERGE_BLOCK
            in_blocks = (flagged[:, None] * block + torch.arange(block, device=flagged.device)).reshape(-1)
            parts.append(in_blocks[in_blocks < n])
        found = Contested(disjoint_merge, merge)
        if parts:
            cols = torch.unique(torch.cat(parts))  # sorted
            positions = {i: torch.searchsorted(cols, idx) for i, idx in kept.items()}
            for start in range(0, cols.numel(), self.reader.chunk_size):
                end = min(cols.numel(), start + self.reader.chunk_size)
                part = cols[start:end]
                ties_here = {i: p[(p >= start) & (p < end)] - start for i, p in positions.items()}

                def trim_sub(with_ties: bool, ties_here: dict[int, torch.Tensor] = ties_here) -> Callable[..., torch.Tensor]:
                    def apply(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                        # ThresholdTrim's arithmetic on the gathered columns, ties given
                        for i, (row, cut) in enumerate(zip(t, trim_step.cuts)):
                            torch.hardshrink(row, cut, out=out[i])
                            if with_ties and i in ties_here:
                                out[i, ties_here[i]] = row[ties_here[i]]
                        return out

                    return apply

                b = base[part].to(cd)
                taus = torch.stack([ft[part].to(cd) - b for ft in fts])
                strict_out = torch.empty(part.numel(), dtype=cd, device=out.device)
                strict_signs, _ = ties_chunk_(taus.clone(), trim_sub(False), strict_out, torch.empty_like(taus), sign, merge)
                sub_out = torch.empty_like(strict_out)
                trimmed = torch.empty_like(taus)
                sub_signs, sub_contested = ties_chunk_(taus, trim_sub(True), sub_out, trimmed, sign, merge)
                if sub_contested is not None:  # as the eager path records them, at their flat offsets
                    found.collect_columns(0, sub_contested, trimmed, index=part)
                out[part] = sub_out
                signs = signs - strict_signs + sub_signs
        contested.extend(found)
        for i, count in spent.items():
            trim_step.tie_budget[i] -= count
        return signs


def _kernels() -> ModuleType:
    """:mod:`.kernels`, imported on first use: Triton is only loaded for merges off the CPU."""
    from . import kernels

    return kernels


__all__ = ["FusedPaths"]
