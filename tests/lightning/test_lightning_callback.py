"""TiesMerging through real Trainer.fit runs: fit-end merge against the ties_merge oracle, heads, apply, state."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from conftest import (
    Classifier,
    CountValidations,
    Recorder,
    fine_tune,
    pretrained,
    quiet_trainer,
    task_data,
)

from lightning_ties import TiesMerging, task_arithmetic, ties_merge


@pytest.fixture(scope="module")
def shared_tasks():
    """Base init and tasks a, b fine-tuned from it (same 3-class output: a shared-output model)."""
    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    return base, {"a": fine_tune(base, seed=1), "b": fine_tune(base, seed=2)}


def fit_task_c(merging: TiesMerging, classes: int = 3, epochs: int = 1, val: bool = True, **trainer_kwargs):
    recorder = Recorder()
    model = pretrained(classes=classes)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[recorder, merging], **trainer_kwargs)
    trainer.fit(model, task_data(3, classes), task_data(3, classes) if val else None)
    return model, recorder.state, trainer


def assert_state_close(actual: dict, expected: dict, keys=None):
    for key in keys or expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key)


def test_fit_end_merge_equals_ties_merge_of_the_three_models(shared_tasks):
    base, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c", k=[0.1, 0.2], lam=[0.8, 1.0, 1.2],
                          val_dataloaders={"a": task_data(1), "b": task_data(2)})
    model, finetuned, _ = fit_task_c(merging)
    result = merging.result
    assert len(result.candidates) == 6 and set(result.reference) == {"a", "b", "c"}
    oracle = ties_merge(base, [tasks["a"], tasks["b"], finetuned], k=result.k, lam=result.lam)
    assert_state_close(model.state_dict(), oracle)  # apply="merged": the module holds the merge
    assert result.best.objective == max(c.objective for c in result.candidates)
    assert "lam" in result.table and result.best.scores["c"]["acc"] >= 0


def test_other_registry_methods_work_through_the_callback(shared_tasks):
    base, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c", method="task_arithmetic", lam=[0.3, 0.5],
                          val_dataloaders={"a": task_data(1), "b": task_data(2)}, normalize=False)
    model, finetuned, _ = fit_task_c(merging)
    assert merging.result.k is None and merging.result.lam in (0.3, 0.5)
    oracle = task_arithmetic(base, [tasks["a"], tasks["b"], finetuned], lam=merging.result.lam)
    assert_state_close(model.state_dict(), oracle)


def test_base_is_captured_before_any_step(shared_tasks):
    base, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c")
    _, _, trainer = fit_task_c(merging, val=False)
    # issue 19: without save_dir the base goes to a folder under default_root_dir, checkpoints only reference it
    state = merging.state_dict()
    assert state["base"] is None and Path(state["base_ref"]["path"]).parent == merging.output_dir
    assert Path(merging.output_dir).parent == Path(trainer.default_root_dir) / "ties_merging"
    assert_state_close(load_file(state["base_ref"]["path"]), base)


def test_per_task_heads_are_kept_apart():
    base = {k: v.clone() for k, v in pretrained(classes=4).state_dict().items()}
    tasks = {"a": fine_tune(base, seed=1, classes=3), "b": fine_tune(base, seed=2, classes=5)}
    merging = TiesMerging(tasks=tasks, task="c", lam=[1.0, 1.2],
                          val_dataloaders={"a": task_data(1, 3), "b": task_data(2, 5)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, finetuned, _ = fit_task_c(merging, classes=4)
        oracle = ties_merge(base, [tasks["a"], tasks["b"], finetuned], k=0.2, lam=merging.result.lam)
    assert_state_close(model.state_dict(), oracle, keys=["body.0.weight", "body.0.bias"])
    # the module ends with its own (task c) head, untouched by the merge
    assert_state_close(model.state_dict(), finetuned, keys=["head.weight", "head.bias"])
    assert set(merging.result.best.scores) == {"a", "b", "c"}


def test_apply_keep_writes_the_merge_and_keeps_fine_tuned_weights(shared_tasks, tmp_path):
    base, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c", apply="keep", save_dir=str(tmp_path))
    model, finetuned, _ = fit_task_c(merging, val=False)
    assert_state_close(model.state_dict(), finetuned)
    written = load_file(tmp_path / "merged.safetensors")
    assert_state_close(written, ties_merge(base, [tasks["a"], tasks["b"], finetuned], k=0.2, lam=1.0))
    assert json.loads((tmp_path / "search.json").read_text())["chosen"] == [0.2, 1.0]


def test_no_validation_data_uses_the_paper_recipe_and_says_so(shared_tasks):
    _, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c", k=[0.1, 0.3], lam="search")
    fit_task_c(merging, val=False)
    assert (merging.result.k, merging.result.lam) == (0.2, 1.0)
    assert merging.result.reason.startswith("no validation data: paper recipe k=0.2, lam=1.0")
    assert merging.result.candidates == []


def test_fixed_k_and_lam_without_data_for_every_task_are_applied_unscored(shared_tasks):
    base, tasks = shared_tasks
    merging = TiesMerging(tasks=tasks, task="c", k=0.3, lam=1.4)
    model, finetuned, _ = fit_task_c(merging)  # only task c has validation data
    assert merging.result.reason == "validation data for some tasks only: fixed k=0.3, lam=1.4, not scored"
    assert_state_close(model.state_dict(), ties_merge(base, [tasks["a"], tasks["b"], finetuned], k=0.3, lam=1.4))


def test_on_demand_merge_after_fit_and_from_a_callback_during_fit(shared_tasks):
    base, tasks = shared_tasks
    loaders = {"a": task_data(1), "b": task_data(2)}

    class MergeMidway(pl.Callback):
        def __init__(self, merging):
            self.merging, self.result, self.weights_after = merging, None, None

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                before = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.result = self.merging.merge(trainer, pl_module)
                assert_state_close(pl_module.state_dict(), before)  # training goes on from fine-tuned weights

    merging = TiesMerging(tasks=tasks, task="c", lam=[1.0], val_dataloaders=loaders, apply="merged")
    midway = MergeMidway(merging)
    model = pretrained()
    trainer = quiet_trainer(max_epochs=2, callbacks=[midway, merging])
    trainer.fit(model, task_data(3), task_data(3))
    assert midway.result is not None and set(midway.result.best.scores) == {"a", "b", "c"}
    # after fit, on demand again: a new merge of the final weights
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    again = merging.merge(trainer, model)
    assert again.best is not None
    oracle = ties_merge(base, [tasks["a"], tasks["b"], snapshot], k=0.2, lam=1.0)
    assert_state_close(model.state_dict(), oracle)


def test_every_n_val_epochs_logs_the_merge_and_restores_fine_tuned_weights(shared_tasks):
    _, tasks = shared_tasks
    loaders = {"a": task_data(1), "b": task_data(2)}
    logged = {}

    class Spy(pl.Callback):  # after TiesMerging in the list: sees the weights once its hook is done
        def on_validation_epoch_start(self, trainer, pl_module):
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

        def on_validation_epoch_end(self, trainer, pl_module):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("merge/")})
            assert_state_close(pl_module.state_dict(), self.before)  # fine-tuned weights are back

    merging = TiesMerging(tasks=tasks, task="c", val_dataloaders=loaders, every_n_val_epochs=1, lam=[1.0])
    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[merging, Spy()])
    trainer.fit(pretrained(), task_data(3), task_data(3))
    assert {"merge/a/acc", "merge/b/acc", "merge/c/acc", "merge/mean/acc"} <= set(logged)


def test_a_run_resumed_from_its_checkpoint_continues_an_interrupted_search(shared_tasks, tmp_path):
    _, tasks = shared_tasks
    loaders = {"a": task_data(1), "b": task_data(2)}
    lams = [0.8, 1.0, 1.2, 1.4, 1.6]

    def callbacks(merging, *extra):
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        return [merging, ckpt, *extra]

    class Interrupt(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            result = getattr(pl_module, "search_result", None)
            if result is not None and len(result.candidates) == 2:
                raise KeyboardInterrupt  # pre-empted mid-search

    merging = TiesMerging(tasks=tasks, task="c", lam=lams, val_dataloaders=loaders, save_dir=str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks(merging, Interrupt()), enable_checkpointing=True)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning shuts down gracefully, then exits
        trainer.fit(pretrained(), task_data(3), task_data(3))
    assert len(json.loads((tmp_path / "search_progress.json").read_text())["candidates"]) == 2

    resumed = TiesMerging(tasks=tasks, task="c", lam=lams, val_dataloaders=loaders, save_dir=str(tmp_path))
    counter = CountValidations()
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks(resumed, counter), enable_checkpointing=True)
    trainer.fit(pretrained(seed=5), task_data(3), task_data(3), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert counter.count == len(lams) - 2  # no training epoch left; references and 2 candidates reused
    assert len(resumed.result.candidates) == len(lams)
    # the base came back through the checkpoint's reference to save_dir/base.safetensors, not from the
    # (differently initialised) new module; the checkpoint holds the reference, not the tensors
    assert_state_close(resumed._base_state, shared_tasks[0])
    state = resumed.state_dict()
    assert state["base"] is None and state["base_ref"]["path"] == str((tmp_path / "base.safetensors").resolve())


def test_state_dict_round_trip():
    merging = TiesMerging(tasks={"a": "a.safetensors"}, task="c")
    merging._base_state = {"w": torch.ones(2)}
    restored = TiesMerging(tasks={"a": "a.safetensors"}, task="c")
    restored.load_state_dict(merging.state_dict())
    assert_state_close(restored.state_dict()["base"], {"w": torch.ones(2)})


def test_progress_of_another_run_is_not_reused(shared_tasks, tmp_path):
    _, tasks = shared_tasks
    loaders = {"a": task_data(1), "b": task_data(2)}
    first = TiesMerging(tasks=tasks, task="c", lam=[1.0, 1.2], val_dataloaders=loaders, save_dir=str(tmp_path))
    fit_task_c(first)
    second = TiesMerging(tasks=tasks, task="c", lam=[1.0, 1.2], val_dataloaders=loaders, save_dir=str(tmp_path),
                         objective="normalized")
    fit_task_c(second)
    assert second.result.fingerprint != first.result.fingerprint and len(second.result.candidates) == 2


class Stepped(Classifier):
    """Fails the test if a training step runs (bad input must be refused before)."""

    def training_step(self, batch, batch_idx):
        raise AssertionError("a training step ran before the bad input was refused")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: TiesMerging(tasks=t, task="c", lam="search", val_dataloaders={"a": task_data(1)}),
         r"task\(s\) \['b'\] have no validation dataloader"),
        (lambda t: TiesMerging(tasks=t, task="c", base={"other.weight": torch.zeros(2)}),
         r"base: its keys do not match the module's.*'other\.weight'.*'body\.0\.bias'"),
        (lambda t: TiesMerging(tasks={"a": {"x.weight": torch.zeros(2)}}, task="c"), r"a: its keys do not match the module's"),
    ],
)
def test_bad_input_is_refused_before_any_training_step(shared_tasks, make, message):
    _, tasks = shared_tasks
    merging = make(tasks)
    with pytest.raises(ValueError, match=message):
        quiet_trainer(max_epochs=1, callbacks=[merging]).fit(Stepped(), task_data(3), task_data(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(val_dataloaders={"zzz": "loader"}), r"unknown task\(s\) \['zzz'\]"),
        (dict(lam=[]), r"lam=\[\]: the grid is empty"),
        (dict(k=[]), r"k=\[\]: the grid is empty"),
        (dict(apply="both"), "apply must be one of \['merged', 'keep'\]"),
        (dict(apply="keep"), "pass save_dir"),
        (dict(task="a"), "this run's task"),
        (dict(tasks={}), "nothing to merge with"),
        (dict(method="fisher"), "unknown merge method 'fisher'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    args = {"tasks": {"a": "a.safetensors", "b": "b.safetensors"}, "task": "c", **kwargs}
    with pytest.raises(ValueError, match=message):
        TiesMerging(**args)


def test_deepspeed_is_refused_by_isinstance_subclasses_included():
    class MyDeepSpeed(pl.strategies.DeepSpeedStrategy):  # a user's subclass (deepspeed itself is not installed)
        def __init__(self) -> None:
            pl.strategies.DDPStrategy.__init__(self)

    class FakeTrainer:
        strategy = MyDeepSpeed()

    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy"):
        TiesMerging(tasks={"a": {}}, task="c").setup(FakeTrainer(), None, "fit")
