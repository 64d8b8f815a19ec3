"""One grid validator for k and lam, shared by configs and searches: what each accepts and refuses."""

from __future__ import annotations

import math

import pytest

from lightning_ties.merging import METHODS, TIES_LAM_GRID, check_k_grid, check_lam_grid, get_method
from lightning_ties.merging.grids import DEFAULT_K_GRID


# ---- k ----------------------------------------------------------------------------------------
def test_k_grid_expands_a_number_a_list_and_both_words() -> None:
    assert check_k_grid(0.25) == [0.25]
    assert check_k_grid([0.3, 0.1, 0.3]) == [0.1, 0.3]  # sorted, duplicates dropped
    assert check_k_grid((0.2, 1)) == [0.2, 1.0]  # any sequence, ints are numbers
    # "paper" and "search" mean the same grid: a config saying search.k=paper must not fail later
    assert check_k_grid("paper") == check_k_grid("search") == [0.1, 0.2, 0.3] == list(DEFAULT_K_GRID)


def test_k_none_is_the_methods_default_k() -> None:
    assert check_k_grid(None) == [0.2]
    assert check_k_grid(None, "ties") == [get_method("ties").default_k] == [0.2]


def test_a_method_without_k_gets_no_k_but_its_value_is_still_checked() -> None:
    assert check_k_grid([0.1, 0.2], "task_arithmetic") == [None]
    assert check_k_grid(None, "dare") == [None]
    with pytest.raises(ValueError, match="outside"):
        check_k_grid(2.0, "task_arithmetic")


@pytest.mark.parametrize(
    "bad, message",
    [
        (0.0, r"k=0.0: 0.0 is outside \(0, 1\]"),
        (1.5, r"k=1.5: 1.5 is outside \(0, 1\]"),
        (math.nan, "outside"),
        ([0.1, -0.2], r"k=\[0.1, -0.2\]: -0.2 is outside"),
        ([], "the grid is empty"),
        ("best", "k='best': expected a number in \\(0, 1\\], a non-empty list of them, 'paper' or 'search'"),
        (True, "True is not a number"),
        (["0.2"], "'0.2' is not a number"),
        ({"k": 0.2}, "is not a number"),
    ],
)
def test_k_grid_refuses_with_the_value_named(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_k_grid(bad)


def test_the_callers_name_for_the_value_is_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^search\.k=1\.5"):
        check_k_grid(1.5, name="search.k")
    with pytest.raises(ValueError, match=r"^search\.lam=1e\+39 is out of range"):
        check_lam_grid("ties", [1e39], name="search.lam")


# ---- lam --------------------------------------------------------------------------------------
def test_lam_grid_expands_a_number_a_list_the_words_and_none() -> None:
    assert check_lam_grid("ties", 1) == [1.0]
    assert check_lam_grid("ties", [1.2, 0.8, 1.2]) == [0.8, 1.2]
    assert check_lam_grid("ties", "paper") == check_lam_grid("ties", "search") == list(TIES_LAM_GRID)
    assert check_lam_grid("task_arithmetic", None) == [0.4]
    assert check_lam_grid("ties", None) == [get_method("ties").default_lam] == [1.0]


@pytest.mark.parametrize(
    "bad, message",
    [
        (math.inf, "must be a finite number"),
        ([1.0, math.nan], "must be a finite number"),
        (1e39, "out of range"),
        ("1.0", "lam='1.0': expected a number"),
        (False, "False is not a number"),
        ([], "the grid is empty"),
    ],
)
def test_lam_grid_refuses_with_the_value_named(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_lam_grid("ties", bad)


def test_a_method_without_lam_accepts_only_its_fixed_lam() -> None:
    assert check_lam_grid("average", "paper") == check_lam_grid("average", None) == [1.0]
    assert check_lam_grid("average", 1.0) == [1.0]
    with pytest.raises(ValueError, match="method 'average' has no lam to set or search"):
        check_lam_grid("average", [0.5, 1.0])


def test_lam_grid_of_an_unknown_method_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown merge method 'tie'; choose one of"):
        check_lam_grid("tie", 1.0)


# ---- the registry answers the policy questions ------------------------------------------------
def test_registry_owns_the_paper_defaults_and_lam_policy() -> None:
    ties = get_method("ties")
    assert (ties.has_k, ties.default_k, ties.has_lam, ties.default_lam) == (True, 0.2, True, 1.0)
    assert ties.paper_lam_grid == TIES_LAM_GRID
    ta = get_method("task_arithmetic")
    assert (ta.has_k, ta.default_k, ta.has_lam, ta.default_lam) == (False, None, True, 0.4)
    assert get_method("average").has_lam is False
    for m in METHODS.values():  # every method's own defaults pass the one validator
        assert check_lam_grid(m.name, None) == [m.default_lam]
        assert check_lam_grid(m.name, "paper") == sorted(set(m.paper_lam_grid))
        assert check_k_grid(None, m.name) == ([m.default_k] if m.has_k else [None])
