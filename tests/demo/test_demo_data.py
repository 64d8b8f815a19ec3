"""The demo's data suite and training: real digits, hand-checked tasks, seeded splits, reproducible training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ties.demo.data import LABELS, TRANSFORMS, DigitsSuite, DigitsTask, dataloaders


def test_label_functions_match_their_names_on_every_digit():
    digits = np.arange(10)
    assert LABELS["parity"][0](digits).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert LABELS["ge5"][0](digits).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert LABELS["mod3"][0](digits).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert LABELS["loop"][0](digits).tolist() == [1, 0, 0, 0, 1, 0, 1, 0, 1, 1]
    assert LABELS["digit"][0](digits).tolist() == list(range(10))


def test_transforms_on_a_hand_made_image():
    img = np.arange(4, dtype=np.float32).reshape(1, 2, 2) / 4  # [[0, .25], [.5, .75]]
    assert TRANSFORMS["flip"](img).tolist() == [[[0.25, 0.0], [0.75, 0.5]]]
    assert TRANSFORMS["rot90"](img).tolist() == [[[0.25, 0.75], [0.0, 0.5]]]
    assert TRANSFORMS["rot180"](img).tolist() == [[[0.75, 0.5], [0.25, 0.0]]]
    assert TRANSFORMS["transpose"](img).tolist() == [[[0.0, 0.5], [0.25, 0.75]]]
    assert TRANSFORMS["invert"](img).tolist() == [[[1.0, 0.75], [0.5, 0.25]]]


def test_task_names_parse_and_bad_names_say_what_exists():
    assert DigitsTask.parse("parity_flip") == DigitsTask("parity_flip", "flip", "parity")
    assert DigitsTask.parse("mod3").transform == "identity" and DigitsTask.parse("mod3").num_classes == 3
    with pytest.raises(ValueError, match="unknown demo task 'parity_spin'.*transform one of"):
        DigitsTask.parse("parity_spin")


def test_splits_are_disjoint_cover_the_data_and_are_seeded():
    suite = DigitsSuite(seed=0)
    idx = suite._indices
    assert sum(len(v) for v in idx.values()) == 1797
    assert not set(idx["train"]) & set(idx["val"]) and not set(idx["val"]) & set(idx["test"])
    assert np.array_equal(DigitsSuite(seed=0)._indices["test"], idx["test"])
    assert not np.array_equal(DigitsSuite(seed=1)._indices["test"], idx["test"])


def test_every_task_reads_the_same_images_through_its_own_view():
    suite = DigitsSuite(seed=0)
    x_id, y_digit = suite.split("digit", "test")
    x_flip, y_parity = suite.split("parity_flip", "test")
    flipped = x_id.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)
    assert torch.equal(x_flip, flipped)
    assert torch.equal(y_parity, y_digit % 2)
    assert 0.0 <= float(x_id.min()) and float(x_id.max()) <= 1.0


def test_source_digits_filter_keeps_only_those_digits():
    _, y = DigitsSuite(seed=0).split("digit", "train", digits=[0, 1, 2, 3, 4])
    assert set(y.tolist()) == {0, 1, 2, 3, 4}


def test_bad_fractions_and_splits_are_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsSuite(val_fraction=0.0)
    with pytest.raises(ValueError, match="must be < 1"):
        DigitsSuite(val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        DigitsSuite().split("digit", "dev")


def test_dataloaders_entry_point_returns_one_loader_per_task():
    loaders = dataloaders(["parity", "ge5"], split="val", batch_size=1000)
    assert list(loaders) == ["parity", "ge5"]
    x, y = next(iter(loaders["ge5"]))
    assert x.shape[1] == 64 and set(y.tolist()) == {0, 1}


def test_training_is_reproducible_with_the_same_seed():
    from lightning_ties.config import DemoConfig, load_config
    from lightning_ties.demo.run import make_suite, quiet_lightning, torch_threads, train_models

    cfg = load_config(
        DemoConfig,
        overrides=[
            "tasks=[parity,ge5]",
            "model.hidden=8",
            "pretrain.epochs=1",
            "finetune.epochs=1",
            "data.train_limit=200",
        ],
    )
    with quiet_lightning(), torch_threads(1):
        base_a, fts_a, _ = train_models(cfg, make_suite(cfg), lambda _: None)
        base_b, fts_b, _ = train_models(cfg, make_suite(cfg), lambda _: None)
    for key, value in base_a.state_dict().items():
        assert torch.equal(value, base_b.state_dict()[key]), key
    for task in fts_a:
        for key, value in fts_a[task].items():
            assert torch.equal(value, fts_b[task][key]), (task, key)
        # fine-tuning moved the body and kept the task's probe head fixed in training
        assert not torch.equal(fts_a[task]["body.0.weight"], base_a.state_dict()["body.0.weight"])
