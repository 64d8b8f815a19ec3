"""Per-task metrics for multitask evaluation: one torchmetrics object per task, mean and normalized scores.

Each task gets its own clone of the metric (never one object shared by two dataloaders),
so torchmetrics accumulates and reduces across processes per task. Scores are summarised
under the names the loggers see: ``merge/<task>/<metric>``, ``merge/mean/<metric>``, and,
when the fine-tuned models' own scores are known, ``merge/<task>/normalized_<metric>`` and
``merge/mean/normalized_<metric>`` (merged score / the task's fine-tuned score, the number
merging papers compare across tasks).

Example:
    >>> import torch
    >>> tm = TaskMetrics(["a", "b"])
    >>> tm.update("a", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))
    >>> tm.update("b", torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    >>> scores = tm.compute()
    >>> scores
    {'a': {'acc': 0.5}, 'b': {'acc': 1.0}}
    >>> summarize(scores, reference={"a": {"acc": 1.0}, "b": {"acc": 0.5}})["merge/mean/normalized_acc"]
    1.25
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.wrappers import MultitaskWrapper

from ..evaluation.metrics import ArgmaxAccuracy

#: Scores of one evaluation: task -> metric name -> value.
Scores = dict[str, dict[str, float]]
#: ``metrics=`` of the multitask module: None (accuracy), a template, ``{task: metric}`` or a ``MultitaskWrapper``.
MetricsArg = Metric | MetricCollection | Mapping[str, Metric | MetricCollection] | MultitaskWrapper | None


def _as_collection(metric: Metric | MetricCollection, task: str) -> MetricCollection:
    if isinstance(metric, MetricCollection):
        return metric.clone()
    if isinstance(metric, Metric):
        return MetricCollection({_metric_name(metric): metric.clone()})
    raise TypeError(f"metric for task {task!r} must be a torchmetrics Metric or MetricCollection, got {type(metric).__name__}")


def _metric_name(metric: Metric) -> str:
    return "acc" if isinstance(metric, ArgmaxAccuracy) else type(metric).__name__


class TaskMetrics(nn.Module):
    """One metric collection per task, routed by task name.

    Args:
        tasks: the task names.
        metrics: ``None`` (arg-max accuracy, named ``acc``), one ``Metric``/``MetricCollection``
            used as a template (cloned per task), a mapping task -> metric (each cloned, so
            the same object may be given for several tasks without being shared), or torchmetrics'
            ``MultitaskWrapper`` (its per-task metrics, read as that mapping).

    What metrics receive: ``preds`` are the model's logits, shape ``[batch, classes]`` (what
    :func:`~lightning_ties.evaluation.logits_of` takes from the model's output), and ``target``
    the class indices. A torchmetrics ``Binary*`` metric (``BinaryAccuracy``, ``BinaryF1Score``...)
    receives instead the positive class's probability, ``softmax(logits)[:, 1]``, for two
    columns (thresholded at 0.5, this is the arg-max), or the logit itself for one column; a
    ``Binary*`` metric on more than two columns, or mixed with other metrics in one collection,
    is an error at the first update naming the task and the metric.

    Example:
        >>> tm = TaskMetrics(["a"])
        >>> tm.update("a", torch.tensor([[2.0, 1.0]]), torch.tensor([0]))
        >>> tm.compute()["a"]["acc"]
        1.0
    """

    def __init__(self, tasks: Iterable[str], metrics: MetricsArg = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        if isinstance(metrics, MultitaskWrapper):
            # the wrapper's update takes dicts of all tasks at once; each task here is updated on its own
            metrics = dict(metrics.task_metrics.items())
        if isinstance(metrics, Mapping):
            unknown = sorted(set(metrics) - set(self.tasks))
            missing = [t for t in self.tasks if t not in metrics]
            if unknown or missing:
                raise ValueError(
                    f"metrics must name exactly the tasks {self.tasks}: unknown {unknown}, missing {missing}"
                )
            per_task = {t: _as_collection(metrics[t], t) for t in self.tasks}
        else:
            template = ArgmaxAccuracy() if metrics is None else metrics
            per_task = {t: _as_collection(template, t) for t in self.tasks}
        # ModuleDict keys cannot contain dots; task names are stored under an index instead.
        self.collections = nn.ModuleDict({str(i): per_task[t] for i, t in enumerate(self.tasks)})

    def collection(self, task: str) -> MetricCollection:
        try:
            return self.collections[str(self.tasks.index(task))]  # type: ignore[return-value]
        except ValueError:
            raise KeyError(f"no metric for task {task!r}; tasks are {self.tasks}") from None

    def update(self, task: str, preds: Any, target: Any) -> None:
        collection = self.collection(task)
        collection.update(_binary_preds(collection, preds, task), target)

    def compute(self, tasks: Iterable[str] | None = None) -> Scores:
        """Scores of ``tasks`` (default all), reduced across processes by torchmetrics."""
        out: Scores = {}
        for task in self.tasks if tasks is None else tasks:
            values = self.collection(task).compute()
            out[task] = {name: _to_float(v, task, name) for name, v in values.items()}
        return out

    def reset(self) -> None:
        for c in self.collections.values():
            c.reset()


def _is_binary(metric: Metric) -> bool:
    """torchmetrics' binary task metrics (``BinaryAccuracy``, ``BinaryF1Score``, ``BinaryAUROC``...)."""
    return type(metric).__name__.startswith("Binary")


def _binary_preds(collection: MetricCollection, preds: Any, task: str) -> Any:
    """``preds`` as the collection's metrics take them: the positive class for ``Binary*`` metrics."""
    binary = [name for name, m in collection.items(keep_base=True, copy_state=False) if _is_binary(m)]
    if not binary or not isinstance(preds, torch.Tensor) or preds.ndim != 2:
        return preds
    others = [name for name, m in collection.items(keep_base=True, copy_state=False) if not _is_binary(m)]
    if others:
        raise ValueError(
            f"task {task!r}: binary metric(s) {binary} and other metric(s) {others} share one collection, but they "
            f"take different preds (the positive class's probability vs the logits, shape {tuple(preds.shape)}); "
            "give every metric of a task the same kind (e.g. MulticlassAccuracy(num_classes=2) with MulticlassF1Score)"
        )
    if preds.shape[1] == 1:
        return preds[:, 0]
    if preds.shape[1] == 2:
        return preds.float().softmax(dim=1)[:, 1]
    raise ValueError(
        f"task {task!r}: binary metric(s) {binary} need two classes, but the model gives {preds.shape[1]} "
        f"logits per sample (metrics receive logits of shape [batch, classes]); use the Multiclass* metrics "
        f"with num_classes={preds.shape[1]}"
    )


def _to_float(value: Any, task: str, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return shortest_float(value)
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"metric {name!r} of task {task!r} returned {type(value).__name__}; scores must be scalars")


def shortest_float(value: torch.Tensor) -> float:
    """A one-element tensor as the Python float with the fewest digits that is the same value in its dtype.

    ``float()`` of a float32 2/3 gives 0.6666666865348816 (its exact binary value); this gives
    0.6666667, which reads back as the same float32, so scores, tables and logs show clean numbers.

    Example:
        >>> shortest_float(torch.tensor(2 / 3)), shortest_float(torch.tensor(0.3))
        (0.6666667, 0.3)
    """
    exact = float(value)
    if not value.is_floating_point() or value.dtype == torch.float64 or not math.isfinite(exact):
        return exact
    for digits in range(1, 18):
        short = float(f"{exact:.{digits}g}")
        if torch.tensor(short, dtype=value.dtype).item() == exact:
            return short
    return exact


def metric_names(scores: Scores) -> list[str]:
    """Metric names present for every task, in the first task's order."""
    tasks = list(scores.values())
    if not tasks:
        return []
    return [n for n in tasks[0] if all(n in t for t in tasks[1:])]


def normalized(scores: Scores, reference: Scores) -> Scores:
    """Merged score / the task's fine-tuned score, for every task and metric the reference has.

    Example:
        >>> normalized({"a": {"acc": 0.45}}, {"a": {"acc": 0.9}})
        {'a': {'acc': 0.5}}
    """
    out: Scores = {}
    for task, values in scores.items():
        ref = reference.get(task, {})
        out[task] = {n: (v / ref[n] if ref[n] != 0 else float("nan")) for n, v in values.items() if n in ref}
    return out


def summarize(scores: Scores, reference: Scores | None = None, prefix: str = "merge") -> dict[str, float]:
    """Flatten per-task scores into logger names, with the mean over tasks (and normalized scores).

    Example:
        >>> summarize({"a": {"acc": 0.5}, "b": {"acc": 1.0}})
        {'merge/a/acc': 0.5, 'merge/b/acc': 1.0, 'merge/mean/acc': 0.75}
    """
    flat: dict[str, float] = {}
    for task, values in scores.items():
        for name, v in values.items():
            flat[f"{prefix}/{task}/{name}"] = v
    for name in metric_names(scores):
        flat[f"{prefix}/mean/{name}"] = sum(t[name] for t in scores.values()) / len(scores)
    if reference:
        norm = normalized(scores, reference)
        for task, values in norm.items():
            for name, v in values.items():
                flat[f"{prefix}/{task}/normalized_{name}"] = v
        if all(t in reference for t in scores):
            for name in metric_names(norm):
                flat[f"{prefix}/mean/normalized_{name}"] = sum(t[name] for t in norm.values()) / len(norm)
    return flat


#: What a k/lam search maximises (or minimises): ``"mean"``, ``"normalized"``, ``"mean:<metric>"`` or
#: ``fn(scores) -> float``. (Not :data:`lightning_ties.core.learned.objectives.LossObjective`, a training loss.)
SearchObjective = str | Callable[[Scores], float]


def objective_value(objective: SearchObjective, scores: Scores, reference: Scores | None = None) -> float:
    """The number a search maximises (or minimises): ``"mean"``, ``"normalized"`` or a callable.

    ``"mean"`` and ``"normalized"`` average the first metric shared by every task; ``"mean:<name>"``
    and ``"normalized:<name>"`` pick the metric by name.

    Example:
        >>> objective_value("mean", {"a": {"acc": 0.5}, "b": {"acc": 1.0}})
        0.75
    """
    if callable(objective):
        return float(objective(scores))
    kind, _, name = objective.partition(":")
    if kind not in ("mean", "normalized"):
        raise ValueError(f"unknown objective {objective!r}; use 'mean', 'normalized', 'mean:<metric>' or a callable")
    if kind == "normalized":
        if not reference:
            raise ValueError("objective 'normalized' needs the fine-tuned models' scores (normalize=True)")
        scores = normalized(scores, reference)
    names = metric_names(scores)
    if not names:
        raise ValueError("no metric is shared by every task; pass a callable objective")
    name = name or names[0]
    if name not in names:
        raise ValueError(f"objective metric {name!r} is not computed for every task; available: {names}")
    return sum(t[name] for t in scores.values()) / len(scores)
