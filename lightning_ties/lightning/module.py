"""MultiTaskMergeModule: a merged multitask model evaluated through Lightning's validation loop.

Entry points (also what the CLI calls; no user-written LightningModule needed)::

    module = MultiTaskMergeModule(
        base,                      # nn.Module, state dict, path or TensorSource (theta_init)
        tasks={"a": src_a, ...},   # name -> fine-tuned model (module, state dict, path, source)
        model=None,                # the architecture to run (default: ``base`` when it is a module)
        heads=None,                # regexes naming per-task head keys; keys that differ are heads anyway
        metrics=None,              # Metric / MetricCollection template, or {task: metric}; default accuracy
        method="ties", k=0.2, lam=None, method_params=None, include=None, exclude=None,
        forward_fn=None,           # (model, batch, task) -> (preds, target); default handles (x, y) and dicts
    )
    scores = module.evaluate(trainer, dataloaders={"a": dl_a, ...}, k=0.2, lam=1.0)   # -> {task: {metric: v}}
    result = module.search(trainer, dataloaders={...}, method=None, k=None, lam="paper",
                           strategy="grid", objective="mean", mode="max", normalize=True) # -> SearchResult
    module.apply_merge(k, lam)      # write base + lam * tau_m(k) into ``model`` in place
    module.use_task("a")            # put task a's head in place (per-task heads)
    module.measure_finetuned(trainer, dataloaders)  # each task's own score, cached in ``reference``

``trainer.validate(module, dataloaders={"a": dl_a, ...})`` also works directly: the dict's keys name
the tasks, and the module's default merge (k, lam) is applied first if none is in place.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..evaluation.batches import predict_and_target
from ..merging import MergedTaskVector, MergePlan, apply_task_vector, as_source, get_method, method_task_vector, plan_merge
from ..merging.sources import TensorSource
from ._compat import move_data_to_device, pl, rank_zero_info
from .heads import HeadsArg, HeadStore, differing_keys, exact_patterns, named_head_keys
from .keys import match_to_module
from .metrics import MetricsArg, Scores, TaskMetrics, summarize
from .progress import SearchProgress
from .regmean import regmean_task_vector
from .search import Candidate, SearchResult, k_grid, lam_grid, run_search

#: ``forward_fn(model, batch, task) -> (preds, target)``; a two-argument ``forward_fn(model, batch)`` works too.
ForwardFn = Callable[..., tuple[torch.Tensor, Any]]
Dataloaders = Mapping[str, Any]
_MISMATCH_WARNING = r".*key\(s\) differ across models and are not merged.*"


class MultiTaskMergeModule(pl.LightningModule):
    """Merge task checkpoints into one model and score it per task in Lightning's validation loop.

    Shared-output models (one output serves every task) are evaluated as they are. Per-task
    heads (keys whose shape or presence differs across tasks, or keys matching ``heads``) are
    never merged: each task is evaluated with its own head, swapped in before its dataloader.

    Args:
        base: the pretrained model (theta_init): module, state dict, path or source.
        tasks: task name -> fine-tuned model (module, state dict, path or source). Base and tasks are
            matched to ``model``'s own keys (:mod:`lightning_ties.lightning.keys`): a ``.ckpt`` of the
            same LightningModule as is, an inner model's ``save_pretrained`` folder under its attribute
            (``model.``); ``{"path": ..., "prefix": "model."}`` chooses by hand.
        model: the module to run; default ``base`` when it is an ``nn.Module``. Its weights are
            overwritten by the merge; ``base``'s values are snapshotted first.
        heads: regexes (or one regex) naming head keys, or submodules of ``model``, in addition to
            the detected ones (keys whose shape or presence differs across tasks).
        metrics: ``None`` (arg-max accuracy), a template metric cloned per task, or ``{task: metric}``.
        method: merge method of the registry (``lightning_ties.describe_methods()``).
        k: default k (trim density) for methods that have one.
        lam: default lam; ``None`` -> the method's default.
        method_params: other method parameters (e.g. ``{"scope": "per_tensor"}``).
        include, exclude: regexes choosing the merged keys.
        forward_fn: ``(model, batch, task) -> (preds, target)``, told which task the batch belongs to
            (so an encoder-plus-heads model can run ``task``'s own head); a function of two arguments
            ``(model, batch)`` is called without the task. Default
            (:func:`lightning_ties.evaluation.predict_and_target`): ``(x, y)`` batches call ``model(x)``,
            dict batches pop ``labels``/``label``/``y``/``target``/``targets`` and call ``model(**batch)``;
            the logits are the output tensor, its ``.logits``, ``["logits"]`` or a tuple's first element.

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
        model: nn.Module | None = None,
        heads: HeadsArg = None,
        metrics: MetricsArg = None,
        method: str = "ties",
        k: float = 0.2,
        lam: float | None = None,
        method_params: Mapping[str, Any] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks)
        if model is None:
            if not isinstance(base, nn.Module):
                raise ValueError(
                    "base is not a module, so pass model= (the architecture to evaluate; its weights are replaced)"
                )
            model = base
        self.model = model
        self.method = method
        get_method(method)
        self.k = k
        self.lam = lam
        self.method_params = dict(method_params or {})
        # method_params are written for this method; a search over other methods passes each only
        # the parameters it has (``scope`` reaches TIES, not TSV-M)
        self._params_method = method
        self.include = include
        self.forward_fn = forward_fn
        self._forward_takes_task = _takes_task(forward_fn) if forward_fn is not None else False
        model_keys = list(model.state_dict())
        # sources are matched to the model's own keys: a .ckpt of the same module as is, an inner
        # model's save_pretrained folder under its attribute (model.), see lightning.keys
        self._base_src = match_to_module(_snapshot_source(base, model), model_keys, label="base")
        self._task_srcs = [match_to_module(tasks[t], model_keys, label=t, base=self._base_src) for t in self.tasks]
        #: where tau_m is computed and kept (the Trainer's device when one runs the evaluation);
        #: None: the model's device
        self.merge_device: torch.device | None = None
        self._pending: tuple[float | None, float | None] | None = None
        self.plan, self.head_keys = self._plan_with_heads(heads, exclude)
        self._exclude = exact_patterns(self.head_keys, exclude)
        self._check_model_keys()
        self.task_metrics = TaskMetrics(self.tasks, metrics)
        self.reference: Scores = {}
        self.last_scores: Scores = {}
        self.search_result: SearchResult | None = None
        self.current: tuple[float | None, float] | None = None
        self.tasks_by_index: list[str] = list(self.tasks)
        self._base_merged: dict[str, torch.Tensor] | None = None
        self._tau: tuple[tuple[str, float | None], MergedTaskVector] | None = None
        #: the last ``search``/``evaluate`` call's ``{task: [dataloader, ...]}``: where methods that
        #: need data (RegMean's Gram matrices) read each task's examples
        self.data_loaders: dict[str, list[Any]] | None = None
        # each task's head, read on first use and kept where its source gives it (no device memory)
        self.head_store = HeadStore(self.head_keys, dict(zip(self.tasks, self._task_srcs)))
        self._head_task: str | None = None
        #: where validation passes are logged: ``<log_prefix>/<task>/<metric>``, ``<log_prefix>/mean/<metric>``,
        #: ``<log_prefix>/k``, ``<log_prefix>/lam`` (``evaluate``/``search`` take their own ``log_prefix``)
        self.log_prefix = "merge"
        self._measuring_reference = False
        self._log_steps: dict[str, int] = {}  # next logger step of each prefix: one step per pass
        self._candidate_step: int | None = None  # a search logs candidate i at step i
        #: extra facts a stored search's scores depend on (the callback adds the fine-tuned weights' checksum)
        self.fingerprint_extra: dict[str, Any] = {}

    # ---- construction checks -----------------------------------------------------------------
    def _plan_with_heads(self, heads: HeadsArg, exclude: str | Sequence[str] | None) -> tuple[MergePlan, list[str]]:
        """The merge plan without the named heads, and every head key: named ones plus those that differ."""
        named = named_head_keys(self.model, heads)  # a pattern naming no key fails here
        plan = plan_merge(self._base_src, self._task_srcs, self.include, exact_patterns(named, exclude), warn=False)
        detected = differing_keys(plan, list(self.model.state_dict()))
        return plan, sorted(set(named) | set(detected))

    def _check_model_keys(self) -> None:
        targets = self.model.state_dict()
        missing = [k for k in self.plan.merge_keys if k not in targets]
        if missing:
            raise ValueError(
                f"base has {len(missing)} key(s) the model lacks, e.g. {missing[:5]}; base and model must "
                f"share key names (model keys start with {sorted(targets)[:5]})"
            )
        wrong = [
            f"{k}: base {self._base_src.spec(k).shape} vs model {tuple(targets[k].shape)}"
            for k in self.plan.merge_keys
            if tuple(targets[k].shape) != tuple(self._base_src.spec(k).shape)
        ]
        if wrong:
            raise ValueError("base and model shapes differ: " + "; ".join(wrong[:5]))

    # ---- merging -----------------------------------------------------------------------------
    @property
    def searches_k(self) -> bool:
        """Whether the current method has a trim density k."""
        return get_method(self.method).has_k

    def task_vector(self, k: float | None = None) -> MergedTaskVector:
        """tau_m of the current method for ``k`` (computed once per (method, k) and cached)."""
        k = (self.k if k is None else k) if self.searches_k else None
        key = (self.method, k)
        if self._tau is not None and self._tau[0] == key:
            return self._tau[1]
        self._tau = None  # free the previous tau_m before computing the next one
        params = dict(self.method_params)
        if self.method != self._params_method:
            accepted = get_method(self.method).parameters()
            params = {name: v for name, v in params.items() if name in accepted}
        if k is not None:
            params["k"] = k
        if get_method(self.method).needs_data:  # RegMean: Gram matrices from each task's own dataloader
            tau = regmean_task_vector(self, self.data_loaders, params)
            self._tau = (key, tau)
            return tau
        device = self.compute_device
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MISMATCH_WARNING)  # heads are reported by the module
            tau = method_task_vector(
                self._base_src, self._task_srcs, self.method, include=self.include, exclude=self._exclude,
                device=device, **params,
            )
        self._tau = (key, tau)  # on ``device``: a lam search applies it there, in place
        return tau

    @property
    def compute_device(self) -> torch.device:
        """Where tau_m is computed and kept: ``merge_device``, else the model's device."""
        return self.merge_device if self.merge_device is not None else module_device(self.model)

    def apply_merge(self, k: float | None = None, lam: float | None = None) -> None:
        """Write theta = base + lam * tau_m(k) into ``model``'s merged parameters, in place.

        Only merged keys are written; heads are put in place per task by :meth:`use_task`. The
        sum is computed in float32 on the model's device (tau_m stays there between calls; the
        base is kept where it was given, CPU for files, and moved one tensor at a time) and
        written in the model's dtype (bf16/fp16 modules round once, as ``ties_merge`` does).
        """
        if lam is None:
            lam = get_method(self.method).default_lam if self.lam is None else self.lam
        tau = self.task_vector(k)
        if self._base_merged is None:
            self._base_merged = {key: self._base_src.get(key) for key in self.plan.merge_keys}
        apply_task_vector(self._base_merged, tau, float(lam), out=self.model, device=module_device(self.model))
        self.current = ((self.k if k is None else k) if self.searches_k else None, float(lam))

    def load_task(self, task: str) -> None:
        """Put task ``task``'s own fine-tuned weights (merged keys and head) into ``model``."""
        src = self._task_srcs[self._task_index(task)]
        targets = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in self.plan.merge_keys:
                targets[key].data.copy_(src.get(key))
        self.current = None
        self._head_task = None
        self.use_task(task)

    def use_task(self, task: str) -> None:
        """Swap ``task``'s head into ``model`` (no-op for shared-output models)."""
        if not self.head_keys or self._head_task == task:
            return
        self._task_index(task)  # an unknown task is a KeyError naming the tasks
        self.head_store.swap_into(self.model, task)
        self._head_task = task

    def _task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f"unknown task {task!r}; tasks are {self.tasks}") from None

    # ---- the validation loop -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def predict_and_target(self, batch: Any, task: str | None = None) -> tuple[torch.Tensor, Any]:
        """Model predictions and targets of one batch of ``task`` (``forward_fn`` or the batch convention)."""
        if self.forward_fn is not None:
            if self._forward_takes_task:
                return self.forward_fn(self.model, batch, task)
            return self.forward_fn(self.model, batch)
        hint = "pass forward_fn=(model, batch, task) -> (preds, target) to MultiTaskMergeModule"
        try:
            preds, target = predict_and_target(self.model, batch)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (task {task!r}); {hint} to run this model and batch") from err
        if target is None:
            raise ValueError(
                f"a batch of task {task!r} has no target (use (inputs, target) or a dict with 'labels'); {hint}"
            )
        return preds, target

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks_by_index[dataloader_idx]
        self.use_task(task)
        preds, target = self.predict_and_target(batch, task)
        self.task_metrics.update(task, preds, target)

    def merge_then_validate(
        self, trainer: pl.Trainer | None, loaders: Mapping[str, list[Any]], k: float | None, lam: float | None
    ) -> Scores:
        """Score the merge (k, lam). With a trainer the merge is applied in ``on_validation_start``,
        once Lightning has moved the model to its device, so it is computed there."""
        if trainer is None:
            self.apply_merge(k, lam)
        else:
            self.merge_device = trainer.strategy.root_device
            self._pending = (k, lam)
        try:
            return self.validate(trainer, loaders)
        finally:
            self._pending = None

    def on_validation_start(self) -> None:
        # ``trainer.validate(module, dataloaders={"a": dl_a, ...})`` names the tasks by the dict's keys
        loaders = self.trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            routed = self.check_dataloaders(loaders, require_all=False)
            self.tasks_by_index = [t for t in loaders if t in routed for _ in routed[t]]
        if self._pending is not None:
            k, lam = self._pending
            self._pending = None
            self.apply_merge(k, lam)
        elif self.current is None and not self._measuring_reference:
            self.apply_merge()  # a direct ``trainer.validate`` scores the default merge

    def on_validation_epoch_start(self) -> None:
        self.task_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.last_scores = self.task_metrics.compute(dict.fromkeys(self.tasks_by_index))
        self.task_metrics.reset()
        if self._measuring_reference:
            return  # measure_finetuned logs every task's reference once, with the mean over tasks
        prefix = self.log_prefix
        values = summarize(self.last_scores, self.reference or None, prefix)
        if self.current is not None:
            if self.current[0] is not None:
                values[f"{prefix}/k"] = self.current[0]
            values[f"{prefix}/lam"] = self.current[1]
        step = self._candidate_step
        for name, value in self.log_values(self.trainer, values, prefix, step).items():
            # callback_metrics only (trainer.validate's return, monitors): the loggers got them with their step
            self.log(name, value, add_dataloader_idx=False, logger=False)

    def log_values(
        self, trainer: pl.Trainer | None, values: Mapping[str, float], prefix: str, step: int | None = None
    ) -> dict[str, float]:
        """Send ``values`` to the trainer's loggers as clean Python floats at one step of their own.

        Lightning's ``self.log`` would store float32 tensors (k=0.3 logged as 0.30000001192...) at the
        Trainer's global step, which ``trainer.validate`` never advances: every pass would share step 0.
        Each pass logged under ``prefix`` gets the next step instead (a search passes the candidate's
        index), so a logger plots scores against the candidates.
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
    def check_dataloaders(self, dataloaders: Dataloaders, require_all: bool = True) -> dict[str, list[Any]]:
        """Validate a ``{task: dataloader or list of dataloaders}`` mapping before any work."""
        if not isinstance(dataloaders, Mapping):
            raise TypeError(
                f"dataloaders must be a dict task -> dataloader (naming the tasks), got {type(dataloaders).__name__}"
            )
        unknown = sorted(set(dataloaders) - set(self.tasks))
        if unknown:
            raise ValueError(f"dataloaders given for unknown task(s) {unknown}; tasks are {self.tasks}")
        missing = [t for t in self.tasks if t not in dataloaders or dataloaders[t] is None]
        if require_all and missing:
            raise ValueError(
                f"task(s) {missing} have no validation dataloader; pass one for every task {self.tasks} "
                "(or leave all out to use the paper's recipe k=0.2, lam=1.0)"
            )
        out = {}
        for t in self.tasks:
            if t in dataloaders and dataloaders[t] is not None:
                loaders = dataloaders[t]
                out[t] = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        return out

    def validate(self, trainer: pl.Trainer | None, loaders: Mapping[str, list[Any]]) -> Scores:
        """One validation pass over ``loaders`` with the weights in place; returns the per-task scores.

        With a trainer, Lightning's validation loop runs it (loggers, progress, DDP); with
        ``None``, a plain loop on this process (for use inside a running fit).
        """
        self.tasks_by_index = [t for t, ls in loaders.items() for _ in ls]
        flat = [dl for ls in loaders.values() for dl in ls]
        if trainer is None:
            return self._validate_inline(flat)
        trainer.validate(self, dataloaders=flat, verbose=False)
        return self.last_scores

    def _validate_inline(self, dataloaders: list[Any]) -> Scores:
        device = next(self.model.parameters()).device
        self.task_metrics.to(device)
        self.task_metrics.reset()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for idx, dl in enumerate(dataloaders):
                    for i, batch in enumerate(dl):
                        self.validation_step(move_data_to_device(batch, device), i, idx)
            self.last_scores = self.task_metrics.compute(dict.fromkeys(self.tasks_by_index))
        finally:
            self.task_metrics.reset()
            self.model.train(was_training)
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
        self._measuring_reference = True
        try:
            for task, dls in loaders.items():
                if task not in self.reference:
                    self.load_task(task)
                    self.reference[task] = measured[task] = self.validate(trainer, {task: dls})[task]
        finally:
            self._measuring_reference = False
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
        self._remember_data(loaders)
        with self._logging_under(log_prefix):
            if normalize:
                self.measure_finetuned(trainer, dataloaders)
            return self.merge_then_validate(trainer, loaders, k, lam)

    @contextmanager
    def _logging_under(self, log_prefix: str | None) -> Iterator[None]:
        previous = self.log_prefix
        self.log_prefix = previous if log_prefix is None else log_prefix
        try:
            yield
        finally:
            self.log_prefix = previous

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
    ) -> SearchResult:
        """Pick the method, k and lam on the validation dataloaders, then leave the best merge applied.

        tau_m is computed once per (method, k) and each lam is applied in place; finished candidates
        of an earlier interrupted search (``self.search_result``, restored from checkpoints) are reused.
        Given several methods, every method's candidates are scored and the best over all of them is
        applied (:attr:`method` becomes the chosen one; ties go to the method listed first).

        Args:
            trainer: runs the validation loop (``None``: a plain loop, for use inside a running fit).
            dataloaders: ``{task: dataloader}`` for every task.
            method: merge method or a list of them (default: the module's).
            k: a number, a list, ``"search"`` (0.1, 0.2, 0.3) or ``None`` (the module's k); methods
                without k (task arithmetic, TSV-M, Iso-C) ignore it.
            lam: ``"paper"`` (each method's own paper grid: TIES 0.8..2.5, task arithmetic 0.1..1.0,
                the subspace methods 0.1..3.0), a number or a list (the same for every method).
            strategy: ``"grid"`` or ``"coarse_to_fine"``.
            objective: ``"mean"``, ``"normalized"``, ``"mean:<metric>"`` or a callable of the scores.
            mode: ``"max"`` or ``"min"``.
            normalize: measure each fine-tuned model's score once, for normalized scores.
            resume: reuse finished candidates of ``self.search_result`` when it is the same search.
            on_candidate: called after each new candidate (e.g. to save progress).
            log_prefix: where candidates are logged (default :attr:`log_prefix`, ``"merge"``; e.g.
                ``"merge/val"``): candidate i at logger step i, with its ``k`` and ``lam``.

        Progress: one line per candidate through ``rank_zero_info`` ("candidate i of N: k, lam, score;
        best so far") and, when the trainer shows a progress bar, one bar over the candidates with
        the same postfix instead of a validation bar per candidate.

        Example:
            ``best = module.search(trainer, {"a": dl_a, "b": dl_b}, k=[0.1, 0.2, 0.3], lam="paper")``
            ``best = module.search(trainer, loaders, method=["ties", "tsv"], lam="paper")`` (then ``best.method``)
        """
        loaders = self.check_dataloaders(dataloaders)
        if isinstance(objective, str) and objective.startswith("normalized") and not normalize:
            raise ValueError("objective 'normalized' needs the fine-tuned scores: leave normalize=True")
        methods = self._search_methods(method)
        grids = self._search_grids(methods, k, lam)
        self._remember_data(loaders)
        fingerprint = self.fingerprint(objective, mode, normalize, methods=methods)
        result = self.search_result if resume else None
        if result is None or result.fingerprint != fingerprint:
            result = SearchResult(method=methods[0], fingerprint=fingerprint, methods=list(methods))
        self.search_result = result
        self.reference = {**result.reference, **self.reference}  # a resumed search keeps its references
        with self._logging_under(log_prefix):
            if normalize:
                result.reference = self.measure_finetuned(trainer, dataloaders)
            if trainer is not None:
                self.merge_device = trainer.strategy.root_device  # tau_m is computed there (before_k)
            total = sum(len(ks) * len(lams) for ks, lams in grids.values()) if strategy == "grid" else None
            progress = SearchProgress(", ".join(methods), total, len(result.candidates), trainer, rank_zero_info)

            def evaluate(kv: float | None, lv: float) -> Scores:
                self._candidate_step = len(result.candidates)  # candidate i is logged at step i
                try:
                    return self.merge_then_validate(trainer, loaders, kv, lv)
                finally:
                    self._candidate_step = None

            def finished(candidate: Candidate) -> None:
                progress.update(result, candidate)
                if on_candidate is not None:
                    on_candidate(candidate)

            with progress:
                for m, (ks, lams) in grids.items():
                    self._use_method(m)
                    run_search(
                        evaluate, ks, lams, strategy, objective, mode, result, finished,
                        before_k=self.task_vector, method=m,
                    )
        result.method = result.best_method
        self._use_method(result.method)
        self.apply_merge(result.k, result.lam)
        return result

    def _search_methods(self, method: str | Sequence[str] | None) -> list[str]:
        """The methods to search, each checked against the registry (before any work)."""
        if method is None:
            return [self.method]
        methods = [method] if isinstance(method, str) else list(method)
        if not methods or not all(isinstance(m, str) for m in methods):
            raise ValueError(f"method={method!r}: expected a method name or a non-empty list of them")
        for m in methods:
            get_method(m)  # an unknown name fails here, naming the registered methods
        return list(dict.fromkeys(methods))

    def _search_grids(self, methods: list[str], k: Any, lam: Any) -> dict[str, tuple[list[float | None], list[float]]]:
        """Each method's (k grid, lam grid): k for the methods that trim, lam from each method's own grid."""
        if k is not None and not any(get_method(m).has_k for m in methods):
            raise ValueError(f"method(s) {methods} have no k to search; leave k out")
        grids = {}
        for m in methods:
            ks = k_grid(self.k if k is None else k) if get_method(m).has_k else [None]
            grids[m] = (ks, lam_grid(m, lam))  # a method without lam (averaging) refuses any but its own here
        return grids

    def _remember_data(self, loaders: dict[str, list[Any]]) -> None:
        """Keep ``loaders`` for methods that need data; a tau_m computed from other data is dropped."""
        same = self.data_loaders is not None and {t: [id(d) for d in ls] for t, ls in loaders.items()} == {
            t: [id(d) for d in ls] for t, ls in self.data_loaders.items()
        }
        if not same and self._tau is not None and get_method(self._tau[0][0]).needs_data:
            self._tau = None
        self.data_loaders = loaders

    def _use_method(self, method: str) -> None:
        """Make ``method`` the one :meth:`task_vector` and :meth:`apply_merge` use."""
        if method != self.method:
            self.method, self._tau = method, None

    def fingerprint(
        self, objective: Any = "mean", mode: str = "max", normalize: bool = True, methods: Sequence[str] | None = None
    ) -> str:
        """What candidate scores depend on; a stored search is reused only when this matches.

        ``methods``: the methods searched; one method (the default: the module's) gives the same
        fingerprint as before multi-method searches, so their stored progress still resumes.
        """
        methods = list(methods) if methods else [self.method]
        spec: dict[str, Any] = {
            "method": methods[0] if len(methods) == 1 else methods,
            "params": {k: repr(v) for k, v in sorted(self.method_params.items())},
            "tasks": [(t, s.label) for t, s in zip(self.tasks, self._task_srcs)],
            "objective": objective if isinstance(objective, str) else getattr(objective, "__qualname__", "callable"),
            "mode": mode,
            "normalize": normalize,
            "metrics": {t: list(self.task_metrics.collection(t).keys()) for t in self.tasks},
            "extra": self.fingerprint_extra,
        }
        return json.dumps(spec, sort_keys=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ties_merging"] = {
            "search": self.search_result.to_dict() if self.search_result is not None else None,
            "reference": self.reference,
            "current": self.current,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ties_merging")
        if not state:
            return
        self.search_result = SearchResult.from_dict(state["search"]) if state["search"] else None
        self.reference = dict(state["reference"])
        self.current = tuple(state["current"]) if state["current"] else None  # type: ignore[assignment]


def _check_tasks(tasks: Mapping[str, Any]) -> list[str]:
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty dict task name -> fine-tuned model (module, state dict or path)")
    bad = [t for t in tasks if not isinstance(t, str) or not t or "/" in t or t == "mean"]
    if bad:
        raise ValueError(f"task names must be non-empty strings without '/' and not 'mean', got {bad}")
    return list(tasks)


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


def _takes_task(fn: Callable[..., Any]) -> bool:
    """Whether ``forward_fn`` accepts a third argument (the task name); two-argument functions predate it."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call them the old way
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def _snapshot_source(base: Any, model: nn.Module) -> TensorSource:
    """Base as a source; a module's values are copied (the model is written over in place)."""
    if isinstance(base, nn.Module):
        return as_source({k: v.detach().clone() for k, v in base.state_dict().items()}, "base")
    if isinstance(base, Mapping):  # may alias the model's own tensors (model.state_dict())
        return as_source({k: v.detach().clone() for k, v in base.items()}, "base")
    return as_source(base, "base")


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first floating-point tensor (CPU for a module without one)."""
    for t in module.state_dict().values():
        if t.is_floating_point():
            return t.device
    return torch.device("cpu")


__all__ = ["MultiTaskMergeModule"]
