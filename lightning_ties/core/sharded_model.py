"""A :class:`~.merger.Merger`'s model sharded over W ranks (FSDP2 ``fully_shard``, or inside an FSDP1 wrapper of its
parent: :class:`WrappedModelView`): the merge on each rank's rows.

Once the strategy has sharded the model, :meth:`Merger.use_shards <.merger.Merger.use_shards>` hands its
merges to :class:`ShardedModel`: each rank reads its own rows of the base and of every task (per row range
from safetensors files and DCP folders), computes tau_m on them with the few global quantities reduced
across ranks (:func:`~lightning_ties.distributed.merge.merge_sharded_`: bit for bit the one-process merge),
and writes ``base + lam * tau_m``, a task's own weights or a task's head into its shards in place. No rank
holds a whole tensor of the merge: memory per rank is about 1/W of one process.

Every method here is collective: every rank calls it, with the same arguments, in the same order.

Example (on every rank, after ``fully_shard(model)``; ``merger`` built on ``model`` before)::

    merger.use_shards(lambda: sharded_view(model))
    merger.apply_merge(k=0.2, lam=1.0)      # tau_m on this rank's rows, written into its shards
    merger.use_task("a")                    # task a's head rows swapped in
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..distributed.merge import ShardedMerge, merge_sharded_
from ..distributed.views import RowsSource, ShardedView, sharded_view
from ..merging.options import MergeOptions
from ..merging.sources import TensorSource


class ShardedModel:
    """This rank's part of a merger's model: its rows of the base (CPU), the merge and the heads on its shards.

    Args:
        view_of: a fresh view of the sharded model (:func:`~lightning_ties.distributed.sharded_view`).
        base: the base, with the model's keys and global shapes (read once, this rank's rows only).
        tasks: task name -> fine-tuned source with the model's keys (read per row range when used).
        head_keys: keys each task keeps its own of; under sharding they must have the model's shapes.
    """

    def __init__(
        self,
        view_of: Callable[[], ShardedView],
        base: TensorSource,
        tasks: Mapping[str, TensorSource],
        head_keys: Sequence[str],
    ) -> None:
        self.view_of = view_of
        self.tasks = dict(tasks)
        self.head_keys = list(head_keys)
        view = view_of()
        _check_head_shapes(view, self.tasks, self.head_keys)
        rows = RowsSource(base, view.rows)
        #: this rank's rows of the base, heads left out, on the CPU (the merged model is ``base + lam * tau_m`` on them)
        self.base = {key: rows.get(key) for key in rows.keys() if key not in self.head_keys}
        self._heads: dict[str, dict[str, torch.Tensor]] = {}

    def merge(self, options: MergeOptions, device: torch.device | None = None) -> ShardedMerge:
        """tau_m of ``options`` on this rank's rows (kept on ``device``), not applied yet."""
        if options.merge_method.needs_data:
            raise ValueError(
                f"method {options.method!r} needs each task's data on whole weights, which no rank holds when the "
                "model is sharded; choose a data-free method (ties, task_arithmetic, dare_ties, tsv...), or search "
                "method='auto' (it leaves such methods out when sharded)"
            )
        return merge_sharded_(self.view_of(), self.base, list(self.tasks.values()), options, apply=False, device=device)

    def write_task(self, task: str, keys: Sequence[str]) -> None:
        """Write ``task``'s own rows of ``keys`` (those its checkpoint holds) into the shards."""
        view = self.view_of()
        rows = RowsSource(self.tasks[task], view.rows)
        wanted, held = set(keys), set(rows.keys())
        view.write_((key, rows.get(key)) for key in view.keys if key in wanted and key in held)

    def use_head(self, task: str) -> None:
        """Write ``task``'s head rows into the shards (read once per task, kept on the CPU)."""
        view = self.view_of()
        heads = self._heads.get(task)
        if heads is None:
            rows = RowsSource(self.tasks[task], view.rows)
            present = set(rows.keys())
            heads = self._heads[task] = {key: rows.get(key) for key in self.head_keys if key in present}
        view.write_((key, heads[key]) for key in view.keys if key in heads)


class WrappedModelView:
    """A ``view_of`` for :class:`ShardedModel` when FSDP1 wraps the model's parent (Lightning's ``FSDPStrategy`` wraps
    the whole LightningModule): this rank's view of the wrapper's entries under ``prefix`` (the model's attribute,
    ``"model."``), named as the model's own keys; the parent's other entries are left out, and written back as they are.

    Example (on every rank, after ``FullyShardedDataParallel(lightning_module)``)::

        merger.use_shards(WrappedModelView(wrapper, "model."))
    """

    def __init__(self, wrapper: nn.Module, prefix: str) -> None:
        self.wrapper = wrapper
        self.prefix = prefix

    def __call__(self) -> ShardedView:
        view = sharded_view(self.wrapper)
        cut = len(self.prefix)
        view.entries = {key[cut:]: entry for key, entry in view.entries.items() if key.startswith(self.prefix)}
        view.aliases = {key[cut:]: first[cut:] for key, first in view.aliases.items()
                        if key.startswith(self.prefix) and first.startswith(self.prefix)}
        return view


def _check_head_shapes(view: ShardedView, tasks: Mapping[str, TensorSource], head_keys: Sequence[str]) -> None:
    """A head of another shape than the model's cannot be swapped into fixed shards: say which, before any merge."""
    specs = view.specs()
    for name, src in tasks.items():
        held = set(src.keys())
        for key in head_keys:
            if key in held and key in specs and tuple(src.spec(key).shape) != tuple(specs[key].shape):
                raise ValueError(
                    f"task {name!r}: its head {key!r} has shape {tuple(src.spec(key).shape)}, the sharded model's "
                    f"{tuple(specs[key].shape)}; under a sharded strategy every task's head must have the model's "
                    "shape (the shards cannot change shape). Pad the heads to one shape, or evaluate on one device "
                    "or under DDP"
                )


__all__ = ["ShardedModel", "WrappedModelView"]
