"""``method="auto"``: the budgeted coarse-to-fine schedule over every registry method (pure, no Lightning).

Scores come from hand-made functions of (method, k, lam), time from a fake clock that each
evaluation advances, so the budget's cut is exact and never depends on the machine's load.
"""

from __future__ import annotations

import pytest

from lightning_ties.core.options import AutoGrid, SearchOptions, auto_methods
from lightning_ties.core.auto import COARSE_SHARE, auto_search, coarse_lam_indices
from lightning_ties.core.search import SearchResult
from lightning_ties.merging import METHODS, SUBSPACE_LAM_GRID


class FakeClock:
    """``now()`` returns the fake time; :meth:`evaluate` wraps a score function, each call costing ``cost(m, k, lam)``."""

    def __init__(self, score, cost=lambda m, k, lam: 1.0) -> None:
        self.t, self.score, self.cost, self.calls = 0.0, score, cost, []

    def now(self) -> float:
        return self.t

    def evaluate(self, m, k, lam):
        self.calls.append((m, k, lam))
        self.t += self.cost(m, k, lam)
        return {"t": {"acc": self.score(m, k, lam)}}


def peaked(winner: str, lam_at: float, k_at: float | None = None):
    """Every method peaks at ``lam_at``; ``winner`` scores one point more (and, with k, peaks at ``k_at``)."""
    def score(m, k, lam):
        value = -abs(lam - lam_at) + (1.0 if m == winner else 0.0)
        return value - (abs(k - k_at) if (m == winner and k_at is not None and k is not None) else 0.0)
    return score


GRIDS = SearchOptions.build("auto").auto_grids()


def test_auto_methods_cover_the_registry_best_first_and_regmean_only_with_data() -> None:
    names = auto_methods()
    assert sorted(names) == sorted(METHODS) and names[0] == "tsv"
    assert "regmean" not in auto_methods(with_data_methods=False)
    assert [g.method for g in GRIDS] == names
    ties = next(g for g in GRIDS if g.method == "ties")
    assert ties.ks == (0.2, 0.1, 0.3) and ties.default_lam == 1.0


def test_coarse_lams_surround_each_default() -> None:
    # the default first: a budget cut after one candidate leaves the method's data-free recipe scored
    assert [SUBSPACE_LAM_GRID[i] for i in coarse_lam_indices(SUBSPACE_LAM_GRID, 1.0)] == [1.0, 0.5, 1.5]
    assert coarse_lam_indices([0.1, 0.2], 5.0) == [1, 0] and coarse_lam_indices([1.0], 1.0) == [0]


def test_auto_finds_the_clear_winner_off_the_coarse_grid() -> None:
    # Iso-C wins by a point, at a scale (2.7) no coarse lam hits: the refining climbs there
    clock = FakeClock(peaked("iso_c", 2.7))
    result = auto_search(clock.evaluate, GRIDS, clock=clock.now)
    assert (result.best.method, result.best.k, result.best.lam) == ("iso_c", None, 2.7)
    assert not result.budget_cut and result.budget_s is None
    # every method was tried coarse, and only the two best refined
    assert {c.method for c in result.candidates if c.phase == "coarse"} == set(METHODS)
    assert {c.method for c in result.candidates if c.phase == "refine"} <= {"iso_c", "tsv", "iso_cts"}
    assert all(c.seconds == 1.0 for c in result.candidates)
    assert "chose iso_c k=None lam=2.7" in result.summary


def test_the_coarse_pass_follows_a_method_still_rising_at_its_window_edge() -> None:
    # as Iso-CTS on MiniLM: every other method peaks at 1.0 (score 1.0); Iso-CTS is still rising at
    # the top of its coarse window (1.8 -> 0.4) and peaks at 2.7 (1.3). Without following the slope
    # it would rank below TSV-M and Iso-C and never be refined.
    score = lambda m, k, lam: 1.3 - abs(lam - 2.7) if m == "iso_cts" else 1.0 - abs(lam - 1.0)  # noqa: E731
    clock = FakeClock(score)
    result = auto_search(clock.evaluate, GRIDS, clock=clock.now)
    coarse_iso_cts = [c.lam for c in result.candidates if c.method == "iso_cts" and c.phase == "coarse"]
    assert coarse_iso_cts == [1.3, 0.8, 1.8, 2.3, 2.8, 3.0]  # 2.8 beat 2.3, the grid ends at 3.0
    assert (result.best.method, result.best.lam) == ("iso_cts", 2.7)
    # a method falling on both sides of its default costs nothing more than its three coarse lams
    assert [c.lam for c in result.candidates if c.method == "wudi"] == [1.0, 0.5, 1.5]


def test_auto_refines_k_of_a_trimming_winner() -> None:
    clock = FakeClock(peaked("ties", 1.2, k_at=0.3))
    result = auto_search(clock.evaluate, GRIDS, clock=clock.now)
    assert (result.best.method, result.best.k, result.best.lam) == ("ties", 0.3, 1.2)


def test_the_budget_stops_starting_candidates_and_keeps_the_best_so_far() -> None:
    clock = FakeClock(peaked("iso_c", 2.7))
    result = auto_search(clock.evaluate, GRIDS, budget_s=10.5, clock=clock.now)
    # each candidate costs 1 s: the coarse pass may end by 0.6 * 10.5 = 6.3 s (6 candidates), refining by 10.5 s
    assert result.budget_cut and len(result.candidates) == 10 == len(clock.calls)
    assert [c.phase for c in result.candidates] == ["coarse"] * 6 + ["refine"] * 4
    assert int(COARSE_SHARE * 10.5) == 6
    assert clock.t <= 10.5
    assert result.best == max(sorted(result.candidates, key=result._order), key=lambda c: c.objective)
    assert "budget 10.5 s cut the search" in result.summary and "budget 10.5 s cut" in result.table


def test_a_costly_first_candidate_is_predicted_from_the_measured_ones() -> None:
    # computing tau_m (a (method, k)'s first candidate) costs 5 s, each further lam 1 s; the coarse
    # pass may end by 0.6 * 19 = 11.4 s: after TSV-M's three (7 s) the next method's first candidate,
    # predicted at 5 s, is not started, though a lam-only one (1 s) would fit
    cost = lambda m, k, lam: 5.0 if (m, lam) in {("tsv", 1.0), ("iso_cts", 1.3)} else 1.0  # noqa: E731
    clock = FakeClock(peaked("tsv", 1.0), cost)
    result = auto_search(clock.evaluate, GRIDS, budget_s=19.0, clock=clock.now)
    assert [c.method for c in result.candidates if c.phase == "coarse"] == ["tsv"] * 3
    assert result.budget_cut and (result.best.method, result.best.lam) == ("tsv", 1.0)
    # the refining (the budget's remaining 40%) still climbed TSV-M's scale: 0.8, 1.2, 0.9, 1.1
    assert [c.lam for c in result.candidates if c.phase == "refine"] == [0.8, 1.2, 0.9, 1.1]
    assert clock.t == 11.0


def test_the_schedule_is_deterministic_resumable_and_follows_rank_zero() -> None:
    score = peaked("ties", 1.2, k_at=0.3)
    first, second = FakeClock(score), FakeClock(score, cost=lambda m, k, lam: 0.01)
    a = auto_search(first.evaluate, GRIDS, clock=first.now)
    b = auto_search(second.evaluate, GRIDS, clock=second.now)  # other timings, no budget: the same schedule
    assert first.calls == second.calls and len(first.calls) == len(a.candidates) == len(b.candidates)

    # interrupted after 7 candidates, resumed with the stored result: nothing re-evaluated, same end
    calls: list = []

    def flaky(m, k, lam):
        if len(calls) == 7:
            calls.append("stop")
            raise KeyboardInterrupt
        return first.evaluate(m, k, lam) if calls.append((m, k, lam)) is None else None

    stored = SearchResult(method="tsv", methods=[g.method for g in GRIDS])
    with pytest.raises(KeyboardInterrupt):
        auto_search(flaky, GRIDS, result=stored, clock=first.now)
    resumed_calls: list = []
    clock = FakeClock(score)
    clock.evaluate, inner = (lambda m, k, lam: resumed_calls.append((m, k, lam)) or inner(m, k, lam)), clock.evaluate
    resumed = auto_search(clock.evaluate, GRIDS, result=SearchResult.from_dict(stored.to_dict()), clock=clock.now)
    assert [(c.method, c.k, c.lam) for c in resumed.candidates] == [(c.method, c.k, c.lam) for c in a.candidates]
    assert len(resumed_calls) == len(a.candidates) - 7

    # another rank's clock says go, rank 0 says stop: it follows rank 0 and evaluates nothing more
    ranks = FakeClock(score)
    follower = auto_search(ranks.evaluate, GRIDS, budget_s=1000.0, clock=ranks.now, agree=lambda go: False)
    assert follower.candidates == [] and follower.budget_cut


def test_auto_options_refuse_a_budget_elsewhere_and_keep_each_methods_grids() -> None:
    with pytest.raises(ValueError, match="budget_s=5 limits method='auto' only"):
        SearchOptions.build("ties", budget_s=5)
    with pytest.raises(ValueError, match="budget_s must be a positive number"):
        SearchOptions.build("auto", budget_s=0)
    options = SearchOptions.build("auto", k=0.2, lam=1.0, budget_s=60)  # a callback's defaults: own grids
    assert options.auto and options.budget_s == 60.0 and options.ks is None
    assert options.lams["tsv"] == tuple(SUBSPACE_LAM_GRID) and options.total(0.2) is None
    listed = {g.method: g for g in SearchOptions.build("auto", lam=[1.0, 0.5]).auto_grids()}
    assert listed["tsv"].lams == listed["ties"].lams == (0.5, 1.0) and listed["average"].lams == (1.0,)
    assert isinstance(listed["tsv"], AutoGrid)
