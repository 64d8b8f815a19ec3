"""A search interrupted at fit end and resumed from a Lightning checkpoint alone (no save_dir).

Given an uninterrupted run's choice and merged weights, when the same run crashes after N finished
candidates and a fresh callback resumes ``trainer.fit(model, ckpt_path=...)`` from the checkpoint
Lightning wrote (``OnExceptionCheckpoint``, ``ModelCheckpoint``'s ``last.ckpt``, or
``trainer.save_checkpoint`` from another callback mid-search), then it picks the same (k, lam),
holds the same weights, and validates only the candidates that were not finished.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from conftest import (
    Classifier,
    CountValidations,
    Recorder,
    fine_tune,
    pretrained,
    quiet_trainer,
    task_data,
)

from lightning_ties import TiesMerging

KS = [0.1, 0.3]
LAMS = [0.4, 0.8, 1.2, 1.6]
CANDIDATES = len(KS) * len(LAMS)


@pytest.fixture(scope="module")
def tasks():
    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    return {"a": fine_tune(base, seed=1), "b": fine_tune(base, seed=2)}


def merging(tasks) -> TiesMerging:
    return TiesMerging(tasks=tasks, task="c", k=KS, lam=LAMS, val_dataloaders={"a": task_data(1), "b": task_data(2)})


def fit(callbacks, tmp_path, model=None, ckpt_path=None) -> pl.LightningModule:
    model = model if model is not None else pretrained()
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, task_data(3), task_data(3), ckpt_path=ckpt_path)
    return model


class CrashMidSearch(pl.Callback):
    """Raises from the search's validation once ``n`` candidates are finished (optionally saving a checkpoint first)."""

    def __init__(self, n: int, save_to=None) -> None:
        self.n, self.save_to = n, save_to

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        result = getattr(pl_module, "search_result", None)  # the search's evaluator, not the fitted module
        if trainer.state.fn == "validate" and result is not None and len(result.candidates) == self.n:
            if self.save_to is not None:
                trainer.save_checkpoint(self.save_to)
            raise RuntimeError("simulated crash mid-search")


@pytest.fixture(scope="module")
def uninterrupted(tasks, tmp_path_factory):
    callback = merging(tasks)
    model = fit([callback], tmp_path_factory.mktemp("uninterrupted"))
    assert len(callback.result.candidates) == CANDIDATES
    return callback.result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def resume_and_check(tasks, uninterrupted, tmp_path, ckpt_path, finished: int) -> None:
    resumed, counter = merging(tasks), CountValidations()
    model = fit([resumed, counter], tmp_path, model=pretrained(seed=5), ckpt_path=ckpt_path)
    result, weights = uninterrupted
    assert (resumed.result.k, resumed.result.lam) == (result.k, result.lam)
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert len(resumed.result.candidates) == CANDIDATES
    # no reference (fine-tuned score) and no finished candidate is validated again
    assert counter.count == CANDIDATES - finished


def test_resume_from_lightnings_on_exception_checkpoint(tasks, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([merging(tasks), OnExceptionCheckpoint(tmp_path), CrashMidSearch(3)], tmp_path)
    resume_and_check(tasks, uninterrupted, tmp_path, tmp_path / "on_exception.ckpt", finished=3)


def test_resume_from_a_checkpoint_saved_by_another_callback_mid_search(tasks, uninterrupted, tmp_path):
    recorder = Recorder()  # before TiesMerging: sees the fine-tuned weights at fit end
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([recorder, merging(tasks), CrashMidSearch(2, save_to=tmp_path / "mid.ckpt")], tmp_path)
    saved = torch.load(tmp_path / "mid.ckpt", map_location="cpu", weights_only=True)
    # the checkpoint holds the fine-tuned module (its own keys), not the candidate being scored
    assert set(saved["state_dict"]) == set(recorder.state)
    for key, value in recorder.state.items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=0, msg=key)
    resume_and_check(tasks, uninterrupted, tmp_path, tmp_path / "mid.ckpt", finished=2)


class Wide(Classifier):
    """A module whose constructor arguments travel in its checkpoints (``save_hyperparameters``)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__(hidden=hidden)
        self.save_hyperparameters()


def test_a_checkpoint_saved_mid_search_loads_as_the_users_own_module(tmp_path):
    base = {k: v.clone() for k, v in Wide(hidden=12).state_dict().items()}
    wide_tasks = {"a": fine_tune_wide(base, 1), "b": fine_tune_wide(base, 2)}
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([recorder, merging(wide_tasks), CrashMidSearch(2, save_to=tmp_path / "mid.ckpt")], tmp_path,
            model=Wide(hidden=12))
    loaded = Wide.load_from_checkpoint(tmp_path / "mid.ckpt")  # its hyper-parameters, not the evaluator's
    assert loaded.hparams.hidden == 12
    for key, value in recorder.state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def fine_tune_wide(base: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Wide(hidden=12)
    model.load_state_dict(base)
    quiet_trainer(max_epochs=1).fit(model, task_data(seed))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_last_ckpt_after_a_crash_mid_search(tasks, uninterrupted, tmp_path):
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([merging(tasks), last, CrashMidSearch(3)], tmp_path)
    resume_and_check(tasks, uninterrupted, tmp_path, tmp_path / "ckpt" / "last.ckpt", finished=3)


def test_a_failed_merge_leaves_the_fine_tuned_weights_in_the_module(tasks, tmp_path):
    recorder, model = Recorder(), pretrained()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([recorder, merging(tasks), CrashMidSearch(2)], tmp_path, model=model)
    for key, value in recorder.state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
