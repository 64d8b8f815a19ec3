"""Lightning's conventions for MultiTaskMergeModule: logs a logger can plot, readable progress, metrics and forward_fn.

Every Trainer test runs under both packages (conftest's ``lightning_package`` fixture): ``pytorch_lightning``
(``lightning_ties.pytorch_lightning``) and the unified ``lightning.pytorch`` (``lightning_ties.pytorch``).
"""

from __future__ import annotations

import csv
import importlib
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError, MetricCollection
from torchmetrics.wrappers import MultitaskWrapper

import lightning_ties.evaluation as evaluation
from lightning_ties.io import merge_to
from lightning_ties.io import stream as stream_module

def trainer_of(pl, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)
    return pl.Trainer(**{**options, **kwargs})


def setup(seed: int = 0):
    """A 4 -> 3 linear classifier, two tasks that move it, and labelled data for each."""
    torch.manual_seed(seed)
    base = nn.Linear(4, 3)
    tasks = {t: {k: v + 0.3 * torch.randn_like(v) for k, v in base.state_dict().items()} for t in ("a", "b")}
    loaders = {}
    for i, t in enumerate(tasks):
        x = torch.randn(24, 4, generator=torch.Generator().manual_seed(10 + i))
        loaders[t] = DataLoader(TensorDataset(x, (x @ torch.randn(4, 3)).argmax(-1)), batch_size=8)
    return base, tasks, loaders


def csv_rows(logger) -> list[dict[str, str]]:
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- 1. logs a logger can plot ----------------------------------------------------------------
def test_search_logs_one_step_per_candidate_with_clean_values(lightning_package, tmp_path):
    pl, ours = lightning_package
    base, tasks, loaders = setup()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs")
    module = ours.MultiTaskMergeModule(base, tasks)
    trainer = trainer_of(pl, logger=logger)
    result = module.search(trainer, loaders, k=[0.1, 0.3], lam=[0.1, 0.2, 0.3], log_prefix="merge/val")
    module.evaluate(trainer, loaders, k=result.k, lam=result.lam, log_prefix="merge/test")
    logger.save()
    rows = csv_rows(logger)

    candidates = [r for r in rows if r.get("merge/val/lam")]
    assert [int(r["step"]) for r in candidates] == list(range(6))  # one step per candidate
    # the CSV holds the grid's own numbers, not float32's 0.30000001192092896
    assert [(r["merge/val/k"], r["merge/val/lam"]) for r in candidates] == [
        (k, lam) for k in ("0.1", "0.3") for lam in ("0.1", "0.2", "0.3")
    ]
    for r in candidates:
        digits = r["merge/val/a/acc"].replace("0.", "", 1).lstrip("0")
        assert len(digits) <= 9, r["merge/val/a/acc"]  # float32's shortest decimal (0.2916667), not 0.2916666567325592
    # the fine-tuned reference: one row, every task and the mean once
    reference = [r for r in rows if r.get("finetuned/val/mean/acc")]
    assert len(reference) == 1 and reference[0]["finetuned/val/a/acc"] and reference[0]["finetuned/val/b/acc"]
    # test scores have names of their own
    test_rows = [r for r in rows if r.get("merge/test/mean/acc")]
    assert len(test_rows) == 1 and not test_rows[0].get("merge/val/mean/acc")
    assert float(test_rows[0]["merge/test/lam"]) == result.lam
    # monitors and trainer.validate's return still see the numbers
    assert "merge/test/mean/acc" in trainer.callback_metrics


def test_metric_values_are_the_shortest_float32_decimal():
    from lightning_ties.core.metrics import TaskMetrics

    tm = TaskMetrics(["a"])
    tm.update("a", torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0, 1]))
    assert tm.compute()["a"]["acc"] == 0.6666667  # float(float32 2/3) would be 0.6666666865348816


def test_task_scorer_logs_validation_and_test_apart(lightning_package, tmp_path):
    pl, ours = lightning_package
    scoring = importlib.import_module(ours.__name__ + ".scoring")
    base, tasks, loaders = setup()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs")
    scorer = scoring.TaskScorer(ours.MultiTaskMergeModule(base, tasks), trainer_of(pl, logger=logger), tasks)
    scorer.score_base(loaders)
    scorer.score_merged(loaders, "ties", 0.2, 1.0)
    logger.save()
    rows = csv_rows(logger)
    steps = [int(r["step"]) for r in rows if r.get("merge/test/mean/acc")]
    assert steps == [0, 1] and not any(r.get("merge/mean/acc") for r in rows)


# ---- 2. progress people can read --------------------------------------------------------------
def test_search_reports_each_candidate_and_replaces_the_inner_bars(lightning_package, caplog, capsys):
    pl, ours = lightning_package
    base, tasks, loaders = setup()
    trainer = trainer_of(pl, enable_progress_bar=True)
    with caplog.at_level(logging.INFO):
        ours.MultiTaskMergeModule(base, tasks).search(trainer, loaders, k=0.2, lam=[0.5, 1.0], normalize=False)
    lines = [r.getMessage() for r in caplog.records if "search: candidate" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("ties search: candidate 1 of 2: k=0.2, lam=0.5, objective=")
    assert "best so far" in lines[1] and lines[1].startswith("ties search: candidate 2 of 2: k=0.2, lam=1,")
    err = capsys.readouterr().err
    assert "ties search" in err and "Validation" not in err  # one bar over candidates, no bar per pass
    assert trainer.progress_bar_callback.is_enabled  # the trainer's own bar is given back


class RecordingBar:
    """Stands in for tqdm: records the total, the descriptions and how far it got in each."""

    bars: list[RecordingBar] = []

    def __init__(self, total=None, desc="", **_kwargs) -> None:
        self.total, self.n, self.phases = total, 0, [[desc, 0]]
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n
        self.phases[-1][1] = self.n

    def set_description(self, desc, refresh=True):
        self.phases.append([desc, self.n])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("scope, passes", [("global", 2), ("per_tensor", 1)])
def test_merge_to_counts_the_threshold_pass_too(tmp_path, monkeypatch, scope, passes):
    base = {f"l{i}.weight": torch.zeros(8) for i in range(5)}
    models = [{k: torch.randn(8) for k in base} for _ in range(2)]
    RecordingBar.bars = []
    monkeypatch.setattr(stream_module, "tqdm", RecordingBar)
    merge_to(tmp_path / "m.safetensors", base, models, k=0.5, scope=scope, progress=True)
    (bar,) = RecordingBar.bars
    size = 5 * 8 * 4  # the bar counts bytes of merged output: five float32 tensors of 8
    assert bar.total == passes * size and bar.n == passes * size
    if passes == 2:  # the threshold pass moved the bar through every tensor before the merge began
        assert bar.phases[0] == ["thresholds", size] and bar.phases[-1][0] == "merging"


# ---- 3. metrics and forward_fn ----------------------------------------------------------------
def test_multitask_wrapper_and_collections_are_accepted_as_given(lightning_package):
    pl, ours = lightning_package
    base, tasks, loaders = setup()
    plain = ours.MultiTaskMergeModule(base, tasks).evaluate(trainer_of(pl), loaders, k=0.2, lam=1.0)
    base, tasks, loaders = setup()
    wrapper = MultitaskWrapper({
        "a": evaluation.ArgmaxAccuracy(),
        "b": MetricCollection({"acc": evaluation.ArgmaxAccuracy(), "again": evaluation.ArgmaxAccuracy()}),
    })
    scores = ours.MultiTaskMergeModule(base, tasks, metrics=wrapper).evaluate(trainer_of(pl), loaders, k=0.2, lam=1.0)
    assert scores == {"a": {"acc": plain["a"]["acc"]}, "b": {"acc": plain["b"]["acc"], "again": plain["b"]["acc"]}}


def test_forward_fn_is_told_the_task_so_each_task_uses_its_own_head(lightning_package):
    pl, ours = lightning_package
    base, tasks, loaders = setup()
    heads = {"a": nn.Identity(), "b": nn.Linear(3, 3)}  # b's head: its own, outside the merged model
    seen = []

    def forward_fn(model, batch, task):
        seen.append(task)
        x, y = batch
        return heads[task](model(x)), y

    scores = ours.MultiTaskMergeModule(base, tasks, forward_fn=forward_fn).evaluate(trainer_of(pl), loaders, k=0.2, lam=1.0)
    assert set(seen) == {"a", "b"} and set(scores) == {"a", "b"}
    # by hand: task b through its head
    x, y = next(iter(DataLoader(loaders["b"].dataset, batch_size=24)))
    with torch.no_grad():
        expected = (heads["b"](base(x)).argmax(-1) == y).float().mean().item()
    assert scores["b"]["acc"] == pytest.approx(expected, abs=1e-6)


def test_two_argument_forward_fn_still_works(lightning_package):
    pl, ours = lightning_package
    base, tasks, loaders = setup()
    scores = ours.MultiTaskMergeModule(base, tasks, metrics=MeanSquaredError(),
                                       forward_fn=lambda model, batch: (model(batch[0]), torch.zeros(len(batch[0]), 3)))
    assert set(scores.evaluate(trainer_of(pl), loaders, k=0.2, lam=1.0)) == {"a", "b"}


class NoLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 3)

    def forward(self, x):
        return {"hidden": self.inner(x)}  # no logits anywhere


def test_output_without_logits_names_forward_fn(lightning_package):
    pl, ours = lightning_package
    _, _, loaders = setup()
    base = NoLogits()
    tasks = {t: {k: v + 0.1 for k, v in base.state_dict().items()} for t in ("a", "b")}
    with pytest.raises(TypeError, match=r"no logits.*task 'a'.*pass forward_fn"):
        ours.MultiTaskMergeModule(base, tasks).evaluate(trainer_of(pl), loaders, k=0.2, lam=1.0)


# ---- 4. one accuracy, one batch convention ----------------------------------------------------
def test_one_accuracy_for_the_whole_package(lightning_package):
    _, ours = lightning_package
    assert ours.ArgmaxAccuracy is evaluation.ArgmaxAccuracy
    learned = importlib.import_module("lightning_ties.core.learned.objectives")
    assert ours.learned.split_batch is evaluation.split_batch
    assert learned.split_batch is evaluation.split_batch and learned.logits_of is evaluation.logits_of


def test_dict_batches_with_any_target_key_are_scored(lightning_package):
    pl, ours = lightning_package
    base, tasks, loaders = setup()

    class Keyed(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inputs):
            return self.inner(inputs)

    model = Keyed(base)
    tasks = {t: {f"inner.{k}": v for k, v in sd.items()} for t, sd in tasks.items()}
    dict_loaders = {t: DataLoader([{"inputs": x, "targets": y} for x, y in dl], batch_size=None) for t, dl in loaders.items()}
    scores = ours.MultiTaskMergeModule(model, tasks).evaluate(trainer_of(pl), dict_loaders, k=0.2, lam=1.0)
    fresh_base, fresh_tasks, fresh_loaders = setup()  # base above was merged into in place
    expected = ours.MultiTaskMergeModule(fresh_base, fresh_tasks).evaluate(trainer_of(pl), fresh_loaders, k=0.2, lam=1.0)
    assert scores == expected  # the same numbers as (x, y) batches
