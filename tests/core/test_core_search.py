"""lam/k grids, search strategies and the SearchResult table (pure logic, no Trainer)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ties.core.search import (
    SearchResult,
    coarse_to_fine_indices,
    k_grid,
    lam_grid,
    run_search,
)
from lightning_ties.merging import TA_LAM_GRID, TIES_LAM_GRID


def test_paper_grids_come_from_the_engine_registry():
    assert lam_grid("ties", "paper") == list(TIES_LAM_GRID)
    assert lam_grid("ties", "search")[0] == 0.8 and lam_grid("ties", "search")[-1] == 2.5
    assert lam_grid("task_arithmetic", "paper") == list(TA_LAM_GRID)
    assert lam_grid("ties", None) == [1.0]
    assert lam_grid("ties", [1.5, 0.5, 1.5]) == [0.5, 1.5]
    assert k_grid("search") == [0.1, 0.2, 0.3]
    assert k_grid("paper") == k_grid("search")  # the config's word is the search's: one validator


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lam_grid("ties", []), r"lam=\[\]: the grid is empty"),
        (lambda: k_grid([]), r"k=\[\]: the grid is empty"),
        (lambda: k_grid([0.0, 0.2]), r"0.0 is outside \(0, 1\]"),
        (lambda: lam_grid("ties", "best"), "'paper' or 'search'"),
        (lambda: lam_grid("ties", [float("nan")]), "finite"),
        (lambda: lam_grid("nope", 1.0), "unknown merge method 'nope'"),
    ],
)
def test_bad_grids_are_refused_with_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def peak_at(best_lam: float, best_k: float = 0.2):
    return lambda k, lam: {"a": {"acc": -abs(lam - best_lam) - abs(k - best_k)}}


def test_grid_search_evaluates_every_candidate_and_picks_the_peak():
    calls = []

    def evaluate(k, lam):
        calls.append((k, lam))
        return peak_at(1.3)(k, lam)

    result = run_search(evaluate, [0.1, 0.2, 0.3], list(TIES_LAM_GRID))
    assert len(calls) == 3 * 18 == len(result.candidates)
    assert (result.k, result.lam) == (0.2, 1.3)


def test_ties_break_to_the_first_candidate_in_grid_order():
    result = run_search(lambda k, lam: {"a": {"acc": 1.0}}, [0.3, 0.1], [2.0, 1.0])
    assert (result.k, result.lam) == (0.1, 1.0)
    low = run_search(lambda k, lam: {"a": {"loss": 0.0}}, [None], [2.0, 1.0], mode="min")
    assert low.lam == 1.0


def test_before_k_runs_once_per_k_and_only_when_something_is_new():
    prepared = []
    result = run_search(peak_at(1.0), [0.1, 0.2], [1.0, 2.0], before_k=prepared.append)
    assert prepared == [0.1, 0.2]
    prepared.clear()
    run_search(peak_at(1.0), [0.1, 0.2], [1.0, 2.0], result=result, before_k=prepared.append)
    assert prepared == []  # everything already evaluated: no tau_m recomputed


def test_an_interrupted_search_resumes_without_reevaluating():
    calls = []

    def flaky(k, lam):
        calls.append(lam)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return peak_at(1.5)(k, lam)

    result = SearchResult()
    with pytest.raises(KeyboardInterrupt):
        run_search(flaky, [0.2], list(TIES_LAM_GRID), result=result)
    assert len(result.candidates) == 3
    restored = SearchResult.from_dict(json.loads(result.to_json()))
    calls.clear()
    final = run_search(lambda k, lam: (calls.append(lam), peak_at(1.5)(k, lam))[1], [0.2], list(TIES_LAM_GRID),
                       result=restored)
    assert calls == list(TIES_LAM_GRID)[3:]
    assert final.lam == 1.5 and len(final.candidates) == 18


def test_coarse_to_fine_finds_the_peak_with_fewer_evaluations():
    for peak in TIES_LAM_GRID:
        result = run_search(peak_at(peak), [0.2], list(TIES_LAM_GRID), strategy="coarse_to_fine")
        assert result.lam == peak
        assert len(result.candidates) <= 10  # vs 18 on the grid
    assert coarse_to_fine_indices(18) == [0, 4, 8, 12, 16, 17]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    peak=st.floats(-1, 2),
    width=st.floats(0.05, 3),
)
def test_coarse_to_fine_matches_the_grid_on_unimodal_curves(n, peak, width):
    lams = [round(i / 10, 10) for i in range(n)]

    def evaluate(k, lam):
        return {"t": {"acc": -((lam - peak) / width) ** 2}}

    grid = run_search(evaluate, [None], lams)
    smart = run_search(evaluate, [None], lams, strategy="coarse_to_fine")
    assert math.isclose(smart.best.objective, grid.best.objective, abs_tol=1e-12)
    assert len(smart.candidates) <= len(grid.candidates)


def test_result_table_csv_and_json_list_every_candidate():
    result = run_search(peak_at(1.0), [0.2], [0.9, 1.0, 1.1])
    result.reference = {"a": {"acc": -0.5}}
    lines = result.table.splitlines()
    assert [line.lstrip().startswith("*") for line in lines[2:5]] == [False, True, False]  # the lam=1.0 row
    assert "a/normalized_acc" in result.table
    csv_lines = result.to_csv().strip().splitlines()
    assert csv_lines[0].split(",")[:4] == ["method", "k", "lam", "objective"] and len(csv_lines) == 4
    assert all(line.startswith("ties,") for line in csv_lines[1:])
    data = json.loads(result.to_json())
    assert data["best"]["lam"] == 1.0 and data["best"]["method"] == "ties" and len(data["candidates"]) == 3
    assert SearchResult.from_dict(data).best.lam == 1.0


def test_a_single_method_result_written_before_method_columns_still_loads():
    # given a search.json written before candidates carried a method (no "methods", no candidate "method")
    old = {
        "method": "task_arithmetic", "mode": "max", "reason": "search", "chosen": None, "fingerprint": "f",
        "reference": {},
        "candidates": [{"k": None, "lam": 0.3, "scores": {"a": {"acc": 0.5}}, "objective": 0.5},
                       {"k": None, "lam": 0.4, "scores": {"a": {"acc": 0.7}}, "objective": 0.7}],
    }
    result = SearchResult.from_dict(old)
    # then every candidate is that method's, found and resumed under it
    assert result.methods == ["task_arithmetic"] and result.best_method == "task_arithmetic"
    assert result.best.lam == 0.4 and result.find(None, 0.3, "task_arithmetic") is not None
    assert result.find(None, 0.3, "tsv") is None
    assert [r["method"] for r in result.rows()] == ["task_arithmetic"] * 2


def test_a_search_over_methods_records_each_candidates_method_and_chooses_across_them():
    # given two methods whose curves peak at different heights
    result = SearchResult(method="ties", methods=["ties", "tsv"])
    run_search(lambda k, lam: {"t": {"acc": -abs(lam - 1.0)}}, [0.2], [0.9, 1.0], result=result, method="ties")
    run_search(lambda k, lam: {"t": {"acc": 0.5 - abs(lam - 2.0)}}, [None], [1.0, 2.0], result=result, method="tsv")
    # then the best is tsv's lam=2.0, every row names its method, and a tie goes to the earlier method
    assert (result.best_method, result.best.k, result.best.lam) == ("tsv", None, 2.0)
    assert [(r["method"], r["lam"]) for r in result.rows()] == [("ties", 0.9), ("ties", 1.0), ("tsv", 1.0), ("tsv", 2.0)]
    marked = [line for line in result.table.splitlines() if line.lstrip().startswith("*")]
    assert len(marked) == 1 and "tsv" in marked[0] and "2.0000" in marked[0]
    assert SearchResult.from_dict(json.loads(result.to_json())).best_method == "tsv"
    tie = SearchResult(method="ties", methods=["tsv", "ties"])
    run_search(lambda k, lam: {"t": {"acc": 1.0}}, [0.2], [1.0], result=tie, method="ties")
    run_search(lambda k, lam: {"t": {"acc": 1.0}}, [None], [1.0], result=tie, method="tsv")
    assert tie.best_method == "tsv"


def test_result_files_are_written(tmp_path):
    result = run_search(peak_at(1.0), [0.2], [1.0])
    result.to_csv(tmp_path / "r.csv")
    result.to_json(tmp_path / "r.json")
    assert (tmp_path / "r.csv").read_text().startswith("method,k,lam")
    assert json.loads((tmp_path / "r.json").read_text())["best"]["k"] == 0.2


def test_unknown_strategy_and_mode_are_refused():
    with pytest.raises(ValueError, match=r"search_strategy must be one of \['grid', 'coarse_to_fine'\], got 'smart'"):
        run_search(peak_at(1.0), [0.2], [1.0], strategy="smart")
    with pytest.raises(ValueError, match=r"mode must be one of \['max', 'min'\], got 'up'"):
        run_search(peak_at(1.0), [0.2], [1.0], mode="up")
