"""The merge core without Lightning: options checked once, the Merger's merge / score / search, the fit-end recipe,
search progress on disk and the captured base's file reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanSquaredError

from lightning_ties import ties_merge
from lightning_ties.core.base_state import base_reference, check_base_file
from lightning_ties.core.merger import Merger
from lightning_ties.core.options import SearchOptions
from lightning_ties.core.recipe import check_fit_data, fixed_choice
from lightning_ties.core.resume import read_progress, snapshot, write_progress
from lightning_ties.core.search import SearchResult


# ---- SearchOptions: every value checked once, then plain data ------------------------------------------
def test_options_resolve_each_methods_grids_and_count_the_candidates() -> None:
    options = SearchOptions.build(["ties", "task_arithmetic", "ties"], k=[0.1, 0.2], lam=[0.5, 1.0])
    assert options.methods == ("ties", "task_arithmetic")  # repeats dropped, order kept (ties go to the first)
    assert options.grids(default_k=0.3) == {"ties": ([0.1, 0.2], [0.5, 1.0]), "task_arithmetic": ([None], [0.5, 1.0])}
    assert options.total(default_k=0.3) == 2 * 2 + 1 * 2 and options.searching
    assert SearchOptions.build("ties", lam=1.0).grids(default_k=0.3) == {"ties": ([0.3], [1.0])}  # the merger's k
    assert not SearchOptions.build("ties", k=0.2, lam=1.0).searching
    assert SearchOptions.build("ties", lam=[1.0], strategy="coarse_to_fine").total(0.2) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="tie"), "tie"),
    (dict(method=[]), "non-empty list"),
    (dict(method="task_arithmetic", k=0.2), r"have no k to search; leave k out"),
    (dict(k=1.5), "k"),
    (dict(lam=[]), "lam"),
    (dict(objective="normalised"), "objective must be"),
    (dict(objective="normalized", normalize=False), "needs the fine-tuned scores"),
    (dict(mode="up"), r"mode must be one of \['max', 'min'\], got 'up'"),
    (dict(strategy="smart"), r"search_strategy must be one of \['grid', 'coarse_to_fine'\], got 'smart'"),
])
def test_options_refuse_bad_values_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchOptions.build(**kwargs)


def test_a_callers_default_k_is_ignored_not_refused_when_no_method_trims() -> None:
    options = SearchOptions.build("task_arithmetic", k=0.2, lam=1.0, strict_k=False)
    assert options.ks is None and options.grids(default_k=0.2) == {"task_arithmetic": ([None], [1.0])}


def test_options_are_frozen() -> None:
    options = SearchOptions.build("ties")
    with pytest.raises(AttributeError):
        options.mode = "min"  # type: ignore[misc]


# ---- the Merger: merge, score and search with no Lightning ------------------------------------------------
class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.w.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x)


def _data(target: float) -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(4, 2), torch.full((4, 1), target)), batch_size=2)


def test_the_merger_scores_a_merge_in_a_plain_loop_with_hand_checkable_numbers() -> None:
    # base w = 0, task vectors [1, 1] and [3, 3]: task arithmetic at lam 0.5 gives w = [2, 2], output 4 on x = [1, 1]
    base = Regressor()
    tasks = {"a": {"w.weight": torch.tensor([[1.0, 1.0]])}, "b": {"w.weight": torch.tensor([[3.0, 3.0]])}}
    merger = Merger(base, tasks, metrics=MeanSquaredError(), method="task_arithmetic")
    merger.apply_merge(lam=0.5)
    assert torch.equal(base.w.weight, torch.tensor([[2.0, 2.0]])) and merger.current == (None, 0.5)
    scores = merger.score({"a": [_data(4.0)], "b": [_data(6.0)]})
    assert scores == {"a": {"MeanSquaredError": 0.0}, "b": {"MeanSquaredError": 4.0}}
    merger.load_task("b")
    assert torch.equal(base.w.weight, torch.tensor([[3.0, 3.0]])) and merger.current is None


def test_the_merger_searches_computes_tau_once_per_k_and_applies_the_best() -> None:
    torch.manual_seed(0)
    base = nn.Linear(3, 2)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tasks = {t: {k: v + torch.randn_like(v) for k, v in base_state.items()} for t in ("a", "b")}
    merger = Merger(base, tasks)
    computed = []
    original = merger.task_vector
    merger.task_vector = lambda k=None: computed.append(k) or original(k)  # type: ignore[method-assign]
    options = SearchOptions.build("ties", k=[0.3, 0.6], lam=[0.5, 1.0, 1.5], normalize=False)
    result = merger.search(options, merger.start_search(options), lambda k, lam: {"a": {"acc": -abs(lam - 1.0) - k}})
    assert (result.k, result.lam) == (0.3, 1.0) and len(result.candidates) == 6
    assert computed.count(0.6) == 1  # tau_m once for the lam sweep of k = 0.6
    expected = ties_merge(base_state, list(tasks.values()), k=0.3, lam=1.0)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    # the same search again resumes: no candidate is scored twice
    again = merger.search(options, merger.start_search(options), lambda k, lam: pytest.fail("scored again"))
    assert again is result


def test_the_merger_refuses_dataloaders_for_unknown_or_missing_tasks() -> None:
    merger = Merger(Regressor(), {"a": {"w.weight": torch.ones(1, 2)}, "b": {"w.weight": torch.ones(1, 2)}})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        merger.check_dataloaders({"a": _data(1.0), "c": _data(1.0)})
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\] have no validation dataloader"):
        merger.check_dataloaders({"a": _data(1.0)})
    assert merger.check_dataloaders({"a": [_data(1.0), _data(2.0)]}, require_all=False)["a"][1].dataset is not None


# ---- what a fit-end merge does with the data it has --------------------------------------------------------
def test_the_recipe_searches_with_all_data_falls_back_without_and_refuses_part() -> None:
    search = SearchOptions.build("ties", k=0.2, lam=[0.8, 1.0])
    fixed = SearchOptions.build("ties", k=0.3, lam=1.2)
    assert check_fit_data(search, {"a", "b"}, {"a", "b"}, "b") is None
    assert "paper's recipe k=0.2, lam=1.0" in check_fit_data(search, {"a", "b"}, set(), "b")
    with pytest.raises(ValueError, match=r"task\(s\) \['a'\] have no validation dataloader"):
        check_fit_data(search, {"a", "b"}, {"b"}, "b")
    assert check_fit_data(fixed, {"a", "b"}, {"b"}, "b") is None  # nothing to choose: applied unscored
    assert fixed_choice(fixed, some_data=True) == (0.3, 1.2, "validation data for some tasks only: fixed k=0.3, lam=1.2, not scored")
    with pytest.raises(ValueError, match=r"\['regmean'\] need a validation dataloader for every task"):
        check_fit_data(SearchOptions.build("regmean"), {"a", "b"}, {"a"}, "b")


# ---- search progress and the base's file ---------------------------------------------------------------------
def test_progress_round_trips_and_a_snapshot_keeps_the_measured_references(tmp_path) -> None:
    assert read_progress(tmp_path) is None and read_progress(None) is None
    running = SearchResult(method="ties", chosen=(0.2, 1.0))
    write_progress(tmp_path / "out", running)
    assert read_progress(tmp_path / "out").chosen == (0.2, 1.0)
    copy = snapshot(running, {"a": {"acc": 0.9}}, stored=None)
    assert copy is not running and copy.reference == {"a": {"acc": 0.9}} and running.reference == {}
    assert snapshot(None, {}, stored=running) is running


def test_the_base_is_referenced_by_file_and_a_changed_file_fails(tmp_path) -> None:
    ref = base_reference(None, tmp_path, {"w": torch.ones(2)})
    assert ref is not None and ref["path"].endswith("base.safetensors") and len(ref["sha256"]) == 64
    check_base_file(ref)
    base_reference(None, tmp_path, {"w": torch.zeros(2)})  # another base written over it
    with pytest.raises(ValueError, match="changed since the checkpoint was written"):
        check_base_file(ref)
    assert base_reference(None, None, {"w": torch.ones(2)}) is None  # no save_dir: the checkpoint keeps the tensors
    assert base_reference({"w": torch.ones(2)}, tmp_path, None) is None  # a state dict given as base: given again
