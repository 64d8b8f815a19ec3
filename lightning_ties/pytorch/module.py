"""MultiTaskMergeModule: a merged multitask model evaluated through Lightning's validation loop.

Entry points (also what the CLI calls; no user-written LightningModule needed)::

    module = MultiTaskMergeModule(
        base,                      # nn.Module, state dict, path or TensorSource (theta_init)
        tasks={"a": src_a, ...},   # name -> fine-tuned model (module, state dict, path, source)
        model=None,                # the architecture to run (default: ``base`` when it is a module), or a
                                   # factory (lambda: Net(cfg)): built on the meta device, filled from base
        heads=None,                # regexes naming per-task head keys; keys that differ are heads anyway
        metrics=None,              # Metric / MetricCollection template, or {task: metric}; default accuracy
        method="ties", k=0.2, lam=None, method_params=None, include=None, exclude=None,
        forward_fn=None,           # (model, batch, task) -> (preds, target); default handles (x, y) and dicts
        shard_fn=None,             # ModelParallelStrategy: (model, mesh) -> None shards it (default: block by block)
    )
    scores = module.evaluate(trainer, dataloaders={"a": dl_a, ...}, k=0.2, lam=1.0)   # -> {task: {metric: v}}
    result = module.search(trainer, dataloaders={...}, method=None, k=None, lam="paper",
                           strategy="grid", objective="mean", mode="max", normalize=True) # -> SearchResult
    module.apply_merge(k, lam)      # write base + lam * tau_m(k) into ``model`` in place
    module.use_task("a")            # put task a's head in place (per-task heads)
    module.measure_finetuned(trainer, dataloaders)  # each task's own score, cached in ``reference``

``trainer.validate(module, dataloaders={"a": dl_a, ...})`` also works directly: the dict's keys name
the tasks, and the module's default merge (k, lam) is applied first if none is in place. The scores are
then ``module.last_scores`` (and ``trainer.callback_metrics``): the module sends them to the loggers
itself, at steps of its own, so the list ``trainer.validate`` returns holds empty dicts.

Sharded: under ``ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1)`` the module shards
``model`` with FSDP2 in ``configure_model``, under ``FSDPStrategy`` (FSDP1) the strategy wraps it; either way
every merge runs on each rank's rows (bit for bit the one-process merge; see :class:`~.sharded.ShardsItsModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.heads import HeadsArg
from ..core.merger import Dataloaders, ForwardFn, Merger
from ..core.metrics import MetricsArg, Scores, summarize
from ..core.options import SearchOptions
from ..core.progress import SearchProgress
from ..core.search import Candidate, SearchResult
from ..merging import MergedTaskVector
from ..merging.grids import MAX_CANDIDATES
from ._compat import pl, rank_zero_info
from .sharded import ShardsItsModel, refuse_sharded


def _merger_state(name: str, doc: str, settable: bool = False) -> property:
    """A property of the module that reads (and writes) the :class:`Merger`'s attribute ``name``."""

    def get(self: MultiTaskMergeModule) -> Any:
        return getattr(self.merger, name)

    def set_(self: MultiTaskMergeModule, value: Any) -> None:
        setattr(self.merger, name, value)

    return property(get, set_ if settable else None, doc=doc)


class MultiTaskMergeModule(ShardsItsModel, pl.LightningModule):
    """Merge task checkpoints into one model and score it per task in Lightning's validation loop.

    Shared-output models (one output serves every task) are evaluated as they are. Per-task
    heads (keys whose shape or presence differs across tasks, or keys matching ``heads``) are
    never merged: each task is evaluated with its own head, swapped in before its dataloader.

    The merge itself is the Lightning-free :class:`~lightning_ties.core.merger.Merger`
    (:attr:`merger`), whose arguments these are; this class adds what the Trainer calls (the
    validation hooks, logging, checkpoints) and the ``evaluate``/``search`` entry points.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> base = nn.Linear(2, 2)
        >>> fts = {t: {k: v + 0.1 for k, v in base.state_dict().items()} for t in ("a", "b")}
        >>> module = MultiTaskMergeModule(base, fts, k=1.0)
        >>> module.apply_merge(k=1.0, lam=1.0)
        >>> module.tasks
        ['a', 'b']
    """

    def __init__(
        self,
        base: Any,
        tasks: Mapping[str, Any],
        model: nn.Module | Callable[[], nn.Module] | None = None,
        heads: HeadsArg = None,
        metrics: MetricsArg = None,
        method: str = "ties",
        k: float = 0.2,
        lam: float | None = None,
        method_params: Mapping[str, Any] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        forward_fn: ForwardFn | None = None,
        shard_fn: Callable[[nn.Module, Any], None] | None = None,
    ) -> None:
        super().__init__()
        #: the merge itself (Lightning-free): sources, plan, heads, tau_m cache, search loop
        self.merger = Merger(base, tasks, model, heads, metrics, method, k, lam, method_params, include, exclude,
                             forward_fn)
        self.model = self.merger.model  # submodules of this module: the Trainer moves them and logs them
        self.task_metrics = self.merger.metrics
        #: what the next validation run writes into ``model`` first (a merge, a task's weights)
        self._pending: Callable[[], None] | None = None
        self.last_scores: Scores = {}
        self.tasks_by_index: list[str] = list(self.tasks)
        #: where validation passes are logged: ``<log_prefix>/<task>/<metric>``, ``<log_prefix>/mean/<metric>``,
        #: ``<log_prefix>/k``, ``<log_prefix>/lam`` (``evaluate``/``search`` take their own ``log_prefix``)
        self.log_prefix = "merge"
        self._unlogged = False  # passes whose scores are not logged here (see _passes_unlogged)
        self._log_steps: dict[str, int] = {}  # next logger step of each prefix: one step per pass
        self._candidate_step: int | None = None  # a search logs candidate i at step i
        self.shard_fn = shard_fn  # see ShardsItsModel

    tasks = _merger_state("tasks", "The task names, in order.")
    method = _merger_state("method", "The merge method applied (a search ends on the chosen one).", settable=True)
    k = _merger_state("k", "The default k.")
    lam = _merger_state("lam", "The default lam (``None``: the method's).")
    method_params = _merger_state("method_params", "The method's other parameters.", settable=True)
    forward_fn = _merger_state("forward_fn", "``(model, batch, task) -> (preds, target)`` or ``None``.")
    plan = _merger_state("plan", "The merge plan (merged and skipped keys).")
    head_keys = _merger_state("head_keys", "The per-task head keys (named and detected).")
    head_store = _merger_state("head_store", "Each task's head, read on first use.")
    current = _merger_state("current", "The (k, lam) in ``model`` now, or ``None``.", settable=True)
    reference = _merger_state("reference", "Each task's fine-tuned score (measured once).", settable=True)
    search_result = _merger_state("search_result", "The last search (resumed when it matches).", settable=True)
    data_loaders = _merger_state("data_loaders", "The last ``{task: [dataloader]}`` scored.", settable=True)
    merge_device = _merger_state("merge_device", "Where tau_m is computed and kept.", settable=True)
    fingerprint_extra = _merger_state("fingerprint_extra", "Extra facts a stored search depends on.", settable=True)

    # ---- merging (the Merger's) ----------------------------------------------------------------
    searches_k = _merger_state("searches_k", "Whether the current method has a trim density k.")
    compute_device = _merger_state("compute_device", "Where tau_m is computed and kept (``merge_device`` or the model's).")

    def task_vector(self, k: float | None = None) -> MergedTaskVector:
        """tau_m of the current method for ``k`` (computed once per (method, k) and cached)."""
        return self.merger.task_vector(k)

    def apply_merge(self, k: float | None = None, lam: float | None = None) -> None:
        """Write theta = base + lam * tau_m(k) into ``model`` in place (see :meth:`Merger.apply_merge`)."""
        self.merger.apply_merge(k, lam)

    def load_task(self, task: str) -> None:
        """Put task ``task``'s own fine-tuned weights (merged keys and head) into ``model``."""
        self.merger.load_task(task)

    def use_task(self, task: str) -> None:
        """Swap ``task``'s head into ``model`` (no-op for shared-output models)."""
        self.merger.use_task(task)

    def fingerprint(
        self, objective: Any = "mean", mode: str = "max", normalize: bool = True, methods: Sequence[str] | None = None
    ) -> str:
        """What candidate scores depend on; a stored search is reused only when this matches."""
        return self.merger.fingerprint(objective, mode, normalize, methods)

    def check_dataloaders(self, dataloaders: Dataloaders, require_all: bool = True) -> dict[str, list[Any]]:
        """Validate a ``{task: dataloader or list of dataloaders}`` mapping before any work."""
        return self.merger.check_dataloaders(dataloaders, require_all)

    # ---- the validation loop -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def predict_and_target(self, batch: Any, task: str | None = None) -> tuple[torch.Tensor, Any]:
        """Model predictions and targets of one batch of ``task`` (``forward_fn`` or the batch convention)."""
        return self.merger.predict_and_target(batch, task)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.merger.update_metrics(self.tasks_by_index[dataloader_idx], batch)

    def write_then_validate(
        self, trainer: pl.Trainer | None, loaders: Mapping[str, list[Any]], write: Callable[[], None]
    ) -> Scores:
        """``write()`` the weights to score (a merge, a task's own), then one validation pass. With a trainer, it runs
        in ``on_validation_start``, after ``configure_model`` (sharded, filled) and on the model's device."""
        if trainer is None:
            write()
        else:
            self.merge_device = trainer.strategy.root_device
            self._pending = write
        try:
            return self.validate(trainer, loaders)
        finally:
            self._pending = None

    def setup(self, stage: str) -> None:
        refuse_sharded(self.trainer, "MultiTaskMergeModule", shards_of=self.model)

    def on_validation_start(self) -> None:
        self.merge_on_shards()
        # ``trainer.validate(module, dataloaders={"a": dl_a, ...})`` names the tasks by the dict's keys
        loaders = self.trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            routed = self.check_dataloaders(loaders, require_all=False)
            self.tasks_by_index = [t for t in loaders if t in routed for _ in routed[t]]
        if self._pending is not None:
            write, self._pending = self._pending, None
            write()
        elif self.current is None and not self._unlogged:
            self.apply_merge()  # a direct ``trainer.validate`` scores the default merge

    def on_validation_epoch_start(self) -> None:
        self.task_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.last_scores = self.task_metrics.compute(dict.fromkeys(self.tasks_by_index))
        self.task_metrics.reset()
        if self._unlogged:
            return
        values = pass_values(self.last_scores, self.reference, self.current, self.log_prefix)
        for name, value in self.log_values(self.trainer, values, self.log_prefix, self._candidate_step).items():
            # callback_metrics only (monitors, callbacks; the loggers got them above): the same on every rank
            self.log(name, value, add_dataloader_idx=False, logger=False, sync_dist=True, reduce_fx="max")

    def log_values(
        self, trainer: pl.Trainer | None, values: Mapping[str, float], prefix: str, step: int | None = None
    ) -> dict[str, float]:
        """Send ``values`` to the trainer's loggers as clean Python floats at one step of their own.

        ``self.log`` would log float32 tensors (k=0.3 as 0.30000001192...) at the global step, which ``validate``
        never advances; each pass under ``prefix`` gets the next step instead (a search: the candidate's index).
        """
        clean = {name: clean_number(v) for name, v in values.items()}
        if step is None:
            step = self._log_steps.get(prefix, 0)
        self._log_steps[prefix] = max(self._log_steps.get(prefix, 0), step + 1)
        for logger in trainer.loggers if trainer is not None else []:
            logger.log_metrics(clean, step=step)
            logger.save()
        return clean

    # ---- evaluation entry points ---------------------------------------------------------------
    def validate(self, trainer: pl.Trainer | None, loaders: Mapping[str, list[Any]]) -> Scores:
        """One validation pass over ``loaders`` with the weights in place; returns the per-task scores. With a trainer,
        Lightning's validation loop runs it (loggers, progress, DDP); with ``None``, a plain loop (inside a running fit)."""
        self.tasks_by_index = [t for t, ls in loaders.items() for _ in ls]
        if trainer is None:
            self.last_scores = self.merger.score(loaders)
            return self.last_scores
        self.last_scores = {}
        trainer.validate(self, dataloaders=[dl for ls in loaders.values() for dl in ls], verbose=False)
        if self._pending is not None:  # Lightning skipped the loop: nothing was written, nothing scored
            raise RuntimeError(_no_batches(trainer, loaders))
        return self.last_scores

    def measure_finetuned(
        self, trainer: pl.Trainer | None, dataloaders: Dataloaders, log_prefix: str | None = None
    ) -> Scores:
        """Each task's own fine-tuned score on its dataloaders (measured once per task, cached).

        The new scores are logged once, all tasks and their mean in one step, under ``finetuned``
        (``log_prefix="merge/val"`` -> ``finetuned/val``: the split of the merge they are compared with).
        """
        loaders = self.check_dataloaders(dataloaders, require_all=False)
        measured: Scores = {}
        with _passes_unlogged(self):  # logged below, every task's reference in one step with their mean
            for task, dls in loaders.items():
                if task not in self.reference:
                    scores = self.write_then_validate(trainer, {task: dls}, partial(self.load_task, task))
                    self.reference[task] = measured[task] = scores[task]
        if measured:
            prefix = reference_prefix(self.log_prefix if log_prefix is None else log_prefix)
            self.log_values(trainer, summarize(measured, prefix=prefix), prefix)
        return dict(self.reference)

    def evaluate(
        self,
        trainer: pl.Trainer | None,
        dataloaders: Dataloaders,
        k: float | None = None,
        lam: float | None = None,
        normalize: bool = False,
        log_prefix: str | None = None,
    ) -> Scores:
        """Merge with (k, lam) and score every task on its dataloaders; logs ``<log_prefix>/<task>/<metric>``.

        ``log_prefix`` (default :attr:`log_prefix`, ``"merge"``) names the split in the logs, e.g.
        ``"merge/test"``; each call is one step of that prefix.

        Example:
            ``scores = module.evaluate(pl.Trainer(logger=False), {"a": dl_a, "b": dl_b}, k=0.2, lam=1.0)``
        """
        loaders = self.check_dataloaders(dataloaders)
        self.merger.remember_data(loaders)
        with _logging_under(self, log_prefix):
            if normalize:
                self.measure_finetuned(trainer, dataloaders)
            return self.write_then_validate(trainer, loaders, partial(self.apply_merge, k, lam))

    def search(
        self,
        trainer: pl.Trainer | None,
        dataloaders: Dataloaders,
        method: str | Sequence[str] | None = None,
        k: Any = None,
        lam: Any = "paper",
        strategy: str = "grid",
        objective: Any = "mean",
        mode: str = "max",
        normalize: bool = True,
        resume: bool = True,
        on_candidate: Callable[[Candidate], None] | None = None,
        log_prefix: str | None = None,
        max_candidates: int = MAX_CANDIDATES,
        budget_s: float | None = None,
    ) -> SearchResult:
        """Pick the method, k and lam on the validation dataloaders, then leave the best merge applied.

        tau_m is computed once per (method, k) and each lam is applied in place; finished candidates
        of an earlier interrupted search (``self.search_result``, restored from checkpoints) are reused.
        Given several methods, every method's candidates are scored and the best over all of them is
        applied (:attr:`method` becomes the chosen one; ties go to the method listed first).

        Args:
            trainer: runs the validation loop (``None``: a plain loop, for use inside a running fit).
            dataloaders: ``{task: dataloader}`` for every task.
            method: merge method or a list of them (default: the module's), or ``"auto"``: every registry
                method coarse to fine (:func:`~lightning_ties.core.auto.auto_search`; lists of k/lam replace its grids).
            k: a number, a list, ``"search"`` (0.1, 0.2, 0.3) or ``None`` (the module's k); methods
                without k (task arithmetic, TSV-M, Iso-C) ignore it.
            lam: ``"paper"`` (each method's own paper grid: TIES 0.8..2.5, task arithmetic 0.1..1.0,
                the subspace methods 0.1..3.0), a number or a list (the same for every method).
            strategy, mode: ``"grid"`` or ``"coarse_to_fine"``; ``"max"`` or ``"min"``.
            objective: ``"mean"``, ``"normalized"``, ``"mean:<metric>"`` or a callable of the scores.
            normalize: measure each fine-tuned model's score once, for normalized scores.
            resume: reuse finished candidates of ``self.search_result`` when it is the same search.
            on_candidate: called after each new candidate (e.g. to save progress).
            log_prefix: where candidates are logged (default :attr:`log_prefix`, ``"merge"``; e.g.
                ``"merge/val"``): candidate i at logger step i, with its ``k`` and ``lam``.
            max_candidates: a larger grid is refused (default 10,000; pass the grid's size to confirm it).
            budget_s: wall seconds ``method="auto"`` may spend (``None``: no limit); then the best so far is
                applied (``result.budget_cut``); under DDP rank 0 decides for all, so every rank agrees.

        Progress: one line per candidate through ``rank_zero_info`` ("candidate i of N: k, lam, score;
        best so far") and, when the trainer shows a progress bar, one bar over the candidates with
        the same postfix instead of a validation bar per candidate.

        Example:
            ``best = module.search(trainer, {"a": dl_a, "b": dl_b}, k=[0.1, 0.2, 0.3], lam="paper")``
            ``best = module.search(trainer, loaders, method=["ties", "tsv"], lam="paper")`` (then ``best.method``)
            ``best = module.search(trainer, loaders, method="auto", budget_s=300)`` (then ``print(best.table)``)
        """
        options = SearchOptions.build(self.method if method is None else method, k, lam, objective, mode, strategy,
                                      normalize, max_candidates=max_candidates, budget_s=budget_s)
        options = self.searchable_on(trainer, options)  # sharded: RegMean needs whole weights
        return self.search_with(trainer, dataloaders, options, resume, on_candidate, log_prefix)

    def search_with(
        self,
        trainer: pl.Trainer | None,
        dataloaders: Dataloaders,
        options: SearchOptions,
        resume: bool = True,
        on_candidate: Callable[[Candidate], None] | None = None,
        log_prefix: str | None = None,
    ) -> SearchResult:
        """:meth:`search` with options already checked (what ``TiesMerging`` passes inward)."""
        loaders = self.check_dataloaders(dataloaders)
        self.merger.remember_data(loaders)
        result = self.merger.start_search(options, resume)
        with _logging_under(self, log_prefix):
            if options.normalize:
                result.reference = self.measure_finetuned(trainer, dataloaders)
            if trainer is not None:
                self.merge_device = trainer.strategy.root_device  # tau_m is computed there (before each k)
            label = "auto" if options.auto else ", ".join(options.methods)
            progress = SearchProgress(label, options.total(self.k), len(result.candidates), trainer, rank_zero_info)

            def evaluate(kv: float | None, lv: float) -> Scores:
                self._candidate_step = len(result.candidates)  # candidate i is logged at step i
                try:
                    return self.write_then_validate(trainer, loaders, partial(self.apply_merge, kv, lv))
                finally:
                    self._candidate_step = None

            def apply_best(kv: float | None, lv: float) -> None:
                if self.set_up_for(trainer):
                    return self.apply_merge(kv, lv)
                # a search resumed whole scored nothing here: one (unlogged) pass lets the Trainer set the model up
                with _passes_unlogged(self):
                    self.write_then_validate(trainer, loaders, partial(self.apply_merge, kv, lv))

            def finished(candidate: Candidate) -> None:
                progress.update(result, candidate)
                if on_candidate is not None:
                    on_candidate(candidate)

            with progress:
                self.merger.search(options, result, evaluate, finished, before_k=self.tau_ahead(trainer),
                                   apply_best=apply_best)
        return result

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        search = self.search_result.to_dict() if self.search_result is not None else None
        checkpoint["ties_merging"] = {"search": search, "reference": self.reference, "current": self.current,
                                      "method": self.method}  # the method ``current`` is a merge of

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ties_merging")
        if not state:
            return
        self.search_result = SearchResult.from_dict(state["search"]) if state["search"] else None
        self.reference = dict(state["reference"])
        self.current = tuple(state["current"]) if state["current"] else None  # type: ignore[assignment]
        self.method = state.get("method", self.method)  # checkpoints of earlier versions hold no method



@contextmanager
def _passes_unlogged(module: MultiTaskMergeModule) -> Iterator[None]:
    """The module's validation passes in the block log nothing (their scores are logged elsewhere, or were)."""
    module._unlogged = True
    try:
        yield
    finally:
        module._unlogged = False


def _no_batches(trainer: pl.Trainer, loaders: Mapping[str, list[Any]]) -> str:
    """Why a pass scored nothing: Lightning ran no validation batch (``limit_val_batches=0``, empty dataloaders)."""
    sizes = {t: [_length(dl) for dl in dls] for t, dls in loaders.items()}
    return (
        f"MultiTaskMergeModule: the Trainer ran no validation batch (limit_val_batches={trainer.limit_val_batches!r}, "
        f"batches in each task's dataloaders: {sizes}), so nothing was merged or scored. The module merges and "
        "scores in Lightning's validation loop: give it a Trainer with limit_val_batches > 0 and non-empty dataloaders"
    )


def _length(dataloader: Any) -> int | str:
    try:
        return len(dataloader)
    except TypeError:  # an iterable dataset's loader has no length
        return "unknown"


@contextmanager
def _logging_under(module: MultiTaskMergeModule, log_prefix: str | None) -> Iterator[None]:
    """``module.log_prefix`` set to ``log_prefix`` (``None``: unchanged) for the block."""
    previous = module.log_prefix
    module.log_prefix = previous if log_prefix is None else log_prefix
    try:
        yield
    finally:
        module.log_prefix = previous


def pass_values(scores: Scores, reference: Scores, current: tuple[float | None, float] | None,
                prefix: str) -> dict[str, float]:
    """What one validation pass logs under ``prefix``: every score (normalized too, given references), the mean
    over tasks, and the (k, lam) scored.

    Example:
        >>> pass_values({"a": {"acc": 0.5}}, {}, (0.2, 1.0), "merge")
        {'merge/a/acc': 0.5, 'merge/mean/acc': 0.5, 'merge/k': 0.2, 'merge/lam': 1.0}
    """
    values = summarize(scores, reference or None, prefix)
    if current is not None:
        if current[0] is not None:
            values[f"{prefix}/k"] = current[0]
        values[f"{prefix}/lam"] = current[1]
    return values


def clean_number(value: float) -> float:
    """``value`` as a Python float without binary noise: 12 significant digits (0.1 + 0.2 -> 0.3).

    Example:
        >>> clean_number(0.1 + 0.2), clean_number(2)
        (0.3, 2.0)
    """
    return float(f"{float(value):.12g}")


def reference_prefix(log_prefix: str) -> str:
    """Where the fine-tuned reference of a merge logged under ``log_prefix`` is logged.

    Example:
        >>> reference_prefix("merge"), reference_prefix("merge/val"), reference_prefix("eval")
        ('finetuned', 'finetuned/val', 'eval/finetuned')
    """
    if log_prefix == "merge" or log_prefix.startswith("merge/"):
        return "finetuned" + log_prefix[len("merge"):]
    return f"{log_prefix}/finetuned"


__all__ = ["MultiTaskMergeModule", "clean_number", "pass_values", "reference_prefix"]
