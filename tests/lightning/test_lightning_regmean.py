"""RegMean from the module: each task's Gram matrices on its own validation data, the closed form applied.

Given two tasks fine-tuned from one tiny MLP and a dataloader per task, when the module searches
with ``method="regmean"``, then the model holds exactly ``regmean_state_dict`` of the fine-tuned
weights with Gram matrices collected by hand on the same examples; without data, the plain engine
refuses RegMean with an error that says where it runs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from lightning_ties.lightning import MultiTaskMergeModule
from lightning_ties.merging import get_method, merge
from lightning_ties.merging.regmean import collect_grams, regmean_state_dict

from conftest import tiny_tasks, trainer

EXAMPLES = 16  # fewer than each loader holds: the module must stop where the hand collection stops



def _loader(seed: int) -> DataLoader:
    # each task's inputs have their own scale per feature, so the Gram matrices differ and RegMean != averaging
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 6, generator=g) * torch.linspace(0.2, 3.0, 6).roll(3 * seed)
    y = torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _expected(base: nn.Module, tasks: dict[str, dict], loaders: dict[str, DataLoader], alpha: float) -> dict:
    """RegMean by hand: load each task into a copy of the model, collect its Grams on the same examples."""
    grams = []
    for t, sd in tasks.items():
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        model.load_state_dict(sd)
        grams.append(collect_grams(model, loaders[t], max_examples=EXAMPLES)[0])
    assert sorted(grams[0]) == ["0.weight", "2.weight"]
    return regmean_state_dict(list(tasks.values()), grams, alpha)


def test_plain_engine_refuses_regmean_naming_where_it_runs() -> None:
    _, base_state, tasks = tiny_tasks()
    with pytest.raises(ValueError, match=r"needs each task's validation data.*MultiTaskMergeModule\.search"):
        merge(base_state, list(tasks.values()), method="regmean")
    m = get_method("regmean")
    assert m.needs_data and not m.decomposes and m.default_lam == 1.0 and m.parameters() == {"alpha": 0.9, "examples": 256}
    assert not get_method("ties").needs_data


def test_module_without_dataloaders_refuses_regmean() -> None:
    base, _, tasks = tiny_tasks()
    module = MultiTaskMergeModule(base, tasks, method="regmean")
    with pytest.raises(ValueError, match="needs each task's validation data"):
        module.apply_merge()


def test_search_regmean_applies_the_closed_form_on_each_tasks_own_examples() -> None:
    base, base_state, tasks = tiny_tasks()
    loaders = {"a": _loader(0), "b": _loader(1)}
    module = MultiTaskMergeModule(base, tasks, method="regmean", method_params={"alpha": 0.7, "examples": EXAMPLES})
    before_training = module.model.training

    result = module.search(None, loaders, method=["regmean"], normalize=False)

    assert [(c.method, c.k, c.lam) for c in result.candidates] == [("regmean", None, 1.0)]
    expected = _expected(base, tasks, loaders, alpha=0.7)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
    # the closed form, not averaging: the tasks' Grams differ, so the linear weights are not the mean
    mean = {k: (tasks["a"][k] + tasks["b"][k]) / 2 for k in base_state}
    assert not torch.allclose(module.model.state_dict()["0.weight"], mean["0.weight"], atol=1e-3)
    torch.testing.assert_close(module.model.state_dict()["0.bias"], mean["0.bias"])  # biases averaged
    assert module.model.training == before_training
    # collecting loads each task into the model; what was there is put back
    held = {k: v.clone() for k, v in module.model.state_dict().items()}
    module.merger._tau = None  # forget the cached tau_m: the next call collects the Grams again
    module.task_vector()
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, held[key]), key


def test_regmean_alpha_is_checked_before_any_data_pass() -> None:
    base, _, tasks = tiny_tasks()
    module = MultiTaskMergeModule(base, tasks, method="regmean", method_params={"alpha": 1.5})
    with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\], got 1.5"):
        module.search(None, {"a": _loader(0), "b": _loader(1)}, normalize=False)


def test_search_over_ties_and_regmean_reports_both_and_applies_the_best() -> None:
    base, base_state, tasks = tiny_tasks()
    loaders = {"a": _loader(0), "b": _loader(1)}
    # method_params are regmean's; the search passes ties only the parameters it has
    module = MultiTaskMergeModule(base, tasks, method="regmean", method_params={"examples": EXAMPLES})

    result = module.search(None, loaders, method=["ties", "regmean"], lam=[1.0], normalize=False)

    assert sorted((c.method, c.lam) for c in result.candidates) == [("regmean", 1.0), ("ties", 1.0)]
    best = max(result.candidates, key=lambda c: c.objective)  # ties to the first listed: ties
    if sum(c.objective == best.objective for c in result.candidates) > 1:
        best = next(c for c in result.candidates if c.method == "ties")
    assert (result.method, module.method) == (best.method, best.method)
    if best.method == "regmean":
        expected = _expected(base, tasks, loaders, alpha=0.9)
    else:
        expected = merge(base_state, list(tasks.values()), method="ties", k=0.2, lam=1.0)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_trainer_validate_driven_search_with_regmean() -> None:
    base, _, tasks = tiny_tasks()
    loaders = {"a": _loader(0), "b": _loader(1)}
    module = MultiTaskMergeModule(base, tasks, method="regmean", method_params={"examples": EXAMPLES})

    result = module.search(trainer(pl), loaders, method=["regmean"])  # normalize: fine-tuned scores too

    assert [c.method for c in result.candidates] == ["regmean"] and set(result.reference) == {"a", "b"}
    expected = _expected(base, tasks, loaders, alpha=0.9)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)


def test_the_callback_refuses_regmean_without_every_tasks_data_before_training():
    from conftest import Classifier, quiet_trainer, task_data

    from lightning_ties.lightning import TiesMerging

    class CountSteps(Classifier):
        steps = 0

        def training_step(self, batch, batch_idx):
            CountSteps.steps += 1
            return super().training_step(batch, batch_idx)

    other = {k: v + 0.1 for k, v in Classifier().state_dict().items()}
    merging = TiesMerging(tasks={"a": other}, task="b", method="regmean")
    with pytest.raises(ValueError, match=r"\['regmean'\] need a validation dataloader for every task"):
        quiet_trainer(max_epochs=1, callbacks=[merging]).fit(CountSteps(), task_data(0))
    assert CountSteps.steps == 0


def test_the_callback_merges_with_regmean_on_the_validation_dataloaders():
    from conftest import Classifier, Recorder, quiet_trainer, task_data

    from lightning_ties.lightning import TiesMerging

    torch.manual_seed(0)
    base = Classifier()
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
    merging = TiesMerging(tasks={"a": other}, task="b", method="regmean", val_dataloaders={"a": task_data(1)})
    finetuned = Recorder()
    model = Classifier()
    model.load_state_dict(base.state_dict())
    quiet_trainer(max_epochs=1, callbacks=[finetuned, merging]).fit(model, task_data(0), task_data(0))
    assert merging.result is not None and merging.result.method == "regmean"
    # the same RegMean as the module's on the same data: task "b" on this run's own val dataloader
    from lightning_ties.lightning import MultiTaskMergeModule

    reference = MultiTaskMergeModule(base.state_dict(), {"a": other, "b": finetuned.state}, model=Classifier())
    reference.search(None, {"a": task_data(1), "b": task_data(0)}, method=["regmean"], normalize=False)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert not torch.equal(model.state_dict()["body.0.weight"], finetuned.state["body.0.weight"])
