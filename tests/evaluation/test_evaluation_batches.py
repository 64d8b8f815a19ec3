"""The one batch convention and the one accuracy (lightning_ties.evaluation), specified case by case."""


import pytest
import torch
from torch import nn

from lightning_ties.evaluation import (
    TARGET_KEYS,
    ArgmaxAccuracy,
    logits_of,
    predict_and_target,
    split_batch,
)

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
Y = torch.tensor([1, 0])


def test_a_pair_is_inputs_then_target():
    args, kwargs, target = split_batch((X, Y))
    assert args[0] is X and kwargs == {} and target is Y


def test_elements_after_the_target_are_ignored():
    args, kwargs, target = split_batch([X, Y, torch.arange(2)])
    assert len(args) == 1 and args[0] is X and target is Y


def test_inputs_alone_have_no_target():
    assert split_batch(X) == ((X,), {}, None)
    assert split_batch((X,)).target is None


def test_tuple_and_dict_inputs_become_positional_and_keyword_arguments():
    assert split_batch(((X, X), Y)).args == (X, X)
    assert split_batch(({"pixel_values": X}, Y)).kwargs == {"pixel_values": X}


@pytest.mark.parametrize("key", TARGET_KEYS)
def test_every_target_key_is_popped_from_a_dict_batch(key):
    args, kwargs, target = split_batch({"input_ids": X, key: Y})
    assert args == () and kwargs == {"input_ids": X} and target is Y


def test_labels_win_over_the_other_target_keys():
    _, kwargs, target = split_batch({"x": X, "y": Y, "labels": Y + 5})
    assert target.tolist() == [6, 5] and kwargs == {"x": X, "y": Y}


def test_a_dict_without_target_is_unlabelled():
    assert split_batch({"input_ids": X}).target is None


@pytest.mark.parametrize("batch", [3, "text", ()])
def test_other_batches_are_refused_with_what_to_do(batch):
    with pytest.raises(ValueError, match="forward_fn"):
        split_batch(batch)


class _Out:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("wrap", [lambda t: t, _Out, lambda t: {"logits": t}, lambda t: (t, "cache")])
def test_logits_are_found_in_every_output_shape(wrap):
    assert logits_of(wrap(X)) is X


def test_an_output_without_logits_names_its_type():
    with pytest.raises(TypeError, match="str"):
        logits_of("no logits")


def test_predict_and_target_calls_the_model_with_the_split_inputs():
    model = nn.Linear(2, 3)
    logits, target = predict_and_target(model, {"input": X, "labels": Y})
    assert torch.equal(logits, model(X)) and target is Y


def test_accuracy_by_hand():
    m = ArgmaxAccuracy()
    # arg-max 1, 0, 1 against targets 1, 1, -100 (ignored): 1 of 2 counted right
    m.update(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1, -100]))
    assert m.compute().item() == 0.5
    m.update(torch.tensor([0, 1]), torch.tensor([0, 1]))  # labels instead of logits
    assert m.compute().item() == 0.75


def test_accuracy_without_ignore_index_counts_every_target():
    m = ArgmaxAccuracy(ignore_index=None)
    m.update(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, -100]))
    assert m.compute().item() == 0.5


def test_accuracy_is_torchmetrics_micro_multiclass_accuracy():
    from torchmetrics.classification import MulticlassAccuracy

    gen = torch.Generator().manual_seed(0)
    ours, theirs = ArgmaxAccuracy(), MulticlassAccuracy(num_classes=7, average="micro", ignore_index=-100)
    for _ in range(5):
        logits = torch.randn(4, 9, 7, generator=gen)
        target = torch.randint(0, 7, (4, 9), generator=gen)
        target[0, :3] = -100
        ours.update(logits, target)
        theirs.update(logits.reshape(-1, 7), target.reshape(-1))  # torchmetrics wants classes in dim 1
    assert ours.compute().item() == pytest.approx(theirs.compute().item(), abs=1e-7)


def test_accuracy_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2,\)"):
        ArgmaxAccuracy().update(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
