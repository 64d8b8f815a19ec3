"""TiesMerging: a Trainer callback that merges this run's fine-tuned model with other tasks' models.

Life cycle (each hook short, like Lightning's WeightAveraging):

- ``setup("fit")``: refuse sharded strategies; check tasks, dataloaders, grids and the base's keys
  (every bad input fails here, before any training step).
- ``on_fit_start``: capture the base (the module's weights before any step), unless given or restored.
- ``on_validation_epoch_end``: every ``every_n_val_epochs``, swap in the merge (fixed k, lam), score
  it on every task, log ``merge/...``, swap the fine-tuned weights back.
- ``on_fit_end``: merge, search k/lam on the validation dataloaders (or use the paper's k=0.2,
  lam=1.0 when there are none), and leave the merged model in the module (``apply="merged"``) or
  write it to ``save_dir`` and keep the fine-tuned weights (``apply="keep"``).
- ``state_dict``/``load_state_dict``: the search progress, the result and a reference to the base
  (path + sha256 of the base file, or of ``save_dir/base.safetensors`` written once at fit start; the
  base's tensors only when there is no ``save_dir``) travel in checkpoints, under a ``state_key`` of
  method, task and grids so several instances coexist; a missing or changed base file fails at restore; after every candidate the progress is written to ``save_dir`` or, without one, into
  ``ModelCheckpoint(save_last=True)``'s ``last.ckpt``, so a search interrupted and resumed
  re-evaluates nothing it finished. ``on_save_checkpoint``: a checkpoint taken mid-merge (another
  callback, ``OnExceptionCheckpoint``) holds the fine-tuned weights, not the candidate being scored.

Continual merging over a task store (add this run's task vector, merge every stored task) is
:class:`~lightning_ties.lightning.continual.ContinualTiesMerging`, a subclass.

``merging.merge(trainer, pl_module)`` runs the fit-end merge on demand: after fit (e.g. from a
notebook) it applies like the fit-end merge; from another callback during fit, a plain loop
replaces the Trainer's validation loop and the fine-tuned weights are restored afterwards, so
training continues unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..io.card import sha256_file
from ..io.sinks import save_safetensors
from ._compat import Callback, TrainerFn, pl, rank_zero_info
from ..merging import as_source, get_method, plan_merge
from ..merging.plan import compile_patterns
from .metrics import MetricsArg, summarize
from .heads import load_into, named_head_keys
from .keys import match_to_module
from .module import ForwardFn, MultiTaskMergeModule, module_device
from .search import PAPER_DEFAULT_K, PAPER_DEFAULT_LAM, STRATEGIES, SearchResult, k_grid, lam_grid
from .sharded import ShardedMerging, sharding_kind

PROGRESS_FILE = "search_progress.json"
#: The captured base (module weights at fit start), written once under ``save_dir`` and referenced by checkpoints.
BASE_FILE = "base.safetensors"
#: The checkpoint written after an ``apply="merged"`` merge: the merged weights in ``state_dict``.
MERGED_CHECKPOINT = "merged.ckpt"


class _StoreIsDeprecated(type(Callback)):  # type: ignore[misc]
    """``TiesMerging(store=...)`` was continual merging before it had its own class: build that class.

    A metaclass, not ``__new__``: jsonargparse (LightningCLI) reads a class's arguments from
    ``__new__`` when it has one, and ``TiesMerging``'s are those of ``__init__``.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("store") is not None and not issubclass(cls, _continual_class()):
            warnings.warn(
                "TiesMerging(store=...) is deprecated: continual merging is "
                "lightning_ties.lightning.ContinualTiesMerging(store=..., start_from=...)",
                DeprecationWarning, stacklevel=2,
            )
            return _continual_class()(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class TiesMerging(Callback, metaclass=_StoreIsDeprecated):
    """Merge this run's fine-tuned model with other tasks' models at fit end (TIES by default).

    Args:
        tasks: other tasks, name -> fine-tuned model path (or module / state dict / source).
        task: the name of this run's task.
        base: the pretrained model (path or source); ``None`` captures the module at fit start.
        method: merge method of the registry, or a list of them to choose from on validation data
            (every method's candidates are scored; the best over all is applied, ties go to the
            method listed first).
        k: trim density, a list of them to search, or ``"search"`` (0.1, 0.2, 0.3); methods
            without k (task arithmetic, ``tsv``, ``iso_c``) ignore it.
        lam: a number, a list, or ``"search"``/``"paper"`` (each method's own paper grid: the
            subspace methods' 0.1..3.0, TIES's 0.8..2.5); a number or list applies to every method.
        val_dataloaders: other tasks' validation dataloaders, name -> dataloader; this run's own
            validation dataloaders evaluate ``task``.
        metrics: metric template or ``{task: metric}`` (default arg-max accuracy).
        heads: regexes naming per-task head keys (keys that differ across tasks are heads anyway);
            a regex that names no key of the module fails at ``setup``.
        objective: what the search maximises: ``"mean"`` (mean of the first metric over tasks),
            ``"normalized"`` (mean of merged / fine-tuned scores), ``"mean:<metric>"``,
            ``"normalized:<metric>"``, or (from Python) a callable of the scores.
        mode: ``"max"`` (higher objective is better) or ``"min"``.
        search_strategy: ``"grid"`` (every k x lam) or ``"coarse_to_fine"`` (every k at a coarse lam
            grid, then the lams around the best).
        normalize: also score each fine-tuned model on its own task (needed by ``"normalized"``).
        every_n_val_epochs: also score the merge every n validation epochs during fit.
        apply: ``"merged"`` (the module ends holding the merged model; with ``save_dir`` a
            ``merged.ckpt`` holding it is written there) or ``"keep"`` (keep the fine-tuned weights;
            the merged model is written to ``save_dir/merged.safetensors``).
        save_dir: where results (``search.json``, ``search.csv``), progress, the captured base
            (``base.safetensors``, referenced from checkpoints by path and sha256) and the merged
            model go. Without it, checkpoints carry the captured base themselves.
        strategy: deprecated name of ``search_strategy`` (it clashes with ``trainer.strategy`` in a
            LightningCLI config).
        method_params, include, exclude, forward_fn: as in :class:`MultiTaskMergeModule`.
        base_device: where the base captured at fit start (or read from ``base``) is kept until the
            merge: ``"cpu"`` (default: host memory, no GPU memory spent on a second copy of the model),
            any torch device (``"cuda:0"``), or ``"module"`` (the module's device at fit start).
            The merge itself runs on the Trainer's device (tau_m computed and kept there, lam applied
            in place in float32 and written in the module's dtype, so bf16/fp16 modules round once).

    Task and base sources are matched to the module's own ``state_dict`` keys (see
    :mod:`lightning_ties.lightning.keys`): a ``.ckpt`` of the same LightningModule as is, the inner
    model's ``save_pretrained`` folder or safetensors under its attribute (``model.``). Give
    ``{"path": ..., "prefix": "model."}`` (or ``"strip"``) as a task value to choose by hand.

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
        strategy: str | None = None,
    ) -> None:
        if strategy is not None:
            warnings.warn(
                "TiesMerging(strategy=...) is deprecated (it clashes with trainer.strategy in a LightningCLI config): "
                "use search_strategy=...", DeprecationWarning, stacklevel=3,
            )
            search_strategy = strategy  # type: ignore[assignment]
        _check_choice("search_strategy", search_strategy, STRATEGIES)
        _check_choice("mode", mode, ("max", "min"))
        _check_choice("apply", apply, ("merged", "keep"))
        _check_objective(objective, normalize)
        if heads is not None and not isinstance(heads, torch.nn.Module):
            _compile_heads(heads)  # a malformed regex fails here; one that names no key fails at setup
        self.tasks = dict(tasks or {})
        self.task = task
        if task in self.tasks:
            raise ValueError(f"task {task!r} is this run's task; it cannot also be in tasks ({sorted(self.tasks)})")
        self.methods = _check_methods(method)
        self.method = self.methods[0]  # the evaluator starts with it; a search ends on the chosen one
        self.has_k = any(get_method(m).has_k for m in self.methods)
        self.ks: list[float | None] = k_grid(k) if self.has_k else [None]
        #: each method's lam grid (``lam="paper"``: its own grid), checked here, before any training step
        self.lam_grids = {m: lam_grid(m, lam) for m in self.methods}
        self.lams = self.lam_grids[self.method]
        self._lam = lam
        self.val_dataloaders = dict(val_dataloaders or {})
        self._check_tasks_given()
        if apply not in ("merged", "keep"):
            raise ValueError(f"apply must be 'merged' or 'keep', got {apply!r}")
        if apply == "keep" and save_dir is None:
            raise ValueError("apply='keep' writes the merged model to save_dir; pass save_dir")
        if every_n_val_epochs is not None and every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be a positive integer, got {every_n_val_epochs}")
        self.base = base
        self.metrics, self.heads, self.objective, self.mode = metrics, heads, objective, mode
        self.search_strategy, self.normalize, self.every_n_val_epochs = search_strategy, normalize, every_n_val_epochs
        self.apply, self.save_dir = apply, save_dir
        self.method_params, self.include, self.exclude = dict(method_params or {}), include, exclude
        self.forward_fn = forward_fn
        if base_device != "module":
            try:  # a bad device name fails here, not at fit start
                torch.device(base_device)
            except (RuntimeError, TypeError):
                raise ValueError(f"base_device must be 'cpu', 'module' or a torch device such as 'cuda:0', got {base_device!r}") from None
        self.base_device = base_device
        self.result: SearchResult | None = None
        self._progress: SearchResult | None = None
        self._base_state: dict[str, torch.Tensor] | None = None
        #: {"path", "sha256"} of the file the base was read from or written to (what checkpoints hold instead of it).
        self._base_ref: dict[str, Any] | None = None
        #: The global step at which an ``apply="merged"`` merge was applied (a checkpoint restored from after it
        #: already holds the merged weights: the fit end of a resumed run must not merge them again).
        self._merged_at_step: int | None = None
        self._in_fit_loop = False
        self._merging: _MergeInProgress | None = None
        #: The merge on a sharded module (set at setup under ModelParallelStrategy / FSDPStrategy).
        self._sharded: ShardedMerging | None = None

    def _check_tasks_given(self) -> None:
        """Fail at construction when there is nothing to merge with or a dataloader names an unknown task."""
        if not self.tasks:
            raise ValueError(
                "nothing to merge with: give tasks={name: checkpoint} (or use ContinualTiesMerging with a store)"
            )
        _check_known(self.val_dataloaders, set(self.tasks) | {self.task})

    @property
    def searching(self) -> bool:
        return len(self.methods) > 1 or len(self.ks) > 1 or any(len(g) > 1 for g in self.lam_grids.values())

    @property
    def state_key(self) -> str:
        """Where a checkpoint keeps this instance's state: one key per (class, method, task, tasks, grids).

        As Lightning's stateful callbacks (``ModelCheckpoint``, ``EarlyStopping``) do, so several instances
        (TIES and task arithmetic side by side) coexist in one Trainer and each resumes its own state.
        """
        if len(self.methods) == 1:  # the key of single-method instances is unchanged: their checkpoints resume
            method: Any = self.method
            lams: Any = self.lams
        else:
            method, lams = list(self.methods), self.lam_grids
        return self._generate_state_key(
            method=method, task=self.task, tasks=sorted(self.tasks), k=self.ks, lam=lams, save_dir=self.save_dir,
        )

    # ---- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sharded = ShardedMerging(self) if sharding_kind(trainer.strategy) is not None else None
        if self._sharded is not None:
            self._sharded.check(trainer, _fit_has_val_data(trainer))
        self._check_siblings(trainer)
        self._check_data(trainer)
        self._check_sources(pl_module)
        if self.heads is not None:
            named_head_keys(pl_module, self.heads)  # a regex naming no key of the module fails now, not at fit end

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sharded is not None:  # each rank keeps its own rows of the base
            self._sharded.capture_base(trainer)
        elif self._base_state is None:
            self._base_state = self._capture_base(pl_module)
        if self._base_ref is None:
            self._base_ref = self._record_base(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit_loop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_fit_loop = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_val_epochs
        if n is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % n == 0:
            self._score_merge_inline(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge (the search runs Lightning's validation loop, which it can only do once the fit loop is done).

        Why not ``on_train_end``, as ``WeightAveraging`` swaps its average in there: the search validates
        every candidate with ``trainer.validate``, which must not run inside the fit loop (its teardown would
        end the fit's). ``ModelCheckpoint`` has written ``last.ckpt`` by then with the fine-tuned weights (the
        resume point of an interrupted search), so with ``apply="merged"`` the merged weights get their own
        checkpoint: ``save_dir/merged.ckpt`` (``LightningModule.load_from_checkpoint`` loads it alone), and
        any ``trainer.save_checkpoint`` after ``fit`` holds them too.
        """
        if self._merged_at_step is not None and self._merged_at_step == trainer.global_step:
            # restored from a checkpoint written after the merge: the module holds the merged weights already
            rank_zero_info(f"TiesMerging: the merge of step {trainer.global_step} is restored from the checkpoint")
            return
        self.merge(trainer, pl_module)

    # ---- merging ------------------------------------------------------------------------------
    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SearchResult:
        """Merge now: search (or fix) k and lam, apply per ``apply``; returns and keeps ``self.result``."""
        if self._sharded is not None:
            return self._sharded.merge(trainer, pl_module)
        if self._base_state is None:
            self._base_state = self._capture_base(pl_module)
        finetuned = _clone_state(pl_module)
        evaluator = self._evaluator(pl_module, finetuned, self._task_sources(trainer, finetuned, add_this_run=True))
        loaders = self._dataloaders(trainer)
        runner = None if self._in_fit_loop else trainer
        # While the module holds candidates, a checkpoint written by anyone (another callback, Lightning's
        # on-exception checkpoint) must carry the fine-tuned weights and the live progress: see on_save_checkpoint.
        self._merging = _MergeInProgress(pl_module, finetuned, evaluator)
        try:
            if set(loaders) != set(evaluator.tasks):
                result = self._without_scoring(evaluator, bool(loaders))
            else:
                evaluator.fingerprint_extra = {"step": trainer.global_step, "weights": _checksum(finetuned)}
                evaluator.search_result = self._resume_point(evaluator)
                result = evaluator.search(
                    runner, loaders, method=self.methods, k=self.ks if self.has_k else None,
                    lam=self.lams if len(self.methods) == 1 else self._lam, strategy=self.search_strategy, objective=self.objective,
                    mode=self.mode, normalize=self.normalize,
                    on_candidate=lambda _: self._save_progress(evaluator, trainer),
                )
                result.reason = "search" if self.searching else "fixed k and lam"
        except BaseException:
            # a failed merge leaves the fine-tuned weights, not a half-searched candidate: a checkpoint
            # written after this (Lightning's on-exception one) resumes the same search on the same weights
            load_into(pl_module, finetuned)
            raise
        finally:
            if runner is not None:
                _reconnect(trainer, pl_module)
            self._progress = self._live_progress()
            self._merging = None
        evaluator.use_task(self.task)
        self.result = result
        self._on_merged(trainer, result)
        self._log_choice(trainer, result)
        self._finish(trainer, pl_module, finetuned)
        return result

    def _on_merged(self, trainer: pl.Trainer, result: SearchResult) -> None:
        """Called once a merge is chosen and applied (continual merging records the choice)."""

    def _without_scoring(self, evaluator: MultiTaskMergeModule, some_data: bool) -> SearchResult:
        """Apply a fixed (k, lam): the paper's recipe when a search had no data, else the given values."""
        if self.searching:
            m = get_method(self.method)
            k = PAPER_DEFAULT_K if m.has_k else None
            lam = PAPER_DEFAULT_LAM if m.has_lam else m.default_lam
            reason = f"no validation data: paper recipe k={k}, lam={lam}"
        else:
            k, lam = self.ks[0], self.lams[0]
            why = "validation data for some tasks only" if some_data else "no validation data"
            reason = f"{why}: fixed k={k}, lam={lam}, not scored"
        rank_zero_info(f"TiesMerging: {reason}")
        evaluator.apply_merge(k, lam)
        return SearchResult(method=self.method, reason=reason, chosen=(k, lam))

    def _task_sources(self, trainer: pl.Trainer, finetuned: dict[str, torch.Tensor], add_this_run: bool) -> dict[str, Any]:
        """Every task to merge, name -> source: the other tasks and this run's fine-tuned weights."""
        return {**self.tasks, self.task: finetuned}

    def _evaluator(
        self, pl_module: pl.LightningModule, finetuned: dict[str, torch.Tensor], tasks: Mapping[str, Any]
    ) -> MultiTaskMergeModule:
        """The merge of ``tasks`` (this run's fine-tuned weights among them) on top of the captured base."""
        evaluator = MultiTaskMergeModule(
            self._base_state, dict(tasks), model=pl_module, heads=self.heads, metrics=self.metrics, method=self.method,
            k=self.ks[0] if self.ks[0] is not None else PAPER_DEFAULT_K, lam=None,
            method_params=self.method_params, include=self.include, exclude=self.exclude, forward_fn=self.forward_fn,
        )
        if pl_module._trainer is not None:  # after fit Lightning has moved the module to CPU: merge where it ran
            evaluator.merge_device = pl_module.trainer.strategy.root_device
        return evaluator

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, finetuned: dict[str, torch.Tensor]) -> None:
        if self.save_dir is not None and self.result is not None:
            os.makedirs(self.save_dir, exist_ok=True)
            self.result.to_json(Path(self.save_dir) / "search.json")
            self.result.to_csv(Path(self.save_dir) / "search.csv")
        if self.apply == "keep":
            if trainer.is_global_zero:  # every rank holds the same merge; one writes it
                _save_merged(pl_module, Path(self.save_dir) / "merged.safetensors")  # type: ignore[arg-type]
        if self.apply == "keep" or self._in_fit_loop:  # a merge asked for mid-fit must not change training
            load_into(pl_module, finetuned)
            return
        self._merged_at_step = trainer.global_step
        if self.save_dir is not None:
            _save_checkpoint_atomically(trainer, Path(self.save_dir) / MERGED_CHECKPOINT)

    def _score_merge_inline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score the merge with the first k and the method's lam, then restore the fine-tuned weights."""
        if self._base_state is None:
            return
        finetuned = _clone_state(pl_module)
        loaders = self._dataloaders(trainer)
        if not loaders:
            return
        evaluator = self._evaluator(pl_module, finetuned, self._task_sources(trainer, finetuned, add_this_run=False))
        try:
            evaluator.apply_merge(self.ks[0], None)
            scores = evaluator.validate(None, evaluator.check_dataloaders(loaders))
        finally:
            load_into(pl_module, finetuned)
        for name, value in summarize(scores).items():
            pl_module.log(name, value, add_dataloader_idx=False)

    # ---- inputs ---------------------------------------------------------------------------------
    def _dataloaders(self, trainer: pl.Trainer) -> dict[str, Any]:
        loaders = dict(self.val_dataloaders)
        own = trainer.val_dataloaders
        if own is not None and self.task not in loaders:
            loaders[self.task] = own
        return loaders

    def _check_data(self, trainer: pl.Trainer) -> None:
        names = self._task_names()
        _check_known(self.val_dataloaders, names)
        has_own = self.task in self.val_dataloaders or _fit_has_val_data(trainer)
        given = set(self.val_dataloaders) | ({self.task} if has_own else set())
        needs_data = [m for m in self.methods if get_method(m).needs_data]
        if needs_data and given != names:  # RegMean collects each task's Gram matrices on its data
            raise ValueError(
                f"method(s) {needs_data} need a validation dataloader for every task {sorted(names)} "
                f"(missing: {sorted(names - given)}); pass val_dataloaders, or choose a data-free method"
            )
        if given and given != names and self.searching:
            missing = sorted(names - given)
            raise ValueError(
                f"task(s) {missing} have no validation dataloader; pass val_dataloaders for every task "
                f"{sorted(names)} (this run's own val dataloaders evaluate {self.task!r}), or none at all "
                f"to use the paper's recipe k={PAPER_DEFAULT_K}, lam={PAPER_DEFAULT_LAM}"
            )
        if not given and self.searching:
            rank_zero_info(
                "TiesMerging: no validation data, so k/lam are not searched: the paper's recipe "
                f"k={PAPER_DEFAULT_K}, lam={PAPER_DEFAULT_LAM} will be used"
            )

    def _task_names(self) -> set[str]:
        """The names of every task the merge will hold."""
        return set(self.tasks) | {self.task}

    def _check_sources(self, pl_module: pl.LightningModule) -> None:
        """Open every source and plan the merge against the module's keys (specs only, no tensors)."""
        module_state = pl_module.state_dict()
        keys = list(module_state)
        base = match_to_module(self.base, keys, label="base") if self.base is not None else as_source(module_state, "module")
        sources = [match_to_module(v, keys, label=name, base=base) for name, v in self.tasks.items()]
        if sources:
            plan_merge(base, sources, self.include, self.exclude, warn=False)

    def _check_siblings(self, trainer: pl.Trainer) -> None:
        """Several instances in one Trainer: each merges the module as it is when its turn comes, so at most one
        may leave its merge in the module, and only the last (the others would merge a merge)."""
        mine = [c for c in trainer.callbacks if isinstance(c, TiesMerging)]
        merged = [i for i, c in enumerate(mine) if c.apply == "merged"]
        if len(mine) > 1 and merged and (len(merged) > 1 or merged[0] != len(mine) - 1):
            raise ValueError(
                f"{len(mine)} merging callbacks in one Trainer: at most one may use apply='merged' and it must come "
                "last in callbacks (the others would merge its merged weights); give the others apply='keep'"
            )

    def _capture_base(self, pl_module: pl.LightningModule, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The base's weights on ``device`` (default: per ``base_device``): ``base`` when given, the file a
        restored checkpoint references, else the module's."""
        if device is None:
            device = module_device(pl_module) if self.base_device == "module" else torch.device(self.base_device)
        base = self.base
        if base is None and self._base_ref is not None:
            base = self._base_ref["path"]  # checked against its sha256 when the checkpoint was restored
        if base is not None:
            src = match_to_module(base, list(pl_module.state_dict()), label="base")
            return {k: src.get(k).detach().to(device, copy=True) for k in src.keys()}
        return _clone_state(pl_module, device)

    def _record_base(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """What checkpoints keep instead of the base: ``{"path", "sha256"}`` of the base's file.

        A ``base`` given as a file is referenced as is; a captured base is written once to
        ``save_dir/base.safetensors`` (atomically). ``None`` when there is no file: a base given as a module
        or state dict is given again on resume, and a captured one without ``save_dir`` stays in the checkpoint.
        """
        if self.base is not None:
            path = self.base if isinstance(self.base, (str, os.PathLike)) else None
            if path is None or not Path(path).exists():
                return None
            path = Path(path).resolve()
            return {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None}
        if self.save_dir is None or self._base_state is None:
            return None
        path = (Path(self.save_dir) / BASE_FILE).resolve()
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors(self._base_state, path)
        trainer.strategy.barrier("ties_base_written")
        return {"path": str(path), "sha256": sha256_file(path)}

    # ---- progress and state ----------------------------------------------------------------------
    def _resume_point(self, evaluator: MultiTaskMergeModule) -> SearchResult | None:
        if self._progress is None and self.save_dir is not None:
            path = Path(self.save_dir) / PROGRESS_FILE
            if path.exists():
                self._progress = SearchResult.from_dict(json.loads(path.read_text()))
        return self._progress

    def _save_progress(self, evaluator: MultiTaskMergeModule, trainer: pl.Trainer) -> None:
        """Record the finished candidates: in ``save_dir`` when there is one, else in the Trainer's ``last.ckpt``."""
        self._progress = evaluator.search_result
        if self._progress is None:
            return
        if self.save_dir is not None:
            if trainer.is_global_zero:
                os.makedirs(self.save_dir, exist_ok=True)
                self._progress.to_json(Path(self.save_dir) / PROGRESS_FILE)
        elif not self._in_fit_loop:
            # without save_dir the checkpoint is the only record: ModelCheckpoint wrote last.ckpt before the
            # fit-end search started, so a crash now would resume with no candidate finished unless it is
            # rewritten (a merge asked for mid-fit leaves last.ckpt to ModelCheckpoint's own schedule)
            _resave_last_checkpoints(trainer)

    def _live_progress(self) -> SearchResult | None:
        """The search progress as of now: the running search's finished candidates and measured references."""
        running = self._merging.evaluator if self._merging is not None else None
        if running is None or running.search_result is None:
            return self._progress
        progress = SearchResult.from_dict(running.search_result.to_dict())
        # fine-tuned reference scores enter the result only once every task is measured; keep the finished ones
        progress.reference = {**running.reference, **progress.reference}
        return progress

    def _log_choice(self, trainer: pl.Trainer, result: SearchResult) -> None:
        values = {"merge/best/lam": float(result.lam)} if result.lam is not None else {}
        if result.k is not None:
            values["merge/best/k"] = float(result.k)
        if result.best is not None:
            values["merge/best/objective"] = float(result.best.objective)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        rank_zero_info(f"TiesMerging: {result.reason}; chose method={result.method}, k={result.k}, lam={result.lam}")

    def state_dict(self) -> dict[str, Any]:
        """Small, as ``WeightAveraging``'s: progress, the result and a reference to the base's file.

        The base's tensors travel only when nothing else records them (captured at fit start, no ``save_dir``).
        """
        progress = self._live_progress()
        keep_tensors = self._base_ref is None and self.base is None
        return {
            "base": self._base_state if keep_tensors else None,
            "base_ref": dict(self._base_ref) if self._base_ref is not None else None,
            "merged_at_step": self._merged_at_step,
            "progress": progress.to_dict() if progress is not None else None,
            "result": self.result.to_dict() if self.result is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore progress, result and base; a referenced base file that is gone or changed fails here,
        when ``Trainer.fit(ckpt_path=...)`` restores callbacks (before ``on_fit_start`` and any step)."""
        ref = state_dict.get("base_ref")
        if ref is not None:
            _check_base_file(ref)
            self._base_ref = dict(ref)
        if state_dict.get("base") is not None:
            self._base_state = dict(state_dict["base"])
        self._merged_at_step = state_dict.get("merged_at_step")
        if state_dict.get("progress"):
            self._progress = SearchResult.from_dict(state_dict["progress"])
        if state_dict.get("result"):
            self.result = SearchResult.from_dict(state_dict["result"])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mid-merge, write the fine-tuned module into the checkpoint, not the candidate being scored.

        The search's progress is only valid for the fine-tuned weights it started from (its fingerprint
        holds their checksum), so a checkpoint taken while the module holds a candidate (by another
        callback, ``trainer.save_checkpoint`` or Lightning's ``OnExceptionCheckpoint``) stores those, and
        the module's own keys and hyper-parameters even when the search's evaluator is attached.
        """
        merging = self._merging
        if merging is None:
            return
        checkpoint["state_dict"] = dict(merging.finetuned)
        module = merging.module
        if pl_module is not module:  # saved from inside the search's validation loop
            for key in (module.CHECKPOINT_HYPER_PARAMS_NAME, module.CHECKPOINT_HYPER_PARAMS_KEY,
                        module.CHECKPOINT_HYPER_PARAMS_TYPE):
                checkpoint.pop(key, None)
            if module.hparams:
                if getattr(module, "_hparams_name", None):
                    checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
                checkpoint[module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(module.hparams)


class _MergeInProgress(NamedTuple):
    """What a checkpoint written during a merge needs: the module, its fine-tuned weights, the running search."""

    module: pl.LightningModule
    finetuned: dict[str, torch.Tensor]
    evaluator: MultiTaskMergeModule


def _resave_last_checkpoints(trainer: pl.Trainer) -> None:
    """Rewrite every ``ModelCheckpoint(save_last=True)``'s last checkpoint with the current state, atomically.

    A kill during the write leaves the previous ``last.ckpt`` whole (the new one is written beside it and
    renamed over it). Symlinked last checkpoints (``save_last="link"``) point at other checkpoints and are
    left alone.
    """
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or ""
        if getattr(callback, "save_last", None) is not True or not path or os.path.islink(path):
            continue
        if "://" in str(path):  # remote storage: no rename; write in place as ModelCheckpoint itself does
            trainer.save_checkpoint(path)
            continue
        tmp = Path(path).with_name(f".{Path(path).name}.ties-progress.tmp")
        trainer.save_checkpoint(tmp)  # every rank calls it (a collective under DDP); rank zero writes
        if trainer.is_global_zero:
            os.replace(tmp, path)


def _save_checkpoint_atomically(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a file beside ``path``, renamed over it: a kill leaves no half checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(tmp)  # every rank calls it (a collective under DDP); rank zero writes
    if trainer.is_global_zero:
        os.replace(tmp, path)


def _check_base_file(ref: Mapping[str, Any]) -> None:
    """The base a checkpoint references must be the file it was: present, with the same sha256."""
    path = Path(ref["path"])
    if not path.exists():
        raise FileNotFoundError(
            f"the checkpoint's TiesMerging state references its base at {path}, which does not exist; restore "
            "that file (or resume with a fresh TiesMerging and no ckpt_path to start the merge over)"
        )
    expected = ref.get("sha256")
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"the base at {path} changed since the checkpoint was written (sha256 {actual[:12]}..., the "
                f"checkpoint recorded {expected[:12]}...); merging onto another base gives another model: restore "
                "the original file"
            )


def _check_methods(method: Any) -> list[str]:
    """``method`` (a name or a list of names) as a list, every name checked against the registry."""
    methods = [method] if isinstance(method, str) else list(method) if isinstance(method, Sequence) else None
    if not methods or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"method={method!r}: expected a registered method name or a non-empty list of them")
    for m in methods:
        get_method(m)  # an unknown name fails here, naming the registered methods
    return list(dict.fromkeys(methods))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_objective(objective: Any, normalize: bool) -> None:
    """``"mean"``, ``"normalized"``, ``"<either>:<metric>"`` or a callable; typos fail at construction."""
    if callable(objective):
        return
    kind, _, _ = str(objective).partition(":") if isinstance(objective, str) else ("", "", "")
    if kind not in ("mean", "normalized"):
        raise ValueError(
            f"objective must be 'mean', 'normalized', 'mean:<metric>', 'normalized:<metric>' or a callable, got {objective!r}"
        )
    if kind == "normalized" and not normalize:
        raise ValueError("objective 'normalized' needs the fine-tuned scores: leave normalize=True")


def _compile_heads(heads: Any) -> None:
    items = [heads] if isinstance(heads, str) else list(heads)
    patterns = [h for h in items if isinstance(h, str)]
    compile_patterns(patterns, "heads")


def _check_known(val_dataloaders: Mapping[str, Any], names: set[str]) -> None:
    unknown = sorted(set(val_dataloaders) - names)
    if unknown:
        raise ValueError(f"val_dataloaders given for unknown task(s) {unknown}; tasks are {sorted(names)}")


def _fit_has_val_data(trainer: pl.Trainer) -> bool:
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    try:
        return bool(source is not None and source.is_defined())
    except AttributeError:  # private Lightning API moved: fall back to the fit-end check
        return trainer.val_dataloaders is not None


def _checksum(state: Mapping[str, torch.Tensor]) -> str:
    """A cheap identity of the fine-tuned weights: cached scores are reused only for the same weights."""
    total = sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())
    return f"{total:.12e}"


def _clone_state(module: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A copy of the module's state on ``device`` (CPU by default: the copy costs no GPU memory)."""
    return {k: v.detach().to(device, copy=True) for k, v in module.state_dict().items()}


def _reconnect(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Give the fit back its module after evaluation ran ``trainer.validate`` on the evaluator."""
    if trainer.lightning_module is not pl_module:
        trainer.strategy.connect(pl_module)
        trainer.state.fn = TrainerFn.FITTING


def _save_merged(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(_clone_state(module), path)


def _continual_class() -> type[TiesMerging]:
    """:class:`ContinualTiesMerging`, which registers itself here when ``continual`` is imported
    (the layer's ``__init__`` imports it): ``callback`` does not import its own subclass."""
    if _CONTINUAL is None:
        raise RuntimeError("lightning_ties.lightning.continual is not imported; import ContinualTiesMerging from it")
    return _CONTINUAL


#: Set by :mod:`.continual` at import (see :func:`_continual_class`).
_CONTINUAL: type[TiesMerging] | None = None


__all__ = ["TiesMerging"]
