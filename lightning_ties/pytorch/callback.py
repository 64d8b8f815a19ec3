"""TiesMerging: a Trainer callback that merges this run's fine-tuned model with other tasks' models.

Life cycle (each hook short, like Lightning's WeightAveraging):

- ``setup("fit")``: check tasks, dataloaders, grids and the base's keys (every bad input fails here,
  before any training step). Sharded strategies are found with ``isinstance``: under
  ``ModelParallelStrategy``/``FSDPStrategy`` each rank merges its own shards (:mod:`.sharded`),
  DeepSpeed is refused.
- ``on_fit_start``: capture the base (the module's weights before any step), unless given or restored.
- ``on_validation_epoch_end``: every ``every_n_val_epochs``, swap in the merge (fixed k, lam), score
  it on every task, log ``merge/...``, swap the fine-tuned weights back.
- ``on_fit_end``: merge, search k/lam on the validation dataloaders (or use the paper's k=0.2,
  lam=1.0 when there are none), and leave the merged model in the module (``apply="merged"``) or
  write it to ``save_dir`` and keep the fine-tuned weights (``apply="keep"``).
- ``state_dict``/``load_state_dict``: the search progress, the result and a reference to the base
  (:mod:`lightning_ties.core.base_state`) travel in checkpoints, under a ``state_key`` of method,
  task and grids so several instances coexist; a missing or changed base or task file fails at
  restore; after every candidate the progress is written to ``save_dir`` (without one, to
  ``<default_root_dir>/ties_merging/<task>-<hash of state_key>``; only a remote root falls back to
  rewriting ``ModelCheckpoint(save_last=True)``'s ``last.ckpt``), so a search interrupted and
  resumed re-evaluates nothing it finished (:mod:`lightning_ties.core.resume`). A checkpoint taken
  mid-merge (another callback, ``OnExceptionCheckpoint``) holds the fine-tuned weights, not the
  candidate being scored.

Continual merging over a task store (add this run's task vector, merge every stored task) is
:class:`~lightning_ties.pytorch.continual.ContinualTiesMerging`, a subclass. The merge itself is
the Lightning-free :class:`~lightning_ties.core.merger.Merger` (through
:class:`~lightning_ties.pytorch.module.MultiTaskMergeModule` where the Trainer scores it).

``merging.merge(trainer, pl_module)`` runs the fit-end merge on demand: after fit (e.g. from a
notebook) it applies like the fit-end merge; from another callback during fit, a plain loop
replaces the Trainer's validation loop and the fine-tuned weights are restored afterwards, so
training continues unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..core.base_state import base_reference, capture_base, check_base_file, checksum, clone_state
from ..core.heads import copy_into, named_head_keys
from ..core.inputs import (MERGED_CHECKPOINT, check_arguments, check_datamodules, check_metric_tasks,
                           datamodule_loaders, default_save_dir, prepare_output_dir, source_fingerprints)
from ..core.keys import match_to_module
from ..core.matching import match_sources
from ..core.merger import ForwardFn, Merger, module_device
from ..core.metrics import MetricsArg, summarize
from ..core.options import SearchOptions
from ..core.recipe import check_fit_data, check_known_tasks, fixed_choice
from ..core.resume import read_progress, snapshot, write_results
from ..core.search import PAPER_DEFAULT_K, SearchResult
from ..io.provenance import check_fingerprints
from ..io.sinks import save_safetensors
from ..merging import as_source
from ..merging.grids import MAX_CANDIDATES
from ._compat import Callback, TrainerFn, pl, rank_zero_info
from .checkpoints import (fit_has_val_data, keep_finetuned_in_checkpoint, reconnect, save_checkpoint_atomically,
                          save_progress)
from .module import MultiTaskMergeModule
from .sharded import ShardedMerging, sharded_merging



class TiesMerging(Callback):
    """Merge this run's fine-tuned model with other tasks' models at fit end (TIES by default).

    Args:
        tasks: other tasks, name -> fine-tuned model path (or module / state dict / source).
        task: the name of this run's task.
        base: the pretrained model (path or source); ``None`` captures the module at fit start.
        method: a registry method, a list to choose from on validation data (ties go to the first), or
            ``"auto"``: every method coarse to fine within ``budget_s`` seconds (no data: TSV-M).
        k: trim density, a list to search, or ``"search"`` (0.1, 0.2, 0.3); ignored by methods without k.
        lam: a number, a list, or ``"search"``/``"paper"`` (each method's own paper grid).
        val_dataloaders: other tasks' validation dataloaders, name -> dataloader (this run's evaluate ``task``).
        metrics: metric template or ``{task: metric}`` (default arg-max accuracy).
        heads: regexes naming head keys besides those that differ across tasks (checked at ``setup``).
        objective: ``"mean"`` (of the first metric over tasks), ``"normalized"`` (mean of merged /
            fine-tuned), ``"mean:<metric>"``, ``"normalized:<metric>"``, or a callable of the scores.
        mode: ``"max"`` (higher objective is better) or ``"min"``.
        search_strategy: ``"grid"`` (every k x lam) or ``"coarse_to_fine"`` (coarse lams, then the lams around the best).
        normalize: also score each fine-tuned model on its own task (needed by ``"normalized"``).
        every_n_val_epochs: also score the merge every n validation epochs during fit.
        apply: ``"merged"`` (the module ends holding the merge; ``save_dir/merged.ckpt`` too) or ``"keep"``
            (the fine-tuned weights stay; the merge goes to ``save_dir/merged.safetensors``).
        save_dir: where results (``search.json``/``.csv``), progress, the captured base (``base.safetensors``) and
            the merge go; by default ``<default_root_dir>/ties_merging/<task>-<hash>`` (all but ``merged.ckpt``).
        method_params: each method gets the names it has; include, exclude, forward_fn: as in :class:`MultiTaskMergeModule`.
        base_device: where the base is kept until the merge: ``"cpu"`` (default: no GPU memory spent on a
            second copy), a torch device, or ``"module"``. The merge runs on the Trainer's device.
        max_candidates: larger search grids (method x k x lam) are refused; pass the grid's size to confirm.
        val_datamodules: name -> ``LightningDataModule`` (writable in YAML); its ``val_dataloader()`` is used.

    Example:
        >>> merging = TiesMerging(tasks={"a": "runs/a.safetensors"}, task="b", k=0.2, lam="search")
        >>> merging.lams[:3]
        [0.8, 0.9, 1.0]
    """

    def __init__(
        self,
        tasks: Mapping[str, Any] | None = None,
        task: str = "current",
        base: Any = None,
        method: str | Sequence[str] = "ties",
        k: float | Sequence[float] | str = 0.2,
        lam: float | Sequence[float] | str = 1.0,
        val_dataloaders: Mapping[str, Any] | None = None,
        metrics: MetricsArg = None,
        heads: str | Sequence[str] | None = None,
        objective: str | Callable[..., float] = "mean",
        mode: Literal["max", "min"] = "max",
        search_strategy: Literal["grid", "coarse_to_fine"] = "grid",
        normalize: bool = True,
        every_n_val_epochs: int | None = None,
        apply: Literal["merged", "keep"] = "merged",
        save_dir: str | None = None,
        method_params: Mapping[str, Any] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        forward_fn: ForwardFn | None = None,
        base_device: str = "cpu",
        max_candidates: int = MAX_CANDIDATES,
        val_datamodules: dict[str, Any] | None = None,
        budget_s: float | None = None,
    ) -> None:
        # the default k=0.2 is ignored, not refused, when no method trims
        self.options = SearchOptions.build(method, k, lam, objective, mode, search_strategy, normalize, strict_k=False,
                                           max_candidates=max_candidates, budget_s=budget_s)
        check_arguments(heads, apply, save_dir, every_n_val_epochs, base_device, self.options.methods, method_params)
        self.tasks, self.task = dict(tasks or {}), task
        if task in self.tasks:
            raise ValueError(f"task {task!r} is this run's task; it cannot also be in tasks ({sorted(self.tasks)})")
        self.methods = list(self.options.methods)
        self.method = self.methods[0]  # the evaluator starts with it; a search ends on the chosen one
        self.has_k = self.options.ks is not None
        self.ks: list[float | None] = list(self.options.ks) if self.options.ks is not None else [None]
        #: each method's lam grid (``lam="paper"``: its own grid), checked here, before any training step
        self.lam_grids = {m: list(g) for m, g in self.options.lams.items()}
        self.lams = self.lam_grids[self.method]
        self.val_dataloaders = dict(val_dataloaders or {})
        self.val_datamodules = check_datamodules(val_datamodules, self.val_dataloaders)
        self.base, self.metrics, self.heads = base, metrics, heads
        self._check_tasks_given()
        self.objective, self.mode, self.search_strategy, self.normalize = objective, mode, search_strategy, normalize
        self.every_n_val_epochs, self.apply, self.save_dir = every_n_val_epochs, apply, save_dir
        self.output_dir: str | Path | None = save_dir  #: ``save_dir``, else a folder under ``default_root_dir``
        self.method_params, self.include, self.exclude = dict(method_params or {}), include, exclude
        self.forward_fn, self.base_device = forward_fn, base_device
        self.result: SearchResult | None = None
        self._progress: SearchResult | None = None
        self._base_state: dict[str, torch.Tensor] | None = None
        self._base_ref: dict[str, Any] | None = None  # {"path", "sha256"}: what checkpoints hold instead of the base
        #: the given sources' fingerprints (base and tasks): a resume with a changed one is refused
        self._fingerprints: dict[str, Any] | None = None
        #: the step an ``apply="merged"`` merge was applied at (a checkpoint from after it holds the merge already)
        self._merged_at_step: int | None = None
        self._in_fit_loop = False
        self._merging: _MergeInProgress | None = None
        #: The merge on a sharded module (set at setup under ModelParallelStrategy / FSDPStrategy).
        self._sharded: ShardedMerging | None = None

    def _check_tasks_given(self) -> None:
        """Fail at construction when there is nothing to merge with or a dataloader names an unknown task."""
        if not self.tasks:
            raise ValueError("nothing to merge with: give tasks={name: checkpoint} (or ContinualTiesMerging with a store)")
        check_known_tasks({**self.val_dataloaders, **self.val_datamodules}, set(self.tasks) | {self.task})
        check_metric_tasks(self.metrics, set(self.tasks) | {self.task})

    @property
    def searching(self) -> bool:
        """Whether there is more than one candidate (method, k, lam) to choose from."""
        return self.options.searching

    @property
    def state_key(self) -> str:
        """One checkpoint key per (class, method, task, tasks, grids), as ``ModelCheckpoint``'s: instances coexist."""
        # the key of single-method instances is unchanged: their checkpoints resume
        single = len(self.methods) == 1
        method, lams = (self.method, self.lams) if single else (list(self.methods), self.lam_grids)
        return self._generate_state_key(method=method, task=self.task, tasks=sorted(self.tasks), k=self.ks, lam=lams,
                                        save_dir=self.save_dir)

    # ---- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse what a sharded strategy cannot merge and check every input (data, sources, heads) before any step."""
        if stage != "fit":
            return
        self._sharded = sharded_merging(self, trainer)  # None: the module is whole
        _check_siblings(trainer)
        self.output_dir = self.save_dir or default_save_dir(trainer.default_root_dir, self.task, self.state_key)
        prepare_output_dir(self.output_dir, self.apply, trainer.is_global_zero, self.base, self.tasks.values())
        self.val_dataloaders.update(datamodule_loaders(self.val_datamodules, trainer.local_rank, trainer.global_rank, trainer.strategy.barrier))
        self._check_data(trainer)
        self._check_sources(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sharded is not None:  # each rank keeps its own rows of the base
            self._sharded.capture_base(trainer)
        elif self._base_state is None:
            self._base_state = self._capture_base(pl_module)
        if self._base_ref is None:
            self._base_ref = self._record_base(trainer)
        if self._fingerprints is None:
            self._fingerprints = source_fingerprints(self.base, self.tasks)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit_loop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit_loop = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_val_epochs
        if n is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % n == 0:
            _score_merge_inline(self, trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge once the fit loop is done: the search validates candidates with ``trainer.validate``.

        ``last.ckpt`` holds the fine-tuned weights (the resume point of an interrupted search); with
        ``apply="merged"`` the merge gets its own ``save_dir/merged.ckpt`` (see ARCHITECTURE.md).
        """
        if self._merged_at_step is not None and self._merged_at_step == trainer.global_step:
            rank_zero_info(f"TiesMerging: the merge of step {trainer.global_step} is restored from the checkpoint")
            return
        self.merge(trainer, pl_module)

    # ---- merging ------------------------------------------------------------------------------
    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SearchResult:
        """Merge now: search (or fix) k and lam, apply per ``apply``; returns and keeps ``self.result``."""
        if self._sharded is not None:  # each rank merges its own shards
            self.result = self._sharded.merge(trainer, pl_module, self._dataloaders(trainer))
            log_choice(trainer, self.result)
            return self.result
        if self._base_state is None:
            self._base_state = self._capture_base(pl_module)
        finetuned = clone_state(pl_module)
        evaluator = self._evaluator(pl_module, self._task_sources(trainer, finetuned, add_this_run=True))
        runner = None if self._in_fit_loop else trainer
        # while the module holds candidates, any checkpoint carries the fine-tuned weights (on_save_checkpoint)
        self._merging = _MergeInProgress(pl_module, finetuned, evaluator)
        try:
            result = self._search(trainer, runner, evaluator, finetuned)
        except BaseException:
            # a failed merge leaves the fine-tuned weights: a later checkpoint resumes the same search on them
            copy_into(pl_module, finetuned)
            raise
        finally:
            if runner is not None:
                reconnect(trainer, pl_module)
            self._progress = self._live_progress()
            self._merging = None
        evaluator.use_task(self.task)
        self.result = result
        self._on_merged(trainer, result)
        log_choice(trainer, result)
        self._finish(trainer, pl_module, finetuned)
        return result

    def _search(
        self, trainer: pl.Trainer, runner: pl.Trainer | None, evaluator: MultiTaskMergeModule, finetuned: dict
    ) -> SearchResult:
        """Search on the validation data of every task; without it, apply a fixed (k, lam) unscored."""
        loaders = self._dataloaders(trainer)
        if set(loaders) != set(evaluator.tasks):
            k, lam, reason = fixed_choice(self.options, some_data=bool(loaders))
            rank_zero_info(f"TiesMerging: {reason}")
            evaluator.apply_merge(k, lam)
            return SearchResult(method=self.method, reason=reason, chosen=(k, lam))
        evaluator.fingerprint_extra = {"step": trainer.global_step, "weights": checksum(finetuned)}
        if self._progress is None:
            self._progress = read_progress(self.output_dir)
        evaluator.search_result = self._progress
        result = evaluator.search_with(
            runner, loaders, self.options, on_candidate=lambda _: self._save_progress(evaluator, trainer)
        )
        result.reason = "search" if self.searching else "fixed k and lam"
        return result

    def _on_merged(self, trainer: pl.Trainer, result: SearchResult) -> None:
        """Called once a merge is chosen and applied (continual merging records the choice)."""

    def _task_sources(self, trainer: pl.Trainer, finetuned: dict[str, torch.Tensor], add_this_run: bool) -> dict[str, Any]:
        """Every task to merge, name -> source: the other tasks and this run's fine-tuned weights."""
        return {**self.tasks, self.task: finetuned}

    def _merger_args(self, pl_module: pl.LightningModule, tasks: Mapping[str, Any]) -> dict[str, Any]:
        """The merge of ``tasks`` (this run's fine-tuned weights among them) on top of the captured base."""
        k = self.ks[0] if self.ks[0] is not None else PAPER_DEFAULT_K
        return dict(base=self._base_state, tasks=dict(tasks), model=pl_module, heads=self.heads, metrics=self.metrics,
                    method=self.method, k=k, method_params=self.method_params, include=self.include,
                    exclude=self.exclude, forward_fn=self.forward_fn)

    def _evaluator(self, pl_module: pl.LightningModule, tasks: Mapping[str, Any]) -> MultiTaskMergeModule:
        """The module the Trainer validates the candidates of (its ``Merger`` holds the merge)."""
        evaluator = MultiTaskMergeModule(**self._merger_args(pl_module, tasks))
        evaluator.merger.params_method = None  # method_params serve every method (checked against them)
        if pl_module._trainer is not None:  # after fit Lightning has moved the module to CPU: merge where it ran
            evaluator.merge_device = pl_module.trainer.strategy.root_device
        return evaluator

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, finetuned: dict[str, torch.Tensor]) -> None:
        if self.output_dir is not None and self.result is not None and trainer.is_global_zero:
            write_results(self.output_dir, self.result)
        if self.apply == "keep" and trainer.is_global_zero:  # every rank holds the same merge; one writes it
            save_safetensors(clone_state(pl_module), Path(self.save_dir) / "merged.safetensors")  # type: ignore[arg-type]
        if self.apply == "keep" or self._in_fit_loop:  # a merge asked for mid-fit must not change training
            copy_into(pl_module, finetuned)
            return
        self._merged_at_step = trainer.global_step
        if self.save_dir is not None:  # asked for: the default folder holds no second copy of the model
            # a merged model: weights and hyper-parameters, no optimizer state (still load_from_checkpoint-able)
            save_checkpoint_atomically(trainer, Path(self.save_dir) / MERGED_CHECKPOINT, weights_only=True)

    # ---- inputs ---------------------------------------------------------------------------------
    def _dataloaders(self, trainer: pl.Trainer) -> dict[str, Any]:
        loaders = dict(self.val_dataloaders)
        if trainer.val_dataloaders is not None:  # the fit's own validation data is this run's task's
            loaders.setdefault(self.task, trainer.val_dataloaders)
        return loaders

    def _check_data(self, trainer: pl.Trainer) -> None:
        names = self._task_names()
        check_known_tasks(self.val_dataloaders, names)
        check_metric_tasks(self.metrics, names)
        has_own = self.task in self.val_dataloaders or fit_has_val_data(trainer)
        given = set(self.val_dataloaders) | ({self.task} if has_own else set())
        note = check_fit_data(getattr(self._sharded, "options", self.options), names, given, self.task)  # sharded: less RegMean
        if note:
            rank_zero_info(f"TiesMerging: {note}")

    def _task_names(self) -> set[str]:
        """The names of every task the merge will hold."""
        return set(self.tasks) | {self.task}

    def _check_sources(self, pl_module: pl.LightningModule) -> None:
        """Open every source and plan the merge against the module's keys (specs only, no tensors)."""
        if not self.tasks:  # continual merging's first run: only the store's tasks, known at fit end
            named_head_keys(pl_module, self.heads)  # a regex naming no key of the module fails now
            return
        match_sources(pl_module, _base_source(self.base, pl_module), self.tasks, self.heads, self.include,
                      self.exclude)

    def _capture_base(self, pl_module: pl.LightningModule, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The base on ``device`` (default: per ``base_device``): ``base``, the file a checkpoint references, or the module."""
        if device is None:
            device = module_device(pl_module) if self.base_device == "module" else torch.device(self.base_device)
        base = self.base
        if base is None and self._base_ref is not None:
            base = self._base_ref["path"]  # checked against its sha256 when the checkpoint was restored
        return capture_base(base, pl_module, device)

    def _record_base(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """What checkpoints keep instead of the base (see :func:`~lightning_ties.core.base_state.base_reference`)."""
        return base_reference(self.base, self.output_dir, self._base_state, trainer.is_global_zero,
                              trainer.strategy.barrier)

    # ---- progress and state ----------------------------------------------------------------------
    def _save_progress(self, evaluator: MultiTaskMergeModule, trainer: pl.Trainer) -> None:
        """Record the finished candidates (:func:`~.checkpoints.save_progress`)."""
        self._progress = evaluator.search_result
        if self._progress is not None:
            save_progress(trainer, self._progress, self.output_dir, self._in_fit_loop)

    def _live_progress(self) -> SearchResult | None:
        """The search progress as of now: the running search's finished candidates and measured references."""
        running = self._merging.evaluator if self._merging is not None else None
        if running is None:
            return self._progress
        return snapshot(running.search_result, running.reference, self._progress)

    def state_dict(self) -> dict[str, Any]:
        """Small, as ``WeightAveraging``'s: progress, result, the base's file (its tensors only when no file holds it)."""
        progress = self._live_progress()
        return {
            "base": self._base_state if self._base_ref is None and self.base is None else None,  # no file holds it
            "base_ref": dict(self._base_ref) if self._base_ref is not None else None,
            "base_fingerprint": self._sharded.base_fingerprint if self._sharded is not None else None,
            "sources": self._fingerprints,
            "merged_at_step": self._merged_at_step,
            "progress": progress.to_dict() if progress is not None else None,
            "result": self.result.to_dict() if self.result is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore progress, result and base; a referenced base file that is gone or changed fails here, before any step."""
        ref = state_dict.get("base_ref")
        if ref is not None:
            check_base_file(ref)
            self._base_ref = dict(ref)
        if state_dict.get("sources") is not None:  # a changed task would reuse candidates scored on its old weights
            self._fingerprints = source_fingerprints(self.base, self.tasks)
            check_fingerprints(state_dict["sources"], self._fingerprints, "the checkpoint's TiesMerging search")
        if state_dict.get("base") is not None:
            self._base_state = dict(state_dict["base"])
        if self._sharded is not None:  # the base was captured again at fit start (restored after it): the same?
            self._sharded.check_resumed_base(state_dict.get("base_fingerprint"))
        self._merged_at_step = state_dict.get("merged_at_step")
        if state_dict.get("progress"):
            self._progress = SearchResult.from_dict(state_dict["progress"])
        if state_dict.get("result"):
            self.result = SearchResult.from_dict(state_dict["result"])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mid-merge, a checkpoint (another callback's, ``OnExceptionCheckpoint``'s) holds the fine-tuned module.

        The search's progress is valid only for the weights it started from (its fingerprint holds their checksum).
        """
        if self._merging is not None:
            keep_finetuned_in_checkpoint(checkpoint, self._merging.finetuned, self._merging.module, pl_module)


class _MergeInProgress(NamedTuple):
    """What a checkpoint written during a merge needs: the module, its fine-tuned weights, the running search."""

    module: pl.LightningModule
    finetuned: dict[str, torch.Tensor]
    evaluator: MultiTaskMergeModule


def _score_merge_inline(callback: TiesMerging, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """``every_n_val_epochs``: score the merge (first k, the method's lam) in a plain loop, then restore the weights."""
    loaders = callback._dataloaders(trainer)
    if callback._sharded is not None:  # each rank merges and restores its own shards
        scores = callback._sharded.score_inline(trainer, pl_module, loaders)
        if scores is None:
            return
    else:
        if callback._base_state is None or not loaders:
            return
        finetuned = clone_state(pl_module)
        tasks = callback._task_sources(trainer, finetuned, add_this_run=False)
        merger = Merger(**callback._merger_args(pl_module, tasks))
        merger.merge_device, merger.params_method = trainer.strategy.root_device, None
        try:
            merger.apply_merge(callback.ks[0], None)
            scores = merger.score(merger.check_dataloaders(loaders))
        finally:
            copy_into(pl_module, finetuned)
    for name, value in summarize(scores).items():
        pl_module.log(name, value, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")  # same on every rank


def log_choice(trainer: pl.Trainer, result: SearchResult) -> None:
    """Log the chosen (k, lam) and its objective to the Trainer's loggers, and say what was chosen."""
    values = {"merge/best/lam": float(result.lam)} if result.lam is not None else {}
    if result.k is not None:
        values["merge/best/k"] = float(result.k)
    if result.best is not None:
        values["merge/best/objective"] = float(result.best.objective)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
    rank_zero_info(f"TiesMerging: {result.reason}; chose method={result.method}, k={result.k}, lam={result.lam}")


def _base_source(base: Any, module: pl.LightningModule) -> Any:
    """The base as a source under the module's keys: ``base`` when given, else the module's own weights."""
    if base is None:
        return as_source(module.state_dict(), "module")
    return match_to_module(base, list(module.state_dict()), label="base")


def _check_siblings(trainer: pl.Trainer) -> None:
    """Several instances in one Trainer: each merges the module as it is when its turn comes, so at most one
    may leave its merge in the module, and only the last (the others would merge a merge)."""
    mine = [c for c in trainer.callbacks if isinstance(c, TiesMerging)]
    merged = [i for i, c in enumerate(mine) if c.apply == "merged"]
    if len(mine) > 1 and merged and (len(merged) > 1 or merged[0] != len(mine) - 1):
        raise ValueError(
            f"{len(mine)} merging callbacks in one Trainer: at most one may use apply='merged' and it must come "
            "last in callbacks (the others would merge its merged weights); give the others apply='keep'"
        )


__all__ = ["MERGED_CHECKPOINT", "TiesMerging"]
