"""Learned coefficients start from a searched scale, are pulled toward it, and pick layer vs tensor on the hold-out."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import ties_merge
from lightning_ties.core.search import run_search
from lightning_ties.lightning.learned import LearnedMergeModule, learn_coefficients

import conftest

QUIET = {**conftest.QUIET, "num_sanity_val_steps": 0}
U = torch.tensor([[1.0, 2.0]])  # the task vector's weight; its bias is 1


class Regressor(pl.LightningModule):
    """One layer ``fc.`` (a weight and a bias): per layer one coefficient, per tensor two."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x).squeeze(-1)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


TASK = {"a": {"fc.weight": U.clone(), "fc.bias": torch.tensor([1.0])}}


def regression(weight_scale: float, bias_scale: float, seed: int, n: int = 64) -> DataLoader:
    """Targets of the merge with coefficients (weight_scale, bias_scale) on the task vector: the loss' minimum."""
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, weight_scale * (x @ U[0]) + bias_scale), batch_size=16)


def learn(dataloaders, quiet=True, **kwargs):
    defaults = dict(method="ties", k=1.0, objective="validation_step", lr=0.1, max_epochs=6, trainer_kwargs=QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return learn_coefficients(Regressor(), TASK, dataloaders, **{**defaults, **kwargs})


# ---- the start ------------------------------------------------------------------------------------
def test_a_search_result_is_the_start_its_lam_and_k_the_first_merge():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    tasks = {t: {k: v + 0.3 * torch.randn_like(v) for k, v in base.state_dict().items()} for t in "ab"}
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4)
    search = run_search(lambda k, lam: {"a": {"acc": -abs(lam - 1.7) - abs(k - 0.5)}}, [0.2, 0.5], [0.8, 1.7, 2.5])
    module = LearnedMergeModule(base, tasks, {t: loader for t in tasks}, lam=search, holdout=0.0)
    assert torch.equal(module.coefficients.detach(), torch.full((2, 2), 1.7))
    expected = ties_merge(base, list(tasks.values()), k=0.5, lam=1.7)
    for key, value in module.merged_state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lam='search' is learn_coefficients'"):
        LearnedMergeModule(base, tasks, {t: loader for t in tasks}, lam="search", holdout=0.0)


def test_lam_search_starts_at_the_grid_scale_with_the_lowest_holdout_loss():
    data = regression(2.0, 2.0, seed=0)  # the best uniform scale is 2.0, inside TIES' grid 0.8 .. 2.5
    result = learn(data_for(data), lam="search", max_epochs=1, lr=1e-6)
    assert result.initial_coefficients.flatten().tolist() == [pytest.approx(2.0)]
    searched = [h for h in result.history if h["stage"] == "init"]
    assert 3 < len(searched) < 18  # coarse to fine: fewer passes than the 18 grid values
    with pytest.raises(ValueError, match="needs a hold-out"):
        learn(data_for(data), lam="search", holdout=0.0)


def data_for(loader: DataLoader) -> dict[str, DataLoader]:
    return {"a": loader}


def test_l2_pulls_toward_the_start_not_toward_one():
    data = data_for(regression(2.0, 2.0, seed=1))  # the loss alone pulls the coefficient to 2.0
    free = learn(data, lam=1.5, granularity="task", holdout=0.0, max_epochs=15)
    pulled = learn(data, lam=1.5, granularity="task", holdout=0.0, max_epochs=15, l2=1e4)
    assert float(free.coefficients) == pytest.approx(2.0, abs=0.1)
    assert float(pulled.coefficients) == pytest.approx(1.5, abs=0.02)
    module = LearnedMergeModule(Regressor(), TASK, data, k=1.0, objective="validation_step", l2=1e4, lr=0.1, holdout=0.0)
    module.start_from(1.5)  # the start moves the pull's centre
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(max_epochs=15, **QUIET).fit(module)
    assert float(module.coefficients.detach()) == pytest.approx(1.5, abs=0.02) and float(module.initial_coefficients) == 1.5


# ---- the granularity ------------------------------------------------------------------------------
def test_auto_keeps_per_tensor_coefficients_when_they_fit_the_holdout_better():
    # weight x2, bias x-1: one coefficient per layer cannot fit it, one per tensor can
    data = {"a": regression(2.0, -1.0, seed=2, n=160)}
    result = learn(data, lam=1.0, granularity="auto", max_epochs=20)
    assert result.groups == ["fc.weight", "fc.bias"] and result.report.params["granularity"] == "tensor"
    candidates = result.report.params["granularity_candidates"]
    assert candidates["tensor"] < candidates["layer"]
    assert {h["granularity"] for h in result.history} == {"layer", "tensor"}
    assert result.coefficients.flatten().tolist() == [pytest.approx(2.0, abs=0.3), pytest.approx(-1.0, abs=0.6)]


def test_auto_keeps_per_layer_coefficients_when_per_tensor_ones_do_not_beat_them_on_the_holdout():
    # The start (both x2) is exact on the hold-out; the fit part wants the bias x-3: every per-tensor
    # step away from the per-layer start is worse on the hold-out, so the tie goes to "layer".
    fit = {"a": regression(2.0, -3.0, seed=3)}
    hold = {"a": regression(2.0, 2.0, seed=4)}
    result = learn(fit, lam=2.0, granularity="auto", holdout=hold, max_epochs=6)
    assert result.groups == ["fc."] and result.report.params["granularity"] == "layer"
    assert result.coefficients.flatten().tolist() == [2.0]
    candidates = result.report.params["granularity_candidates"]
    assert candidates["layer"] == candidates["tensor"] == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="granularity='auto' is chosen on the hold-out"):
        learn(fit, granularity="auto", holdout=0.0)
    with pytest.raises(ValueError, match="unknown granularity 'block'.*auto"):
        learn(fit, granularity="block")
