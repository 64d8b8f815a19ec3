"""ContinualTiesMerging: merge each new task into a growing store of task vectors, one fit at a time.

Each run fine-tunes one task. At fit end its task vector is added to a
:class:`~lightning_ties.io.task_store.TaskVectorStore` folder and every stored task is merged (as
:class:`~lightning_ties.pytorch.TiesMerging` does with its ``tasks``); the store keeps the base
(written by the first run) and the (k, lam) last chosen, so the next run can start from that merge
(``start_from="merged"``).

Example:
    >>> merging = ContinualTiesMerging(task="b", store="runs/store", start_from="merged")
    >>> merging.store_dir, merging.start_from
    ('runs/store', 'merged')
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.keys import match_to_module
from ..core.merger import Merger
from ..core.search import PAPER_DEFAULT_K, SearchResult
from ..distributed.fit import ShardedFitMerge
from ..distributed.merge import merge_sharded_
from ..distributed.store import ShardedTaskStore, gather_store
from ..io.task_store import TaskVectorStore
from ._compat import pl
from .callback import TiesMerging
from .checkpoints import on_rank_zero
from .sharded import ShardedMerging, sharded_module, sharding_kind


class ShardedContinualMerging(ShardedMerging):
    """:class:`ContinualTiesMerging` on a sharded module: each rank keeps its own rows of the base and of every
    stored task vector in its own store folder (:class:`~lightning_ties.distributed.store.ShardedTaskStore`)."""

    store: ShardedTaskStore

    def capture_base(self, trainer: pl.Trainer) -> None:
        """At fit start: the store's base rows (its first run: the module's, or ``base=``'s, written to the store)."""
        cb = self.callback
        self.fit = ShardedFitMerge(sharded_module(trainer))
        self.store = ShardedTaskStore(cb.store_dir, self.fit.view(), k=cb.store.k, exclude=self.heads or None)
        self.store.check()
        if self.store.has_base():
            self.fit.base = self.store.base_pieces()
            return
        self.fit.capture_base(match_to_module(cb.base, self.fit.keys, label="base") if cb.base is not None else None)
        self.store.save_base(self.fit.base)

    def task_sources(self, trainer: pl.Trainer, add_this_run: bool = True) -> dict[str, Any]:
        """This run's rows join the store (trimmed globally; not when the merge is only scored mid-fit); the other
        tasks, then the stored ones, in the order one process merges them."""
        cb = self.callback
        if add_this_run:
            self.store.add(cb.task, self.fit.view().source(label=cb.task), self.fit.base)
        tasks = super().task_sources(trainer)
        for name in self.store.names():
            if name != cb.task and name not in tasks:
                tasks[name] = self.store.source(name)
        return tasks

    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Mapping[str, Any]) -> SearchResult:
        result = super().merge(trainer, pl_module, loaders)
        if result.lam is not None:
            self.store.record_choice(result.k, result.lam)
        return result

    def load_stored_merge(self) -> None:
        """Start this fit from the merge of the stored tasks, with the (k, lam) last chosen for them."""
        cb = self.callback
        names = self.store.names()
        if not names:
            return
        choice: Mapping[str, Any] = self.store.choice or {}
        k = choice.get("k") or cb.ks[0] or PAPER_DEFAULT_K
        options = self._options(cb.method, k, choice.get("lam"))
        merge_sharded_(self.fit.view(), self.fit.base, [self.store.source(n) for n in names], options)


class ContinualTiesMerging(TiesMerging):
    """:class:`TiesMerging` over a task store: this run's task vector joins the store, every stored task is merged.

    Args:
        store: the :class:`~lightning_ties.io.task_store.TaskVectorStore` folder (created by the first run,
            which also writes the base there: the module's weights at fit start, or ``base``).
        start_from: ``"base"`` (fit from the module's own weights) or ``"merged"`` (first load the merge of
            the stored tasks with the (k, lam) last chosen for them).
        tasks: more tasks merged along with the store's (optional: the store may hold them all).
        everything else: as in :class:`TiesMerging`. ``heads`` also names the keys the store does not keep.

    The store is opened with the largest k of the grid (it keeps each task vector's top fraction).

    Under ``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy`` each rank keeps only its own rows of the base
    and of every stored task, in its own folder of the store (``rank-<r>-of-<W>``); the merge equals the
    single-process continual merge bit for bit. A fit on another number of ranks (or a sharded fit continuing
    a store one process wrote) first lays the stored entries out for its own ranks; an unsharded fit continuing
    a store sharded ranks wrote first puts their rows together into whole tensors (global rank 0 writes them).
    The stored entries are copied, never trimmed again: every layout gives the same merges.
    """

    #: what the sharded merge of this callback is (see :func:`~.sharded.sharded_merging`)
    sharded_merging_class = ShardedContinualMerging

    def __init__(
        self, tasks: Mapping[str, Any] | None = None, task: str = "current", *, store: str, start_from: str = "base",
        **kwargs: Any,
    ) -> None:
        if not store:
            raise ValueError("ContinualTiesMerging needs store= (the task store folder)")
        if start_from not in ("base", "merged"):
            raise ValueError(f"start_from must be 'base' or 'merged', got {start_from!r}")
        self.store_dir = str(store)
        self.start_from = start_from
        super().__init__(tasks, task, **kwargs)

    def _check_tasks_given(self) -> None:
        """Nothing to check yet: the store's tasks are known at setup, where ``_check_data`` checks the names."""

    @property
    def store(self) -> TaskVectorStore:
        """The task store (opened anew each time: other runs may have added tasks)."""
        ks: Sequence[float | None] = self.ks
        k = max(v for v in ks if v is not None) if self.has_k else None
        return TaskVectorStore(self.store_dir, k=k, exclude=self.heads)

    # ---- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # sharded: each rank's store folder is checked at fit start, once the module is sharded
        if stage == "fit" and sharding_kind(trainer.strategy) is None:
            self._gather_sharded_store(trainer)
            self.store.check()  # a damaged store fails here, not after every epoch has run
        super().setup(trainer, pl_module, stage)

    def _gather_sharded_store(self, trainer: pl.Trainer) -> None:
        """A store sharded fits wrote is laid out whole for this unsharded fit first (:func:`gather_store`):
        global rank 0 writes it; under DDP a failure there stops every rank instead of leaving them waiting."""
        on_rank_zero(trainer, lambda: gather_store(self.store), f"{self.store_dir}: laying the task store out for this fit")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self._sharded is not None:  # the base is in (or now written to) each rank's store folder
            if self.start_from == "merged":
                self._sharded.load_stored_merge()
            return
        store = self.store
        if not store.has_base() and trainer.is_global_zero:  # ranks hold the same weights; one writes
            store.save_base(self._base_state)
        if self.start_from == "merged" and store.names():
            self._load_stored_merge(store, pl_module)

    # ---- what TiesMerging asks ---------------------------------------------------------------
    def _task_sources(self, trainer: pl.Trainer, finetuned: dict[str, torch.Tensor], add_this_run: bool) -> dict[str, Any]:
        store = self.store
        if add_this_run and trainer.is_global_zero:
            store.add(self.task, finetuned, self._base_state, overwrite=True)
        tasks: dict[str, Any] = dict(self.tasks)
        for name in store.names():
            if name != self.task and name not in tasks:
                tasks[name] = store.source(name, self._base_state)
        tasks[self.task] = finetuned
        return tasks

    def _task_names(self) -> set[str]:
        return super()._task_names() | set(self.store.names())

    def _capture_base(self, pl_module: pl.LightningModule, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        store = self.store
        if store.has_base():
            return store.base_state()
        # on CPU: it is written to the store and subtracted from CPU copies there
        return super()._capture_base(pl_module, torch.device("cpu"))

    def _on_merged(self, trainer: pl.Trainer, result: SearchResult) -> None:
        if result.lam is not None and trainer.is_global_zero:
            self.store.record_choice(result.k, result.lam)

    def _load_stored_merge(self, store: TaskVectorStore, pl_module: pl.LightningModule) -> None:
        """Start this fit from the merge of the stored tasks, with the (k, lam) last chosen for them."""
        choice: Mapping[str, Any] = store.choice or {}
        k = choice.get("k") or self.ks[0] or PAPER_DEFAULT_K
        tasks = {name: store.source(name, self._base_state) for name in store.names()}
        merger = Merger(
            self._base_state, tasks, model=pl_module, heads=self.heads, method=self.method, k=k,
            method_params=self.method_params, include=self.include, exclude=self.exclude,
        )
        merger.params_method = None  # method_params serve every method (checked against them)
        merger.apply_merge(k, choice.get("lam"))

    def _record_base(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        return None  # the base lives in the store, which checks itself at setup

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "base": None}  # the base lives in the store


def _signature() -> inspect.Signature:
    """``ContinualTiesMerging``'s real arguments: ``TiesMerging``'s, with ``store`` and ``start_from`` after ``task``.

    Its ``__init__`` passes the others on as ``**kwargs``; this signature is what ``help()``,
    ``inspect.signature`` and IDEs show instead.
    """
    parent = list(inspect.signature(TiesMerging).parameters.values())
    own = list(inspect.signature(ContinualTiesMerging.__init__).parameters.values())[3:5]  # store, start_from
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parent[2:]]
    return inspect.Signature([*parent[:2], *own, *rest])


ContinualTiesMerging.__signature__ = _signature()  # type: ignore[attr-defined]

__all__ = ["ContinualTiesMerging"]
