"""MultiTaskMergeModule: a merged multitask model evaluated through Lightning's validation loop.

Entry points (also what the CLI calls; no user-written LightningModule needed)::

    module = MultiTaskMergeModule(
        base,                      # nn.Module, state dict, path or TensorSource (theta_init)
        tasks={"a": src_a, ...},   # name -> fine-tuned model (module, state dict, path, source)
        model=None,                # the architecture to run (default: ``base`` when it is a module)
        heads=None,                # regexes naming per-task head keys; keys that differ are heads anyway
        metrics=None,              # Metric / MetricCollection template, or {task: metric}; default accuracy
        method="ties", k=0.2, lam=None, method_params=None, include=None, exclude=None,
        forward_fn=None,           # (model, batch) -> (preds, target); default handles (x, y) and dicts
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

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..merging import MergePlan, TaskVector, apply_task_vector, as_source, get_method, method_task_vector, plan_merge
from ..merging.sources import TensorSource
from ._compat import move_data_to_device, pl
from .heads import HeadsArg, HeadStore, differing_keys, exact_patterns, named_head_keys
from .keys import match_to_module
from .metrics import MetricsArg, Scores, TaskMetrics, summarize
from .search import Candidate, SearchResult, k_grid, lam_grid, run_search

ForwardFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]
Dataloaders = Mapping[str, Any]
_TARGET_KEYS = ("labels", "label", "y", "target", "targets")
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
        forward_fn: ``(model, batch) -> (preds, target)``; default: ``(x, y)`` batches call
            ``model(x)``, dict batches pop ``labels``/``label``/``y``/``target`` and call ``model(**batch)``;
            outputs with ``.logits`` use them.

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
        self.include = include
        self.forward_fn = forward_fn
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
        self._tau: tuple[tuple[str, float | None], TaskVector] | None = None
        # each task's head, read on first use and kept where its source gives it (no device memory)
        self.head_store = HeadStore(self.head_keys, dict(zip(self.tasks, self._task_srcs)))
        self._head_task: str | None = None
        self._log_prefix = "merge"
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

    def task_vector(self, k: float | None = None) -> TaskVector:
        """tau_m of the current method for ``k`` (computed once per (method, k) and cached)."""
        k = (self.k if k is None else k) if self.searches_k else None
        key = (self.method, k)
        if self._tau is not None and self._tau[0] == key:
            return self._tau[1]
        self._tau = None  # free the previous tau_m before computing the next one
        params = dict(self.method_params)
        if k is not None:
            params["k"] = k
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

    def predict_and_target(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Model predictions and targets of one batch (``forward_fn`` or the default conventions)."""
        if self.forward_fn is not None:
            return self.forward_fn(self.model, batch)
        if isinstance(batch, Mapping):
            inputs = dict(batch)
            name = next((k for k in _TARGET_KEYS if k in inputs), None)
            if name is None:
                raise ValueError(f"dict batch has no target key (one of {_TARGET_KEYS}); pass forward_fn")
            target = inputs.pop(name)
            out = self.model(**inputs)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            target = batch[1]
            out = self.model(batch[0])
        else:
            raise ValueError(f"cannot split a {type(batch).__name__} batch into inputs and targets; pass forward_fn")
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out, target

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks_by_index[dataloader_idx]
        self.use_task(task)
        preds, target = self.predict_and_target(batch)
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
        elif self.current is None and self._log_prefix == "merge":
            self.apply_merge()  # a direct ``trainer.validate`` scores the default merge

    def on_validation_epoch_start(self) -> None:
        self.task_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.last_scores = self.task_metrics.compute(dict.fromkeys(self.tasks_by_index))
        self.task_metrics.reset()
        reference = self.reference if self._log_prefix == "merge" else None
        for name, value in summarize(self.last_scores, reference, self._log_prefix).items():
            self.log(name, value, add_dataloader_idx=False)
        if self.current is not None and self._log_prefix == "merge":
            if self.current[0] is not None:
                self.log("merge/k", float(self.current[0]), add_dataloader_idx=False)
            self.log("merge/lam", float(self.current[1]), add_dataloader_idx=False)

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

    def measure_finetuned(self, trainer: pl.Trainer | None, dataloaders: Dataloaders) -> Scores:
        """Each task's own fine-tuned score on its dataloaders (measured once per task, cached)."""
        loaders = self.check_dataloaders(dataloaders, require_all=False)
        self._log_prefix = "finetuned"
        try:
            for task, dls in loaders.items():
                if task not in self.reference:
                    self.load_task(task)
                    self.reference[task] = self.validate(trainer, {task: dls})[task]
        finally:
            self._log_prefix = "merge"
        return dict(self.reference)

    def evaluate(
        self,
        trainer: pl.Trainer | None,
        dataloaders: Dataloaders,
        k: float | None = None,
        lam: float | None = None,
        normalize: bool = False,
    ) -> Scores:
        """Merge with (k, lam) and score every task on its dataloaders; logs ``merge/<task>/<metric>``.

        Example:
            ``scores = module.evaluate(pl.Trainer(logger=False), {"a": dl_a, "b": dl_b}, k=0.2, lam=1.0)``
        """
        loaders = self.check_dataloaders(dataloaders)
        if normalize:
            self.measure_finetuned(trainer, dataloaders)
        return self.merge_then_validate(trainer, loaders, k, lam)

    def search(
        self,
        trainer: pl.Trainer | None,
        dataloaders: Dataloaders,
        method: str | None = None,
        k: Any = None,
        lam: Any = "paper",
        strategy: str = "grid",
        objective: Any = "mean",
        mode: str = "max",
        normalize: bool = True,
        resume: bool = True,
        on_candidate: Callable[[Candidate], None] | None = None,
    ) -> SearchResult:
        """Pick k and lam on the validation dataloaders, then leave the best merge applied.

        tau_m is computed once per k and each lam is applied in place; finished candidates of an
        earlier interrupted search (``self.search_result``, restored from checkpoints) are reused.

        Args:
            trainer: runs the validation loop (``None``: a plain loop, for use inside a running fit).
            dataloaders: ``{task: dataloader}`` for every task.
            method: merge method (default: the module's).
            k: a number, a list, ``"search"`` (0.1, 0.2, 0.3) or ``None`` (the module's k).
            lam: ``"paper"`` (the method's paper grid), a number or a list.
            strategy: ``"grid"`` or ``"coarse_to_fine"``.
            objective: ``"mean"``, ``"normalized"``, ``"mean:<metric>"`` or a callable of the scores.
            mode: ``"max"`` or ``"min"``.
            normalize: measure each fine-tuned model's score once, for normalized scores.
            resume: reuse finished candidates of ``self.search_result`` when it is the same search.
            on_candidate: called after each new candidate (e.g. to save progress).

        Example:
            ``best = module.search(trainer, {"a": dl_a, "b": dl_b}, k=[0.1, 0.2, 0.3], lam="paper")``
        """
        loaders = self.check_dataloaders(dataloaders)
        if isinstance(objective, str) and objective.startswith("normalized") and not normalize:
            raise ValueError("objective 'normalized' needs the fine-tuned scores: leave normalize=True")
        if method is not None and method != self.method:
            get_method(method)
            self.method, self._tau = method, None
        ks: list[float | None] = k_grid(self.k if k is None else k) if self.searches_k else [None]
        if k is not None and not self.searches_k:
            raise ValueError(f"method {self.method!r} has no k to search; leave k out")
        lams = lam_grid(self.method, lam)  # a method without lam (averaging) refuses any but its own here
        fingerprint = self.fingerprint(objective, mode, normalize)
        result = self.search_result if resume else None
        if result is None or result.fingerprint != fingerprint:
            result = SearchResult(method=self.method, fingerprint=fingerprint)
        self.search_result = result
        self.reference = {**result.reference, **self.reference}  # a resumed search keeps its references
        if normalize:
            result.reference = self.measure_finetuned(trainer, dataloaders)

        if trainer is not None:
            self.merge_device = trainer.strategy.root_device  # tau_m is computed there (before_k)

        def evaluate(kv: float | None, lv: float) -> Scores:
            return self.merge_then_validate(trainer, loaders, kv, lv)

        run_search(evaluate, ks, lams, strategy, objective, mode, result, on_candidate, before_k=self.task_vector)
        self.apply_merge(result.k, result.lam)
        return result

    def fingerprint(self, objective: Any = "mean", mode: str = "max", normalize: bool = True) -> str:
        """What candidate scores depend on; a stored search is reused only when this matches."""
        spec = {
            "method": self.method,
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
