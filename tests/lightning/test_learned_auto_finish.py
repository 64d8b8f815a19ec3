"""``method="auto"`` for learned coefficients: finish an auto search on the best method that splits into
shares, and score the search's winner on the same hold-out (``result.compared``, ``result.kept``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import merge
from lightning_ties.core.learned.start import prefer_on_holdout
from lightning_ties.core.search import Candidate, SearchResult
from lightning_ties.lightning.learned import learn_coefficients

import conftest

QUIET = {**conftest.QUIET, "num_sanity_val_steps": 0}


def suite():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    shared = {k: torch.randn_like(v) for k, v in base.state_dict().items()}  # the tasks mostly agree: merging helps
    tasks = {t: {k: v + shared[k] + 0.2 * torch.randn_like(v) for k, v in base.state_dict().items()} for t in "ab"}

    def loader(task: str, seed: int) -> DataLoader:
        """Inputs labelled by the task's own fine-tuned model: the merges closer to it score better."""
        x = torch.randn(24, 4, generator=torch.Generator().manual_seed(seed))
        y = functional_call(base, tasks[task], (x,)).argmax(-1)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    return base, tasks, {t: loader(t, i) for i, t in enumerate(tasks)}, {t: loader(t, 10 + i) for i, t in enumerate(tasks)}


def auto_result(winner: str = "iso_c") -> SearchResult:
    """An auto search's result: ``winner`` best, then TSV-M (best at 0.9), then TIES."""
    scores = {"a": {"acc": 0.5}}
    return SearchResult(method="ties", methods=["ties", "tsv", "iso_c"], candidates=[
        Candidate(0.2, 1.0, scores, 0.70, "ties"), Candidate(None, 0.9, scores, 0.80, "tsv"),
        Candidate(None, 1.5, scores, 0.78, "tsv"), Candidate(None, 2.0, scores, 0.90 if winner == "iso_c" else 0.60, "iso_c")])


def learn(base, tasks, fit, holdout, **kwargs):
    options = {"granularity": "task", "lr": 0.05, "max_epochs": 2, "trainer_kwargs": QUIET, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return learn_coefficients(base, tasks, fit, holdout=holdout, **options)


def holdout_loss(base, state, loaders) -> float:
    """The mean over tasks of each task's example-weighted cross-entropy, computed here by hand."""
    losses = []
    for loader in loaders.values():
        total = n = 0.0
        for x, y in loader:
            total += float(nn.functional.cross_entropy(functional_call(base, state, (x,)), y, reduction="sum"))
            n += len(y)
        losses.append(total / n)
    return sum(losses) / len(losses)


def test_auto_learns_on_the_best_method_with_shares_and_scores_the_winner_on_the_same_holdout():
    base, tasks, fit, holdout = suite()
    result = learn(base, tasks, fit, holdout, method="auto", lam=auto_result())
    assert result.report.params["base_method"] == "tsv"  # iso_c won but has no shares
    assert result.initial_coefficients.flatten().tolist() == [pytest.approx(0.9)] * 2  # TSV-M's best lam, not the winner's
    assert list(result.compared) == ["learned", "iso_c"]
    assert (result.compared["iso_c"]["k"], result.compared["iso_c"]["lam"]) == (None, 2.0)
    iso_c = merge(base.state_dict(), list(tasks.values()), "iso_c", lam=2.0)
    assert result.compared["iso_c"]["loss"] == pytest.approx(holdout_loss(base, dict(iso_c), holdout), rel=1e-5)
    learned = min(h["loss"] for h in result.history if h["stage"] != "compare")
    assert result.compared["learned"]["loss"] == pytest.approx(learned)
    assert result.kept == prefer_on_holdout(result.compared)
    assert result.to_dict()["kept"] == result.kept and "iso_c" in result.to_dict()["compared"]
    assert all(h["stage"] != "compare" for h in result.history)  # the winner's pass is no candidate


def test_a_winner_that_splits_into_shares_is_learned_on_and_nothing_is_compared():
    base, tasks, fit, holdout = suite()
    result = learn(base, tasks, fit, holdout, method="auto", lam=auto_result(winner="tsv"))
    assert result.report.params["base_method"] == "tsv" and result.compared == {} and result.kept == "learned"


def test_the_winner_is_kept_when_the_holdout_prefers_it():
    base, tasks, fit, holdout = suite()
    # a start far from any good merge (TSV-M at lam 0.1, frozen by lr ~ 0) loses to iso_c at 2.0 on the hold-out
    far = SearchResult(method="tsv", methods=["tsv", "iso_c"], candidates=[
        Candidate(None, 0.1, {}, 0.5, "tsv"), Candidate(None, 2.0, {}, 0.9, "iso_c")])
    result = learn(base, tasks, fit, holdout, method="auto", lam=far, lr=1e-9, max_epochs=1)
    iso_c, learned = result.compared["iso_c"], result.compared["learned"]
    assert iso_c["acc"] > learned["acc"] and result.kept == "iso_c"


def test_auto_without_a_search_or_without_shares_is_refused_by_name():
    base, tasks, fit, holdout = suite()
    with pytest.raises(ValueError, match="method='auto' learns on the best method of a search: pass lam="):
        learn(base, tasks, fit, holdout, method="auto", lam=1.0)
    only_iso = SearchResult(method="iso_c", candidates=[Candidate(None, 2.0, {}, 0.9, "iso_c")])
    with pytest.raises(ValueError, match=r"tried no method that splits into per-task shares \(tried: \['iso_c'\]\)"):
        learn(base, tasks, fit, holdout, method="auto", lam=only_iso)
    with pytest.raises(ValueError, match=r"no candidate of method='ties' \(it tried \['iso_c'\]\)"):
        learn(base, tasks, fit, holdout, method="ties", lam=only_iso)
