"""Entries of a merge whose elected sign waits for the whole scope: the majority fallback's state."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Contested:
    """Entries whose sign score is exactly 0 although some candidate is non-zero.

    They were merged with +1; if the scope's majority sign turns out negative, they are
    re-merged with -1 (the reference code's majority fallback).

    Example:
        >>> from lightning_ties.merging.steps import disjoint_merge
        >>> trimmed = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
        >>> c = Contested(disjoint_merge, "mean")
        >>> c.collect(0, torch.tensor([0.0, 5.0]), trimmed)
        >>> out = torch.tensor([1.0, 2.5])
        >>> c.resolve(out, sign_total=-1)
        >>> out
        tensor([-1.0000,  2.5000])
    """

    def __init__(self, combine: Callable[..., torch.Tensor], merge: str) -> None:
        self.combine = combine
        self.merge = merge
        self.index: list[torch.Tensor] = []
        self.negative: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.index)

    def collect(self, start: int, score: torch.Tensor, trimmed: torch.Tensor) -> None:
        zero = score == 0
        if not bool(zero.any()):
            return
        self.collect_columns(start, torch.nonzero(zero & (torch.count_nonzero(trimmed, dim=0) > 0)).squeeze(1), trimmed)

    def collect_columns(
        self, start: int, cols: torch.Tensor, trimmed: torch.Tensor, index: torch.Tensor | None = None
    ) -> None:
        """Remember the -1 merge of the contested columns ``cols`` of a chunk starting at ``start``.

        ``index`` (gathered columns, e.g. the fused merge's patch): the flat offset of each
        column of ``trimmed``, used instead of ``start + cols``.
        """
        if cols.numel():
            sub = trimmed[:, cols]
            self.index.append(cols + start if index is None else index[cols])
            minus = torch.full((cols.numel(),), -1.0, dtype=sub.dtype, device=sub.device)
            self.negative.append(self.combine(sub, minus, self.merge))

    def drop(self, columns: torch.Tensor) -> None:
        """Forget the entries at the flat offsets ``columns`` (columns merged again since)."""
        for j, index in enumerate(self.index):
            keep = ~torch.isin(index, columns)
            if not bool(keep.all()):
                self.index[j], self.negative[j] = index[keep], self.negative[j][keep]

    def extend(self, other: Contested) -> None:
        """Add the entries ``other`` recorded (same combine and merge)."""
        self.index.extend(other.index)
        self.negative.extend(other.negative)

    def resolve(self, flat_out: torch.Tensor, sign_total: torch.Tensor | float) -> None:
        """Re-merge the contested entries of ``flat_out`` (``[numel]`` or ``[N, numel]``) with -1 if needed."""
        if float(sign_total) < 0:
            for idx, values in zip(self.index, self.negative):
                flat_out[..., idx] = values


__all__ = ["Contested"]
