"""Which strategies shard the module, found with ``isinstance`` (subclasses included), and where the shards are.

- ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in ``configure_model``, tensor_parallel_size=1):
  the LightningModule's own state dict holds DTensors;
- ``FSDPStrategy`` (FSDP1): the strategy's wrapper (``strategy.model``) gives the sharded state dict;
- ``DeepSpeedStrategy``: refused (see :data:`DEEPSPEED_REFUSAL`).

The merge itself is :class:`lightning_ties.distributed.fit.ShardedFitMerge` (no Lightning there); this
module only finds the strategy and calls it from :class:`~lightning_ties.pytorch.callback.TiesMerging`'s hooks
(:class:`~lightning_ties.pytorch.continual.ContinualTiesMerging` plugs in its own subclass of :class:`ShardedMerging`).
"""

from __future__ import annotations

import contextlib
import json
from functools import partial
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.heads import head_patterns
from ..core.inputs import MERGED_CHECKPOINT
from ..io.atomic import atomic_dir
from ..io.errors import CheckpointError
from ..core.keys import match_to_module
from ..core.merger import takes_task
from ..core.meta_init import is_on_meta
from ..core.auto import auto_search
from ..core.metrics import TaskMetrics
from ..core.options import SearchOptions, params_for
from ..core.recipe import fixed_choice
from ..core.resume import PROGRESS_FILE, read_progress, write_results
from ..core.search import PAPER_DEFAULT_K, SearchResult, walk_grid
from ..core.sharded_model import WrappedModelView
from ..distributed.fit import ShardedFitMerge, rows_fingerprint, save_full_safetensors
from ..distributed.merge import local_rows
from ..distributed.shard import is_fully_sharded, shard_blocks
from ..distributed.views import sharded_view
from ..evaluation.batches import move_to_device, predict_and_target
from ..merging import MergeOptions, get_method
from ..merging.plan import compile_patterns
from ._compat import pl, rank_zero_info
from .checkpoints import on_rank_zero, save_checkpoint_atomically, save_progress


#: Why DeepSpeed is refused: its ZeRO-3 partitions are flat slices of flattened parameter groups, and its
#: optimizer keeps fp32 master copies that the next step (or a checkpoint) writes back over the module; a merge
#: must update both, and DeepSpeed does not install on this CPU-only CI, so it could not be tested.
DEEPSPEED_REFUSAL = (
    "TiesMerging does not support DeepSpeedStrategy: ZeRO partitions (and the optimizer's fp32 master weights) "
    "would both have to be merged, which is not implemented. Train with ModelParallelStrategy (FSDP2, "
    "data_parallel_size=W, tensor_parallel_size=1), FSDPStrategy or DDP, or merge the saved checkpoints "
    "offline with lightning_ties.merge_to"
)


#: Why FSDP1 refuses a factory: it wraps after ``configure_model``, building each unit whole first (``param_init_fn``)
FSDP1_META_REFUSAL = (
    "model= a factory (built on the meta device) is not supported under FSDPStrategy (FSDP1): it would build the "
    "model whole on every rank before sharding it. Pass the model built (model=Net(cfg)), or use "
    "ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1) (FSDP2), where each rank fills only its rows"
)


def sharding_kind(strategy: Any) -> str | None:
    """``"fsdp2"``, ``"fsdp1"`` for the sharded strategies the merge supports, None for unsharded ones.

    Raises for DeepSpeed (any stage) with :data:`DEEPSPEED_REFUSAL`.
    """
    strategies = pl.strategies
    if isinstance(strategy, strategies.DeepSpeedStrategy):
        raise RuntimeError(DEEPSPEED_REFUSAL)
    if isinstance(strategy, strategies.ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, strategies.FSDPStrategy):
        return "fsdp1"
    return None


def refuse_sharded(trainer: pl.Trainer, who: str, shards_of: nn.Module | None = None) -> None:
    """``who`` (a module that merges whole tensors) refuses a strategy that shards the module, DeepSpeed included;
    given ``shards_of`` (the model it merges on each rank's shards of), ``ModelParallelStrategy`` and ``FSDPStrategy``
    are accepted, the latter only for a model already built (see :data:`FSDP1_META_REFUSAL`).

    Raised at the module's ``setup``, before the strategy splits the weights it would read whole.
    """
    strategies = pl.strategies
    merged_on = (strategies.ModelParallelStrategy, strategies.FSDPStrategy)
    if shards_of is not None and isinstance(trainer.strategy, merged_on):
        if isinstance(trainer.strategy, strategies.FSDPStrategy) and is_on_meta(shards_of):
            raise ValueError(f"{who}: {FSDP1_META_REFUSAL} ({type(trainer.strategy).__name__})")
        return
    if isinstance(trainer.strategy, (strategies.DeepSpeedStrategy, *merged_on)):
        supported = ("; it merges on each rank's shards under ModelParallelStrategy(data_parallel_size=W, "
                     "tensor_parallel_size=1) (FSDP2) and FSDPStrategy (FSDP1)") if shards_of is not None else ""
        raise ValueError(
            f"{who} does not support the sharded strategy {type(trainer.strategy).__name__}: it merges whole "
            f"tensors, which a sharded module does not hold{supported}. Run it on one device or under DDP "
            "(strategy='ddp'); to merge at the end of a sharded fit, use the TiesMerging callback (it merges each "
            "rank's shards)"
        )


class ShardsItsModel:
    """What a merge module (a LightningModule with a :class:`~lightning_ties.core.merger.Merger` as ``merger``,
    its ``model``, ``tasks_by_index``) adds to merge on shards under ``ModelParallelStrategy(data_parallel_size=W,
    tensor_parallel_size=1)``: its ``configure_model`` shards ``model`` with FSDP2, once, by ``shard_fn(model,
    mesh)`` when set, else :func:`~lightning_ties.distributed.shard.shard_blocks` (each block of every
    ``nn.ModuleList``, then the model); :meth:`merge_on_shards` then hands the merger this rank's view of it.
    A model built on the meta device (``model=`` a factory) is sharded without memory, then each rank fills
    its own rows from the base (:meth:`~lightning_ties.core.merger.Merger.materialize`): no rank builds it whole.
    Under ``FSDPStrategy`` (FSDP1) the strategy wraps the whole module, once: the merger gets this rank's view of
    ``model``'s entries in that wrapper (:class:`~lightning_ties.core.sharded_model.WrappedModelView`).
    Each rank holds its rows of the model, the base and tau_m, and reads its rows of every task (about 1/W of
    one process each); every task's head must have the model's shape (shards cannot change shape).
    """

    shard_fn: Callable[[nn.Module, Any], None] | None = None

    def configure_model(self) -> None:
        kind = sharding_kind(self.trainer.strategy)
        if kind == "fsdp2" and not is_fully_sharded(self.model):
            (self.shard_fn or shard_blocks)(self.model, self.device_mesh["data_parallel"])
        wrapped = getattr(self.merger.sharded, "view_of", None)
        if kind == "fsdp1" and isinstance(wrapped, WrappedModelView):  # FSDP1's wrapper of an earlier run, handed back:
            self.trainer.strategy.model = wrapped.wrapper  # wrapping again would shard the shards, break the old one
        # a model built on the meta device (model= a factory) gets its memory and the base's values here, on the
        # strategy's device: each rank's own rows once sharded, so no rank ever holds it whole
        self.merger.materialize(self.trainer.strategy.root_device)

    def searchable_on(self, trainer: pl.Trainer | None, options: SearchOptions) -> SearchOptions:
        """``options`` less the methods that need whole weights (RegMean) when ``trainer`` shards the model."""
        if trainer is None or sharding_kind(trainer.strategy) is None:
            return options
        return sharded_search_options(options, type(trainer.strategy).__name__, type(self).__name__)

    def set_up_for(self, trainer: pl.Trainer | None) -> bool:
        """Whether a merge now would run where ``trainer`` puts the model: not before the strategy shards it (FSDP2
        in ``configure_model``, FSDP1 in its setup, after) or fills it (built on meta); without a trainer, always."""
        if trainer is None or self.merger.sharded is not None:
            return True
        return sharding_kind(trainer.strategy) is None and not is_on_meta(self.model)

    def tau_ahead(self, trainer: pl.Trainer | None) -> Callable[[float | None], None]:
        """A search's ``before_k``: each k's tau_m computed ahead of its first candidate only once the model is
        set up (:meth:`set_up_for`); before that, the candidate's validation pass computes it where it runs."""

        def before_k(k: float | None) -> None:
            if self.set_up_for(trainer):
                self.merger.task_vector(k)

        return before_k

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # the task's head goes in here: FSDP1 runs validation_step in its forward, where shards cannot be written
        self.merger.use_task(self.tasks_by_index[dataloader_idx])

    def merge_on_shards(self) -> None:
        """Before a merge: once ``model`` is sharded, the merger merges on this rank's rows of it (collective)."""
        if self.merger.sharded is not None:
            return
        if is_fully_sharded(self.model):
            self.merger.use_shards(lambda: sharded_view(self.model))
        elif sharding_kind(self.trainer.strategy) == "fsdp1":  # the wrapper's keys name the model by its attribute
            prefix = next(f"{name}." for name, child in self.named_children() if child is self.model)
            self.merger.use_shards(WrappedModelView(self.trainer.strategy.model, prefix))


def sharded_module(trainer: pl.Trainer) -> nn.Module | None:
    """The module whose state dict holds the shards (after the strategy's setup), None when unsharded."""
    kind = sharding_kind(trainer.strategy)
    if kind == "fsdp1":
        return trainer.strategy.model
    if kind == "fsdp2":
        return trainer.lightning_module
    return None


def sharded_merging(callback: Any, trainer: pl.Trainer) -> ShardedMerging | None:
    """The sharded merge of ``callback`` under ``trainer``'s strategy, checked; None when the module is whole.

    Raises for DeepSpeed and for what the sharded merge refuses (see :meth:`ShardedMerging.check`).
    """
    if sharding_kind(trainer.strategy) is None:
        return None
    merging = getattr(callback, "sharded_merging_class", ShardedMerging)(callback)  # continual merging: its own
    merging.check(trainer)
    return merging


def sharded_search_options(options: SearchOptions, strategy: str, who: str = "TiesMerging") -> SearchOptions:
    """``options`` as a sharded merge can search them: ``method="auto"`` less the methods that need each task's
    data (RegMean, said in the log); methods that need data named by the user are refused.

    Example:
        >>> auto = sharded_search_options(SearchOptions.build("auto"), "ModelParallelStrategy")
        >>> "regmean" in auto.methods, auto.methods[0]
        (False, 'tsv')
    """
    needs_data = [m for m in options.methods if get_method(m).needs_data]
    if not needs_data:
        return options
    if not options.auto:
        raise ValueError(  # RegMean's Gram matrices (in x in per linear layer and task) would be whole on every rank
            f"method(s) {needs_data} need each task's data on whole weights, which no rank holds under {strategy}; "
            "choose a data-free method (ties, task_arithmetic, dare_ties, tsv...) or method='auto'"
        )
    rank_zero_info(f"{who}: method='auto' under {strategy} (sharded) searches the data-free methods only, "
                   f"without {needs_data} (they need each task's data on whole weights)")
    return options.without_data_methods()


class _Scorer:
    """Scores the module as it is on validation data, in a plain loop that every rank runs alike.

    Every rank must run the same number of forward passes (FSDP gathers shards inside each one):
    Lightning's own validation dataloaders hold a DistributedSampler (padded to equal lengths), and
    dataloaders given to the callback are read whole on every rank. torchmetrics sums its states
    over ranks in ``compute``, so every rank gets the same scores.
    """

    def __init__(self, module: pl.LightningModule, callback: Any, loaders: Mapping[str, Any]) -> None:
        self.module = module
        self.loaders = {task: list(v) if isinstance(v, (list, tuple)) else [v] for task, v in loaders.items()}
        self.forward_fn = callback.forward_fn
        self.metrics = TaskMetrics(list(loaders), callback.metrics)

    def score(self, tasks: Sequence[str] | None = None) -> Any:
        device = next(iter(self.module.state_dict().values())).device
        self.metrics.to(device)
        self.metrics.reset()
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                for task in tasks or list(self.loaders):
                    for loader in self.loaders[task]:
                        for batch in loader:
                            batch = move_to_device(batch, device)
                            if self.forward_fn is None:
                                preds, target = predict_and_target(self.module, batch)
                            elif takes_task(self.forward_fn):
                                preds, target = self.forward_fn(self.module, batch, task)
                            else:
                                preds, target = self.forward_fn(self.module, batch)
                            self.metrics.update(task, preds, target)
            return self.metrics.compute(list(tasks or self.loaders))
        finally:
            self.metrics.reset()
            self.module.train(was_training)


class ShardedMerging:
    """:class:`~lightning_ties.pytorch.callback.TiesMerging`'s setup / fit-start / fit-end work on a sharded module.

    Each rank keeps its own rows of the base (CPU) and of tau_m; the merge is the single-process merge,
    bit for bit (:mod:`lightning_ties.distributed`). Supported: a fixed (k, lam), the paper's recipe when
    a search has no validation data, a scored method/k/lam search (every rank scores the same candidate;
    tau_m is computed once per (method, k) and re-applied in place per lam), ``apply="merged"`` (with
    ``save_dir``: ``merged.ckpt``) and ``apply="keep"`` (``merged.safetensors`` gathered one tensor at a
    time by rank 0), ``method="auto"`` over the data-free methods, ``every_n_val_epochs`` (:meth:`score_inline`),
    heads as regexes or submodules. Resuming re-captures the base, checked against the checkpoint's fingerprint
    of it (:meth:`capture_base`); a search keeps its finished candidates in ``save_dir`` as one process does,
    and an interrupted one resumes from them (:meth:`_stored_progress`). Refused with a message: methods that
    need data (RegMean) named by the user.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.fit: Any = None
        #: the base fingerprint a restored checkpoint holds (checked once the base is captured)
        self._resumed_fingerprint: str | None = None
        #: the callback's search options, less the methods a sharded module cannot merge (set by :meth:`check`)
        self.options = callback.options
        #: the callback's heads as regexes of the module's keys (set by :meth:`check`)
        self.heads: list[str] = []

    def check(self, trainer: pl.Trainer) -> None:
        """Refuse at setup what the sharded merge does not do (before any training step)."""
        cb = self.callback
        name = type(trainer.strategy).__name__
        self.options = sharded_search_options(cb.options, name)
        # heads given as submodules become the regexes of their key prefixes now, before the strategy wraps or
        # shards the module (the names stay the state dict's: FSDP2 keeps them, FSDP1's state dicts clean them)
        self.heads = head_patterns(trainer.lightning_module, cb.heads)

    def capture_base(self, trainer: pl.Trainer) -> None:
        """At fit start: this rank's rows of the base (the module's shards, or ``base=``'s rows).

        A resumed fit captures them again: these strategies restore the checkpoint after ``on_fit_start``, so the
        module still holds the weights it was built with, and :meth:`check_resumed_base` proves they are the base
        the first fit captured.
        """
        cb = self.callback
        self.fit = ShardedFitMerge(sharded_module(trainer))
        base = match_to_module(cb.base, self.fit.keys, label="base") if cb.base is not None else None
        self.fit.capture_base(base)
        if cb._base_ref is None:
            cb._base_ref = cb._record_base(trainer)  # a base file is referenced; a captured one is not written
        self.check_resumed_base(self._resumed_fingerprint)

    @property
    def base_fingerprint(self) -> str | None:
        """The captured base's exact identity, the same on any number of ranks (what checkpoints keep)."""
        return self.fit.base_fingerprint if self.fit is not None else None

    def check_resumed_base(self, fingerprint: str | None) -> None:
        """A restored checkpoint's base fingerprint must be the captured base's: else the merge would start
        from other weights than the first fit's (a module built differently this time)."""
        self._resumed_fingerprint = fingerprint
        if fingerprint is None or self.base_fingerprint is None or fingerprint == self.base_fingerprint:
            return
        raise ValueError(
            "resuming: the module's weights at fit start are not the base the checkpoint's fit captured (their "
            f"fingerprints differ: {self.base_fingerprint} now, {fingerprint} then), so the merge would start from "
            "other weights. Build the module as the first fit did (the same pretrained weights), or pass "
            "TiesMerging(base=<the pretrained weights' file>)"
        )

    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Mapping[str, Any]) -> SearchResult:
        """At fit end (collective): merge on every rank's shards (a scored search when every task has
        validation data in ``loaders``, else a fixed k and lam), apply per ``apply``; the result to record."""
        cb = self.callback
        tasks = self.task_sources(trainer)
        if set(loaders) == set(tasks) | {cb.task}:
            merged, result = self._search(trainer, pl_module, tasks, loaders)
        else:
            k, lam, reason = fixed_choice(self.options, some_data=bool(loaders))
            result = SearchResult(method=self.options.methods[0], reason=f"{reason} (sharded over {type(trainer.strategy).__name__})",
                                  chosen=(k, lam))
            merged = self.fit.merge(tasks, cb.task, self._options(self.options.methods[0], k, lam),
                                    apply=cb.apply == "merged")
        self._finish(trainer, merged, result)
        return result

    def score_inline(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loaders: Mapping[str, Any]) -> Any:
        """``every_n_val_epochs``: the merge at the first k and the method's lam, scored on every rank alike,
        then this rank's fine-tuned rows written back (collective). None before the base is captured."""
        if self.fit is None or self.fit.base is None or not loaders:
            return None
        cb = self.callback
        method = self.options.methods[0]
        k = cb.ks[0] if cb.ks[0] is not None else PAPER_DEFAULT_K
        finetuned = self.fit.finetuned()
        try:
            self.fit.merge(self.task_sources(trainer, add_this_run=False), cb.task,
                           self._options(method, k, get_method(method).default_lam), finetuned=finetuned)
            return _Scorer(pl_module, cb, loaders).score()
        finally:
            self.fit.restore(finetuned)

    def task_sources(self, trainer: pl.Trainer, add_this_run: bool = True) -> dict[str, Any]:
        """The other tasks to merge with this run, name -> source with the module's keys (read per rows).

        ``add_this_run``: whether this run's weights are final (a continual store keeps them), or only scored."""
        keys = self.fit.keys
        return {name: match_to_module(value, keys, label=name) for name, value in self.callback.tasks.items()}

    def _options(self, method: str, k: float | None, lam: float | None) -> MergeOptions:
        cb = self.callback
        params = params_for(method, cb.method_params)  # k and scope are fields of MergeOptions (as Merger passes them)
        given_k, scope = params.pop("k", None), params.pop("scope", None)
        exclude = [*compile_patterns(cb.exclude, "exclude"), *self.heads]  # named heads stay each task's own
        return MergeOptions(method, k=given_k if k is None else k, lam=lam, scope=scope, params=params,
                            include=cb.include, exclude=exclude or None)

    def _search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tasks: Mapping[str, Any], loaders: Mapping[str, Any]
    ) -> tuple[Any, SearchResult]:
        """Every candidate scored on every rank alike (tau_m sharded, re-applied in place per lam); the best applied."""
        cb = self.callback
        options = self.options
        finetuned = self.fit.finetuned()  # this run's shards: the module holds candidates from now on
        scorer = _Scorer(pl_module, cb, loaders)
        result = self._stored_progress(trainer, tasks, finetuned)
        if options.normalize and set(result.reference) != {*tasks, cb.task}:
            result.reference = self._references(scorer, tasks, finetuned)
            self._save_progress(trainer, result)
        merged: dict[str, Any] = {}

        def prepare(method: str, k: float | None) -> None:  # tau_m once per (method, k), sharded
            if merged.get("at") != (method, k):
                merged["now"] = self.fit.merge(tasks, cb.task, self._options(method, k, None), finetuned=finetuned,
                                               apply=False)
                merged["at"] = (method, k)

        def evaluate(method: str, k: float | None, lam: float) -> Any:
            prepare(method, k)
            merged["now"].apply_(lam)
            return scorer.score()

        def saved(_: Any) -> None:
            self._save_progress(trainer, result)

        if options.auto:  # the budget's decisions are rank 0's, broadcast: every rank scores the same candidates
            auto_search(evaluate, options.auto_grids(), options.objective, options.mode, result, options.budget_s, saved)
        for method, (ks, lams) in ({} if options.auto else options.grids(cb.ks[0])).items():
            walk_grid(partial(evaluate, method), ks, lams, options.strategy, options.objective, options.mode, result,
                      saved, partial(prepare, method), method)
        result.method = result.best_method
        result.reason = "search" if options.searching else "fixed k and lam"
        best = self.fit.merge(tasks, cb.task, self._options(result.method, result.k, result.lam), finetuned=finetuned,
                              apply=cb.apply == "merged")
        if cb.apply == "keep":
            self.fit.restore(finetuned)
        return best, result

    def _stored_progress(self, trainer: pl.Trainer, tasks: Mapping[str, Any], finetuned: Mapping[str, Any]) -> SearchResult:
        """The search's progress in ``save_dir`` when it is this search's (the same options, tasks, step and
        fine-tuned weights: their exact fingerprint, the same on any number of ranks), else a new one.

        Global rank 0 reads the file and every rank gets its content (:func:`on_rank_zero`), so every rank
        resumes alike, or every rank raises when it is unreadable."""
        cb, options = self.callback, self.options
        objective = options.objective
        fingerprint = json.dumps({
            "sharded": True, "methods": list(options.methods), "mode": options.mode, "normalize": options.normalize,
            "objective": objective if isinstance(objective, str) else getattr(objective, "__qualname__", "callable"),
            "params": {k: repr(v) for k, v in sorted(cb.method_params.items())},
            "tasks": [[name, getattr(src, "label", name)] for name, src in tasks.items()] + [[cb.task, "this run"]],
            "step": trainer.global_step, "weights": rows_fingerprint(self.fit.view(), finetuned),
        }, sort_keys=True)
        path = Path(cb.output_dir) / PROGRESS_FILE

        def read() -> dict[str, Any] | None:
            try:
                progress = read_progress(cb.output_dir)
            except Exception as err:  # noqa: BLE001 - any damage: say which file, and what to do
                raise CheckpointError(f"{path}: the search progress is unreadable ({type(err).__name__}: {err}); "
                                      "remove it to start the search over") from err
            return progress.to_dict() if progress is not None else None

        stored = on_rank_zero(trainer, read, str(path))
        if stored is not None and stored.get("fingerprint") == fingerprint:
            result = SearchResult.from_dict(stored)
            rank_zero_info(f"TiesMerging: {len(result.candidates)} candidate(s) of this search resumed from {cb.output_dir}")
            return result
        return SearchResult(method=options.methods[0], methods=list(options.methods), fingerprint=fingerprint)

    def _save_progress(self, trainer: pl.Trainer, result: SearchResult) -> None:
        """Rank 0 writes the finished candidates to ``save_dir`` (atomically); a failed write stops every rank
        (:func:`~.checkpoints.save_progress`)."""
        save_progress(trainer, result, self.callback.output_dir, in_fit_loop=False)

    def _references(self, scorer: _Scorer, tasks: Mapping[str, Any], finetuned: dict[str, Any]) -> dict[str, Any]:
        """Each task's fine-tuned score on its own data: its rows written into the shards, scored, restored."""
        cb = self.callback
        view = self.fit.view()
        reference = {}
        for name in [*tasks, cb.task]:
            if name == cb.task:
                self.fit.restore(finetuned)
            else:
                rows = local_rows(view, tasks[name], name)  # a stored task's rows are this rank's already
                present = set(rows.keys())
                view.write_((key, rows.get(key)) for key, entry in view.entries.items()
                            if key in present and entry.spec.is_floating)
            reference[name] = scorer.score([name])[name]
        self.fit.restore(finetuned)
        return reference

    def _finish(self, trainer: pl.Trainer, merged: Any, result: SearchResult) -> None:
        cb = self.callback
        lam = result.lam
        if cb.save_dir is not None and trainer.is_global_zero:
            write_results(cb.save_dir, result)
        if cb.apply == "keep":  # the module keeps its fine-tuned shards; the merge is written, not applied
            save_full_safetensors(merged.view, Path(cb.save_dir) / "merged.safetensors", trainer.is_global_zero,
                                  lambda key: merged.piece(key, lam))
            return
        cb._merged_at_step = trainer.global_step
        if cb.save_dir is not None:
            save_merged_checkpoint(trainer, Path(cb.save_dir) / MERGED_CHECKPOINT)


def save_merged_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` (a DCP folder under sharded strategies; one file under FSDPStrategy with
    ``state_dict_type="full"``) into ``path``, atomically.

    Rank zero opens :func:`~lightning_ties.io.atomic.atomic_dir` (a private temporary folder with an
    unpredictable name, the manifest that makes the result ours, and the ownership check of an
    earlier ``path``) and shares its name; every rank writes its shards there; the swap waits for all.
    """
    if getattr(trainer.strategy, "_state_dict_type", None) == "full":  # FSDPStrategy's full state dict: one file
        save_checkpoint_atomically(trainer, path, weights_only=True)
        return
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(path)) if trainer.is_global_zero else None
        tmp = trainer.strategy.broadcast(str(tmp) if tmp is not None else None)
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier("ties_merged_checkpoint_written")
