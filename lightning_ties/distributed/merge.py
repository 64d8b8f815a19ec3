"""The merge of a sharded module, each rank holding only its own shards.

Every rank plans the same merge from global shapes (no communication), reads its own rows of
the base and of every task, and the merge engine computes tau_m on those rows with the few
global quantities (trim counts, tie counts, the sign majority) reduced across ranks: the
result on each rank is bit for bit the single-process merge restricted to its rows. Applying
lam writes theta = base + lam * tau_m into the module's own shards in place; a lam search
re-applies the same local tau_m per candidate without recomputing it.

Memory per rank: its rows of the base (a CPU copy), of tau_m, and the rows of the tasks read
one tensor at a time: about 1/W of one process.

The SVD methods (TSV-M, Iso-C/CTS) gather each tensor they factor, one at a time, inside the
engine; methods that need data (RegMean) are refused (:class:`MergeOptions` says so).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..merging.engine import MergeReport, merged_task_vector
from ..merging.options import MergeOptions
from ..merging.sources import TensorSource, as_source
from ..merging.steps import check_lam, scale
from .views import LocalSource, RowsSource, ShardedView


@dataclass
class ShardedMerge:
    """tau_m's local pieces on one rank, ready to apply for any lam (in place into the module).

    Attributes:
        view: the module's sharded view (where the pieces are written).
        base: this rank's pieces of the base (key -> rows), kept on the CPU by default.
        tau: this rank's pieces of tau_m (float32), the same rows.
        report: what was merged and skipped (global keys; thresholds are the global ones).
    """

    view: ShardedView
    base: dict[str, torch.Tensor]
    tau: dict[str, torch.Tensor]
    report: MergeReport

    def apply_(self, lam: float) -> None:
        """theta = base + lam * tau_m on this rank's shards, written into the module in place.

        Collective: every rank calls it with the same lam (tied and replicated entries are shared).
        """
        lam = check_lam(lam)
        self.view.write_(self.scaled(lam))  # one merged piece at a time: no second copy of the shards
        self.report = self.report.with_lam(lam)

    def scaled(self, lam: float) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, base + lam * tau_m)`` for this rank's pieces, one at a time."""
        for key in self.tau:
            yield key, self.piece(key, lam)

    def piece(self, key: str, lam: float) -> torch.Tensor | None:
        """This rank's rows of the merged ``key`` for ``lam`` (float32; None for a key not merged)."""
        tau = self.tau.get(key)
        if tau is None:
            return None
        target = self.view.entries[key].local
        base = self.base[key].to(target.device)
        return scale(base, tau.reshape(base.shape).to(target.device), lam)  # tau_m of a part is flat

    def restore_(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write local pieces (e.g. the fine-tuned ones, :meth:`ShardedView.local_state`) back in place."""
        self.view.write_(state)


def merge_sharded_(
    view: ShardedView,
    base: Mapping[str, torch.Tensor] | TensorSource,
    tasks: Sequence[Any],
    options: MergeOptions | None = None,
    apply: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **keywords: Any,
) -> ShardedMerge:
    """Merge ``tasks`` onto ``base`` on this rank's shards of ``view``, and apply ``options.lam`` in place.

    Args:
        view: how this rank sees the module (:func:`~lightning_ties.distributed.views.sharded_view`).
        base: this rank's pieces of the base (``view.local_state()`` at fit start) or a source
            with the module's keys and global shapes (read per row range).
        tasks: the fine-tuned models: sources, paths or state dicts with the module's keys and
            global shapes (each rank reads only its rows), or their local pieces already
            (a :class:`~lightning_ties.distributed.views.LocalSource`).
        options: the recipe (method, k, lam, ...); or give its fields as keywords (``k=0.2, lam=1.0``).
        apply: write theta = base + lam * tau_m into the module now (collective); False: only compute tau_m.
        device: where tau_m is computed and kept (default: the base pieces' device).

    Returns:
        A :class:`ShardedMerge` holding the local tau_m, to re-apply for other lam.

    Example (on every rank, inside a process group, after ``fully_shard(model)``)::

        view = sharded_view(model)
        base = view.local_state()            # at fit start
        ...                                  # training
        merged = merge_sharded_(view, base, ["a.safetensors", view.source(label="this run")],
                                k=0.2, lam=1.0)
        merged.apply_(0.8)                   # another lam, same tau_m
    """
    if options is None:
        options = MergeOptions.from_keywords(**keywords)
    elif keywords:
        raise ValueError(f"pass either options or keywords, not both (got options and {sorted(keywords)})")
    options.spec  # a method that needs data (RegMean) refuses here, before any read
    base_pieces = _base_pieces(view, base)
    base_src = view.source(base_pieces, label="base")
    models = [local_rows(view, task, i) for i, task in enumerate(tasks)]
    tau = merged_task_vector(
        base_src, models, options, compute_dtype=compute_dtype, method=options.method,
        params=options.method_params, device=device, collectives=view.collectives, shards=view.shards,
    )
    result = ShardedMerge(view, base_pieces, dict(tau), tau.report)
    if apply:
        result.apply_(options.lam)
    return result


def _base_pieces(view: ShardedView, base: Any) -> dict[str, torch.Tensor]:
    if isinstance(base, Mapping) and all(isinstance(v, torch.Tensor) for v in base.values()):
        return dict(base)
    src = RowsSource(as_source(base, "base"), view.rows)
    return {key: src.get(key) for key in src.keys()}


def local_rows(view: ShardedView, task: Any, label: int | str) -> TensorSource:
    """A task as this rank's rows: a LocalSource (a stored task's rows) is used as is, anything else is
    read per row range (``label``: the task's index or name, for messages)."""
    if isinstance(task, LocalSource):
        return task
    return RowsSource(as_source(task, f"model[{label}]" if isinstance(label, int) else label), view.rows)
