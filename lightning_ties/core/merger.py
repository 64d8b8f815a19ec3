"""The merge core: :class:`Merger`, task checkpoints merged into one model and scored per task, without Lightning.

Everything :class:`~lightning_ties.pytorch.MultiTaskMergeModule`, the ``TiesMerging`` callback and
the CLI need from a merge lives here, so the Lightning shells only add what a ``Trainer`` calls:

- sources matched to the model's own keys (:mod:`.matching`), the plan, each task's head
  (:class:`~.heads.HeadStore`);
- tau_m per (method, k), computed once and kept on the merge device (:meth:`Merger.task_vector`);
  a lam search re-applies it in place (:meth:`Merger.apply_merge`);
- a task's own fine-tuned weights or head put in place (:meth:`Merger.load_task`, :meth:`Merger.use_task`);
- the batch convention (:meth:`Merger.predict_and_target`), dataloader checks, a plain scoring
  loop (:meth:`Merger.score`), and the search loop over :class:`~.options.SearchOptions` with the
  fingerprint that decides whether stored progress may be resumed (:meth:`Merger.search`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> base = nn.Linear(2, 2)
    >>> tasks = {t: {k: v + 0.1 for k, v in base.state_dict().items()} for t in ("a", "b")}
    >>> merger = Merger(base, tasks, k=1.0)
    >>> merger.apply_merge(lam=1.0)
    >>> data = DataLoader(TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), batch_size=2)
    >>> sorted(merger.score({"a": [data], "b": [data]}))
    ['a', 'b']
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed.merge import ShardedMerge
from ..evaluation.batches import move_to_device, predict_and_target
from ..merging import MergedTaskVector, MergeOptions, apply_task_vector, as_source, get_method, method_task_vector
from ..merging.sources import TensorSource, copy_state
from .heads import HeadsArg, HeadStore, differing_keys, exact_patterns
from .keys import match_to_module, module_ties, with_ties
from .matching import check_model_keys, match_sources
from .meta_init import build_on_meta, check_fillable, fill_from_base, is_on_meta
from .metrics import MetricsArg, Scores, TaskMetrics
from .options import SearchOptions, params_for
from .progress import preparation_progress
from .regmean import regmean_task_vector
from .auto import auto_search
from .search import Candidate, SearchResult, walk_grid
from .sharded_model import ShardedModel

#: ``forward_fn(model, batch, task) -> (preds, target)``; a two-argument ``forward_fn(model, batch)`` works too.
ForwardFn = Callable[..., tuple[torch.Tensor, Any]]
Dataloaders = Mapping[str, Any]
_MISMATCH_WARNING = r".*key\(s\) differ across models and are not merged.*"


class Merger:
    """Merge task checkpoints into ``model`` and score the merge per task, without Lightning.

    Shared-output models (one output serves every task) are scored as they are. Per-task heads
    (keys whose shape or presence differs across tasks, or keys matching ``heads``) are never
    merged: each task is scored with its own head, swapped in before its batches.

    Args:
        base: the pretrained model (theta_init): module, state dict, path or source.
        tasks: task name -> fine-tuned model (module, state dict, path or source). Base and tasks are
            matched to ``model``'s own keys (:mod:`lightning_ties.core.keys`): a ``.ckpt`` of the
            same LightningModule as is, an inner model's ``save_pretrained`` folder under its attribute
            (``model.``); ``{"path": ..., "prefix": "model."}`` chooses by hand.
        model: the module to run; default ``base`` when it is an ``nn.Module``. Its weights are
            overwritten by the merge; ``base``'s values are snapshotted first. Given a function that builds it
            (``lambda: Net(config)``), it is built on the meta device and gets the base's values where it runs
            (:meth:`materialize`; each rank its rows once sharded: never whole, :mod:`.meta_init`).
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
    ) -> None:
        self.tasks = check_task_names(tasks)
        if model is None:
            if not isinstance(base, nn.Module):
                raise ValueError(
                    "base is not a module, so pass model= (the architecture to evaluate, or a function of no "
                    "arguments that builds it; its weights are replaced)"
                )
            model = base
        # a factory builds it on the meta device: no parameter memory until materialize()
        self.model = model = model if isinstance(model, nn.Module) else build_on_meta(model)
        get_method(method)
        self.method, self.k, self.lam = method, k, lam
        self.method_params = dict(method_params or {})
        #: the method ``method_params`` are written for (a name it lacks is an error); others get only the names they
        #: have (``scope`` reaches TIES, not TSV-M); None: every method (the caller checked them: ``TiesMerging``)
        self.params_method: str | None = method
        self.include = include
        self.forward_fn = forward_fn
        self._forward_takes_task = takes_task(forward_fn) if forward_fn is not None else False
        base_src = with_ties(match_to_module(_snapshot_source(base), list(model.state_dict()), label="base"),
                             module_ties(model))  # a file holds a tied tensor under each name: merged once
        matched = match_sources(model, base_src, tasks, heads, include, exclude)
        self.base_source, self.task_sources, self.plan = base_src, matched.tasks, matched.plan
        detected = differing_keys(self.plan, list(model.state_dict()))
        self.head_keys = sorted(set(matched.named_heads) | set(detected))
        self._exclude = exact_patterns(self.head_keys, exclude)
        check_model_keys(model, base_src, self.plan)
        check_fillable(model, base_src, self.head_keys, dict(zip(self.tasks, self.task_sources)))  # if on meta
        self.metrics = TaskMetrics(self.tasks, metrics)
        self.head_store = HeadStore(self.head_keys, dict(zip(self.tasks, self.task_sources)))  # read on first use
        #: where tau_m is computed and kept (the Trainer's device when one runs the evaluation); None: the model's
        self.merge_device: torch.device | None = None
        #: the (k, lam) in ``model`` now; ``None``: not a merge (the base, or a task's own weights)
        self.current: tuple[float | None, float] | None = None
        #: each task's fine-tuned score, measured once (normalized objectives divide by it)
        self.reference: Scores = {}
        #: the last search (finished candidates): an interrupted search resumes from it
        self.search_result: SearchResult | None = None
        #: the last ``{task: [dataloader, ...]}`` scored: where methods that need data (RegMean) read examples
        self.data_loaders: dict[str, list[Any]] | None = None
        #: extra facts a stored search's scores depend on (the callback adds the fine-tuned weights' checksum)
        self.fingerprint_extra: dict[str, Any] = {}
        self._base_merged: dict[str, torch.Tensor] | None = None
        self._tau: tuple[tuple[str, float | None], MergedTaskVector] | None = None
        #: the task whose head is in ``model`` (``None``: unknown, the next :meth:`use_task` swaps)
        self.head_task: str | None = None
        #: ``model`` sharded over ranks (:meth:`use_shards`): merges run on each rank's rows; None: whole
        self.sharded: ShardedModel | None = None

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """Fill a model built on the meta device (``model=`` a factory) from the base on ``device`` (sharded by FSDP2:
        each rank its rows, collective); the entry points call it on the CPU if nothing did (Lightning: ``configure_model``)."""
        if is_on_meta(self.model):
            fill_from_base(self.model, self.base_source, torch.device(device))

    def use_shards(self, view_of: Callable[[], Any]) -> None:
        """From now on ``model`` is sharded (FSDP2, FSDP1; ``view_of()``: this rank's view): merges, task weights and
        heads run on each rank's rows (:class:`~.sharded_model.ShardedModel`), collectively, as one process would."""
        self.sharded = ShardedModel(view_of, self.base_source, dict(zip(self.tasks, self.task_sources)), self.head_keys)
        self._tau, self._base_merged = None, None  # whole tensors; the weights in place (current, head) stay valid

    # ---- merging -----------------------------------------------------------------------------
    @property
    def searches_k(self) -> bool:
        """Whether the current method has a trim density k."""
        return get_method(self.method).has_k

    @property
    def compute_device(self) -> torch.device:
        """Where tau_m is computed and kept: ``merge_device``, else the model's device."""
        return self.merge_device if self.merge_device is not None else module_device(self.model)

    def task_vector(self, k: float | None = None) -> MergedTaskVector | ShardedMerge:
        """tau_m of the current method for ``k`` (once per (method, k), cached; sharded: this rank's rows of it)."""
        self.materialize()
        k = (self.k if k is None else k) if self.searches_k else None
        key = (self.method, k)
        if self._tau is not None and self._tau[0] == key:
            return self._tau[1]
        self._tau = None  # free the previous tau_m before computing the next one
        params = dict(self.method_params)
        if self.method != self.params_method:  # written for another method, or for every one: the names this one has
            params = params_for(self.method, params)
        if get_method(self.method).needs_data and self.sharded is None:  # RegMean: Gram matrices from each task's data
            tau = regmean_task_vector(self, self.data_loaders, params)
        else:
            given_k = params.pop("k", None)  # a k among method_params yields to the searched one
            options = MergeOptions(self.method, k=given_k if k is None else k, scope=params.pop("scope", None),
                                   params=params, include=self.include, exclude=self._exclude)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_MISMATCH_WARNING)  # heads are reported by the merger
                if self.sharded is not None:  # this rank's rows (a method that needs data refuses in there)
                    tau = self.sharded.merge(options, self.compute_device)
                else:
                    with preparation_progress(self.base_source, options, self.plan.merge_keys) as base:
                        tau = method_task_vector(base, self.task_sources, options, device=self.compute_device)
        self._tau = (key, tau)  # on the compute device: a lam search applies it there, in place
        return tau

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
        if self.sharded is not None:
            tau.apply_(float(lam))  # this rank's rows, into its shards
        else:  # the base's merged tensors are read once
            base = self._base_merged = self._base_merged or {k: self.base_source.get(k) for k in self.plan.merge_keys}
            apply_task_vector(base, tau, float(lam), out=self.model, device=module_device(self.model))
        self.current = ((self.k if k is None else k) if self.searches_k else None, float(lam))

    def use_method(self, method: str) -> None:
        """Make ``method`` the one :meth:`task_vector` and :meth:`apply_merge` use."""
        if method != self.method:
            self.method, self._tau = method, None

    def load_task(self, task: str) -> None:
        """Put task ``task``'s own fine-tuned weights (merged keys and head) into ``model``."""
        index = self.task_index(task)  # an unknown task is a KeyError naming the tasks
        self.materialize()
        if self.sharded is not None:
            self.sharded.write_task(task, self.plan.merge_keys)
        else:
            src, targets = self.task_sources[index], self.model.state_dict(keep_vars=True)
            with torch.no_grad():
                for key in self.plan.merge_keys:
                    targets[key].data.copy_(src.get(key))
        self.current = None
        self.head_task = None
        self.use_task(task)

    def use_task(self, task: str) -> None:
        """Swap ``task``'s head into ``model`` (no-op for shared-output models)."""
        if not self.head_keys or self.head_task == task:
            return
        self.task_index(task)  # an unknown task is a KeyError naming the tasks
        self.materialize()
        if self.sharded is not None:
            self.sharded.use_head(task)
        else:
            self.head_store.swap_into(self.model, task)
        self.head_task = task

    def task_index(self, task: str) -> int:
        """``task``'s position in :attr:`tasks`; a KeyError naming the tasks for an unknown one."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f"unknown task {task!r}; tasks are {self.tasks}") from None

    # ---- scoring -----------------------------------------------------------------------------
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

    def update_metrics(self, task: str, batch: Any) -> None:
        """Score one batch of ``task`` with its head in place (what a validation step does)."""
        self.use_task(task)
        preds, target = self.predict_and_target(batch, task)
        self.metrics.update(task, preds, target)

    def score(self, loaders: Mapping[str, list[Any]]) -> Scores:
        """One pass over ``loaders`` with the weights in place, in a plain loop on the model's device.

        For use where a Trainer's loop cannot run (inside a running fit) and without Lightning.
        """
        self.materialize()
        device = next(self.model.parameters()).device
        self.metrics.to(device)
        self.metrics.reset()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for task, dls in loaders.items():
                    for dl in dls:
                        for batch in dl:
                            self.update_metrics(task, move_to_device(batch, device))
            return self.metrics.compute(dict.fromkeys(loaders))
        finally:
            self.metrics.reset()
            self.model.train(was_training)

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

    def remember_data(self, loaders: dict[str, list[Any]]) -> None:
        """Keep ``loaders`` for methods that need data; a tau_m computed from other data is dropped."""
        same = self.data_loaders is not None and {t: [id(d) for d in ls] for t, ls in loaders.items()} == {
            t: [id(d) for d in ls] for t, ls in self.data_loaders.items()
        }
        if not same and self._tau is not None and get_method(self._tau[0][0]).needs_data:
            self._tau = None
        self.data_loaders = loaders

    # ---- the search --------------------------------------------------------------------------
    def fingerprint(
        self, objective: Any = "mean", mode: str = "max", normalize: bool = True, methods: Sequence[str] | None = None
    ) -> str:
        """What candidate scores depend on; a stored search is reused only when this matches.

        ``methods``: the methods searched; one method (the default: the merger's) gives the same
        fingerprint as before multi-method searches, so their stored progress still resumes.
        """
        methods = list(methods) if methods else [self.method]
        spec: dict[str, Any] = {
            "method": methods[0] if len(methods) == 1 else methods,
            "params": {k: repr(v) for k, v in sorted(self.method_params.items())},
            "tasks": [(t, s.label) for t, s in zip(self.tasks, self.task_sources)],
            "objective": objective if isinstance(objective, str) else getattr(objective, "__qualname__", "callable"),
            "mode": mode,
            "normalize": normalize,
            "metrics": {t: list(self.metrics.collection(t).keys()) for t in self.tasks},
            "extra": self.fingerprint_extra,
        }
        return json.dumps(spec, sort_keys=True)

    def start_search(self, options: SearchOptions, resume: bool = True) -> SearchResult:
        """The result a search with ``options`` fills: the stored one when it is the same search, else a new one."""
        fingerprint = self.fingerprint(options.objective, options.mode, options.normalize, methods=options.methods)
        result = self.search_result if resume else None
        if result is None or result.fingerprint != fingerprint:
            result = SearchResult(method=options.methods[0], fingerprint=fingerprint, methods=list(options.methods))
        self.search_result = result
        self.reference = {**result.reference, **self.reference}  # a resumed search keeps its references
        return result

    def search(
        self,
        options: SearchOptions,
        result: SearchResult,
        score: Callable[[float | None, float], Scores],
        on_candidate: Callable[[Candidate], None] | None = None,
        agree: Callable[[bool], bool] | None = None,
        before_k: Callable[[float | None], Any] | None = None,
        apply_best: Callable[[float | None, float], Any] | None = None,
    ) -> SearchResult:
        """Score every candidate of ``options`` not yet in ``result`` with ``score(k, lam)``; apply the best.

        ``before_k(k)`` runs before each (method, k)'s first new candidate (default: compute its tau_m); the best
        over every method is written by ``apply_best(k, lam)`` (default: :meth:`apply_merge`) and :attr:`method`
        becomes its method. ``options.auto``: the budgeted schedule of :func:`~.auto.auto_search`, whose budget
        decision every rank takes from ``agree`` (default: rank 0's, broadcast over the process group)."""
        if options.auto:
            def evaluate(method: str, k: float | None, lam: float) -> Scores:
                self.use_method(method)
                return score(k, lam)

            auto_search(evaluate, options.auto_grids(), options.objective, options.mode, result, options.budget_s,
                        on_candidate, agree=agree)
            return self._apply_best(result, apply_best or self.apply_merge)
        for method, (ks, lams) in options.grids(self.k).items():
            self.use_method(method)
            walk_grid(
                score, ks, lams, options.strategy, options.objective, options.mode, result, on_candidate,
                before_k=before_k or self.task_vector, method=method,
            )
        return self._apply_best(result, apply_best or self.apply_merge)

    def _apply_best(self, result: SearchResult, apply: Callable[[float | None, float], Any]) -> SearchResult:
        result.method = result.best_method
        self.use_method(result.method)
        apply(result.k, result.lam)
        return result


def check_task_names(tasks: Mapping[str, Any]) -> list[str]:
    """The task names of ``tasks``: a non-empty dict of names without ``/`` and other than ``mean``."""
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("tasks must be a non-empty dict task name -> fine-tuned model (module, state dict or path)")
    bad = [t for t in tasks if not isinstance(t, str) or not t or "/" in t or t == "mean"]
    if bad:
        raise ValueError(f"task names must be non-empty strings without '/' and not 'mean', got {bad}")
    return list(tasks)


def takes_task(fn: Callable[..., Any]) -> bool:
    """Whether ``forward_fn`` accepts a third argument (the task name); two-argument functions predate it."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call them the old way
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def _snapshot_source(base: Any) -> TensorSource:
    """Base as a source; a module's values are copied (the model is written over in place), tied weights as one."""
    if isinstance(base, nn.Module):
        return as_source(copy_state(base.state_dict()), "base")
    if isinstance(base, Mapping):  # may alias the model's own tensors (model.state_dict())
        return as_source(copy_state(base), "base")
    return as_source(base, "base")


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first floating-point tensor (CPU for a module without one).

    Example:
        >>> module_device(nn.Linear(1, 1)).type
        'cpu'
    """
    for t in module.state_dict().values():
        if t.is_floating_point():
            return t.device
    return torch.device("cpu")


__all__ = ["Dataloaders", "ForwardFn", "Merger", "check_task_names", "module_device", "takes_task"]
