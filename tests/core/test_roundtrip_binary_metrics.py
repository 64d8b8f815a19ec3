"""torchmetrics' Binary* metrics get the positive class from the module's 2-column logits."""

from __future__ import annotations

import pytest
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score, MulticlassAccuracy
from torchmetrics.wrappers import MultitaskWrapper

from lightning_ties.core.metrics import TaskMetrics

LOGITS = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0], [0.5, 0.4], [0.0, 2.0]])
TARGET = torch.tensor([0, 0, 1, 1, 1])
PREDICTED = LOGITS.argmax(1)  # [0, 1, 1, 0, 1]


def test_binary_accuracy_and_f1_score_on_two_column_logits_are_the_argmax_scores():
    metrics = TaskMetrics(["a", "b"], MetricCollection([BinaryAccuracy(), BinaryF1Score()]))
    metrics.update("a", LOGITS[:3], TARGET[:3])
    metrics.update("a", LOGITS[3:], TARGET[3:])  # accumulated over batches
    metrics.update("b", LOGITS, TARGET)
    scores = metrics.compute()
    tp, fp, fn = 2, 1, 1  # by hand from PREDICTED vs TARGET
    assert scores["a"] == scores["b"] == {"BinaryAccuracy": 0.6, "BinaryF1Score": pytest.approx(2 * tp / (2 * tp + fp + fn))}


def test_a_single_column_logit_is_passed_as_is_and_a_multitask_wrapper_works():
    wrapper = MultitaskWrapper({"a": BinaryAccuracy(), "b": MulticlassAccuracy(num_classes=2)})
    metrics = TaskMetrics(["a", "b"], wrapper)
    metrics.update("a", torch.tensor([[3.0], [-2.0]]), torch.tensor([1, 1]))
    metrics.update("b", LOGITS, TARGET)
    assert metrics.compute() == {"a": {"BinaryAccuracy": 0.5}, "b": {"MulticlassAccuracy": pytest.approx(0.5833333)}}


def test_a_binary_metric_on_more_than_two_classes_fails_early_saying_what_preds_are():
    metrics = TaskMetrics(["a"], BinaryAccuracy())
    with pytest.raises(ValueError, match=r"task 'a': binary metric.*3 logits per sample.*\[batch, classes\].*num_classes=3"):
        metrics.update("a", torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_binary_and_other_metrics_in_one_collection_are_refused_by_name():
    metrics = TaskMetrics(["a"], MetricCollection([BinaryAccuracy(), MulticlassAccuracy(num_classes=2)]))
    with pytest.raises(ValueError, match=r"BinaryAccuracy.*MulticlassAccuracy.*share one collection"):
        metrics.update("a", LOGITS, TARGET)
