"""Per-task metrics: routing, independence, summaries and objectives (hand-checked numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics import MeanSquaredError, MetricCollection

from lightning_ties.core.metrics import ArgmaxAccuracy, TaskMetrics, normalized, objective_value, summarize


def test_each_task_accumulates_only_its_own_batches():
    tm = TaskMetrics(["a", "b"])
    tm.update("a", torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 0]))
    tm.update("b", torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([2]))
    assert tm.compute() == {"a": {"acc": pytest.approx(2 / 3)}, "b": {"acc": 0.0}}
    tm.reset()
    tm.update("b", torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([2]))
    assert tm.compute(["b"]) == {"b": {"acc": 1.0}}


def test_a_template_collection_is_cloned_per_task_and_names_are_kept():
    template = MetricCollection({"mse": MeanSquaredError()})
    tm = TaskMetrics(["x.y", "z"], template)  # a dotted task name works (ModuleDict keys cannot hold dots)
    tm.update("x.y", torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    tm.update("z", torch.tensor([0.0]), torch.tensor([0.0]))
    assert tm.compute() == {"x.y": {"mse": 2.0}, "z": {"mse": 0.0}}
    assert tm.collection("z")["mse"] is not template["mse"]


def test_metric_mapping_must_name_exactly_the_tasks():
    with pytest.raises(ValueError, match=r"unknown \['c'\], missing \['b'\]"):
        TaskMetrics(["a", "b"], {"a": ArgmaxAccuracy(), "c": ArgmaxAccuracy()})
    with pytest.raises(TypeError, match="must be a torchmetrics Metric"):
        TaskMetrics(["a"], {"a": "accuracy"})
    with pytest.raises(KeyError, match="no metric for task 'q'"):
        TaskMetrics(["a"]).update("q", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


def test_argmax_accuracy_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"predictions of shape \(2, 3\) do not match targets of shape \(3,\)"):
        ArgmaxAccuracy().update(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_summary_names_and_normalized_scores():
    scores = {"a": {"acc": 0.6}, "b": {"acc": 0.9}}
    reference = {"a": {"acc": 0.8}, "b": {"acc": 0.9}}
    flat = summarize(scores, reference)
    assert flat["merge/a/acc"] == 0.6 and flat["merge/mean/acc"] == pytest.approx(0.75)
    assert flat["merge/a/normalized_acc"] == pytest.approx(0.75)
    assert flat["merge/mean/normalized_acc"] == pytest.approx((0.75 + 1.0) / 2)
    assert math.isnan(normalized({"a": {"acc": 0.5}}, {"a": {"acc": 0.0}})["a"]["acc"])  # no score to divide by


def test_objectives():
    scores = {"a": {"acc": 0.6, "f1": 0.2}, "b": {"acc": 0.8, "f1": 0.4}}
    assert objective_value("mean", scores) == pytest.approx(0.7)
    assert objective_value("mean:f1", scores) == pytest.approx(0.3)
    assert objective_value("normalized", scores, {"a": {"acc": 0.6}, "b": {"acc": 1.6}}) == pytest.approx(0.75)
    assert objective_value(lambda s: s["a"]["acc"], scores) == 0.6
    with pytest.raises(ValueError, match="needs the fine-tuned models' scores"):
        objective_value("normalized", scores)
    with pytest.raises(ValueError, match="'loss' is not computed for every task"):
        objective_value("mean:loss", scores)
    with pytest.raises(ValueError, match="unknown objective 'median'"):
        objective_value("median", scores)
