"""``method="auto"`` with validation data: every registry method coarse to fine under a time budget.

:func:`auto_search` asks an ``evaluate(method, k, lam)`` callable for scores, like
:func:`~.search.run_search`, and records every candidate (with its seconds and phase) in a
:class:`~.search.SearchResult`. Its schedule depends on the scores only; the budget, which depends
on the clock, is decided on rank 0 and broadcast when several processes search
(:func:`rank_zero_decides`), so every rank scores the same candidates.

Example:
    >>> from lightning_ties.core.options import SearchOptions
    >>> grids = SearchOptions.build("auto").auto_grids()
    >>> r = auto_search(lambda m, k, lam: {"t": {"acc": -abs(lam - 2.0) + (m == "iso_c")}}, grids)
    >>> r.best.method, r.best.lam, r.budget_cut
    ('iso_c', 2.0, False)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch.distributed as dist

from .metrics import Scores, SearchObjective, objective_value
from .options import MODES, AutoGrid, check_choice
from .search import Candidate, SearchResult, _finite


#: Share of ``budget_s`` the coarse pass may use: the rest is kept for refining the best methods.
COARSE_SHARE = 0.6
#: How many methods (the best after the coarse pass) are refined.
REFINE_TOP = 2

AutoEvaluate = Callable[[str, float | None, float], Scores]


def coarse_lam_indices(lams: Sequence[float], default_lam: float) -> list[int]:
    """The coarse pass's lams (indices into the sorted ``lams``): the default's nearest, then one step below and above.

    The default comes first so that a budget cut after one candidate has scored the method's
    data-free recipe. The step is a sixth of the grid (at least one value): TIES's 0.8..2.5 ->
    1.0, 0.8, 1.3; the subspace methods' 0.1..3.0 around 1.0 -> 1.0, 0.5, 1.5.

    Example:
        >>> coarse_lam_indices([0.5, 1.0, 1.5], 1.0), coarse_lam_indices([1.0], 2.0)
        ([1, 0, 2], [0])
    """
    centre = min(range(len(lams)), key=lambda i: (abs(lams[i] - default_lam), i))
    step = _coarse_step(len(lams))
    return list(dict.fromkeys([centre, max(centre - step, 0), min(centre + step, len(lams) - 1)]))


def _coarse_step(n: int) -> int:
    return max(1, n // 6)


class _BudgetStop(Exception):
    """The budget allows no further candidate (of this phase)."""


class _AutoWalk:
    """The state of one :func:`auto_search`: the result, the clock, the measured costs."""

    def __init__(self, evaluate: AutoEvaluate, objective: SearchObjective, result: SearchResult,
                 budget_s: float | None, clock: Callable[[], float],
                 on_candidate: Callable[[Candidate], None] | None, agree: Callable[[bool], bool] | None) -> None:
        self.evaluate, self.objective, self.result = evaluate, objective, result
        self.budget_s, self.clock, self.on_candidate, self.agree = budget_s, clock, on_candidate, agree
        self.sign = 1.0 if result.mode == "max" else -1.0
        # a resumed search counts the seconds its stored candidates took
        self.spent_before = sum(c.seconds or 0.0 for c in result.candidates)
        self.start = clock()
        self.prepared: set[tuple[str, float | None]] = set()
        # measured costs: a (method, k)'s first candidate computes tau_m, the next ones only apply it
        self.costs: dict[bool, list[float]] = {True: [], False: []}

    def elapsed(self) -> float:
        return self.spent_before + self.clock() - self.start

    def estimate(self, method: str, k: float | None) -> float:
        first = (method, k) not in self.prepared
        seen = self.costs[first] or self.costs[not first]
        return sum(seen) / len(seen) if seen else 0.0

    def score(self, grid: AutoGrid, k: float | None, i: int, phase: str, limit: float | None) -> float:
        """The signed objective of (method, k, lams[i]); evaluated unless already in the result."""
        lam = grid.lams[i]
        done = self.result.find(k, lam, grid.method)
        if done is None:
            go = limit is None or self.elapsed() + self.estimate(grid.method, k) <= limit
            if self.budget_s is not None and self.agree is not None:
                go = bool(self.agree(go))  # every rank follows rank 0's clock
            if not go:
                raise _BudgetStop
            t0 = self.clock()
            scores = self.evaluate(grid.method, k, lam)
            seconds = self.clock() - t0
            self.costs[(grid.method, k) not in self.prepared].append(seconds)
            self.prepared.add((grid.method, k))
            value = objective_value(self.objective, scores, self.result.reference or None)
            done = Candidate(k, lam, scores, value, grid.method, seconds, phase)
            self.result.candidates.append(done)
            if self.on_candidate is not None:
                self.on_candidate(done)
        return self.sign * _finite(done.objective, self.sign)

    def follow_slope(self, grid: AutoGrid, k: float | None, values: dict[int, float], limit: float | None) -> int:
        """The best lam index of the coarse pass, stepping on while the best sits at an end of the scored ones.

        A method still rising at the edge of its coarse window (Iso-C/Iso-CTS on MiniLM peak near
        lam 3, three coarse steps above their default) would otherwise be ranked by a value far
        below its peak and never refined. ``values`` (index -> signed objective) gains each new lam.
        """
        step = _coarse_step(len(grid.lams))
        best = max(sorted(values), key=lambda i: values[i])
        while len(values) > 1 and best in (min(values), max(values)):
            j = min(max(best - step if best == min(values) else best + step, 0), len(grid.lams) - 1)
            if j in values:  # the grid's end
                break
            values[j] = self.score(grid, k, j, "coarse", limit)
            if not values[j] > values[best]:
                break
            best = j
        return best

    def climb(self, grid: AutoGrid, k: float | None, i: int, step: int, limit: float | None) -> tuple[int, float]:
        """Hill-climb the lam index from ``i``: move while a neighbour at ``step`` is strictly better, then halve."""
        best = self.score(grid, k, i, "refine", limit)
        n = len(grid.lams)
        while step >= 1:
            moved = True
            while moved:
                moved = False
                for j in (max(i - step, 0), min(i + step, n - 1)):  # the lower side first: ties stay put
                    if j != i:
                        v = self.score(grid, k, j, "refine", limit)
                        if v > best:
                            i, best, moved = j, v, True
                            break
            step //= 2
        return i, best


def auto_search(
    evaluate: AutoEvaluate,
    grids: Sequence[AutoGrid],
    objective: SearchObjective = "mean",
    mode: str = "max",
    result: SearchResult | None = None,
    budget_s: float | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    agree: Callable[[bool], bool] | None = None,
) -> SearchResult:
    """``method="auto"``: every method of ``grids`` coarse, then the best ones refined, under ``budget_s``.

    The schedule, fixed by the scores alone (so a resumed search and every rank walk it the same):

    1. coarse: each method in ``grids`` order at its first k (its default): its default lam, then
       one coarse step below and above (:func:`coarse_lam_indices`); while the best of those is
       the lowest or highest scored lam, one more coarse step that way (it stops at the first
       that is not strictly better, or at the grid's end);
    2. refine the :data:`REFINE_TOP` best methods (ties: the earlier): hill-climb lam from the
       coarse best at the coarse step, halving it down to one grid step; a trimming method then
       tries its other ks at that lam and, at the best k, climbs lam one step either side.

    Budget: before each new candidate its cost is predicted from the measured ones (a (method, k)'s
    first candidate, which computes tau_m, from earlier first candidates; the others from earlier
    lam-only candidates); the coarse pass starts no candidate that would end past
    :data:`COARSE_SHARE` of ``budget_s``, the refining none past ``budget_s``; once refused, that
    pass starts nothing more. The decision depends on the clock, so with several processes
    ``agree(go) -> go`` returns rank 0's decision to every rank (default: :func:`rank_zero_decides`,
    a broadcast over the default process group when one is initialized); ``clock`` is injectable
    for tests. Candidates already in ``result`` are reused (resume) and their recorded
    seconds count against the budget.

    Args:
        evaluate: ``(method, k, lam) -> scores``; called once per new candidate.
        grids: each method's :class:`~.options.AutoGrid`, in the order to try (ties go to the earlier).
        objective, mode: as :func:`run_search`.
        result: an earlier (possibly interrupted) result to continue; a new one if None.
        budget_s: wall seconds (``None``: the whole schedule).
        on_candidate: called after each new candidate.

    Example:
        >>> from lightning_ties.core.options import AutoGrid
        >>> grids = [AutoGrid("ties", (0.2,), (0.5, 1.0, 1.5), 1.0), AutoGrid("tsv", (None,), (0.5, 1.0, 1.5), 1.0)]
        >>> r = auto_search(lambda m, k, lam: {"t": {"acc": lam if m == "tsv" else 0.0}}, grids)
        >>> r.best.method, r.best.lam
        ('tsv', 1.5)
    """
    check_choice("mode", mode, MODES)
    agree = agree if agree is not None else rank_zero_decides()
    if result is None:
        result = SearchResult(method=grids[0].method, methods=[g.method for g in grids])
    result.mode, result.budget_s, result.budget_cut = mode, budget_s, False
    for g in grids:
        if g.method not in result.methods:
            result.methods.append(g.method)
    walk = _AutoWalk(evaluate, objective, result, budget_s, clock, on_candidate, agree)
    coarse_limit = None if budget_s is None else COARSE_SHARE * budget_s
    coarse: list[tuple[float, int, AutoGrid, int]] = []  # (value, order, grid, best lam index)
    try:
        for order, g in enumerate(grids):
            values = {i: walk.score(g, g.ks[0], i, "coarse", coarse_limit) for i in coarse_lam_indices(g.lams, g.default_lam)}
            best = walk.follow_slope(g, g.ks[0], values, coarse_limit)
            coarse.append((values[best], order, g, best))
    except _BudgetStop:
        result.budget_cut = True
    ranked = sorted(coarse, key=lambda c: (-c[0], c[1]))[:REFINE_TOP]
    try:
        for _value, _order, g, i in ranked:
            k0 = g.ks[0]
            i, best = walk.climb(g, k0, i, _coarse_step(len(g.lams)), budget_s)
            if len(g.ks) > 1:
                scored = {k: walk.score(g, k, i, "refine", budget_s) for k in g.ks}
                k_best = max(g.ks, key=lambda k: (scored[k], -g.ks.index(k)))
                if k_best != k0:
                    walk.climb(g, k_best, i, 1, budget_s)
    except _BudgetStop:
        result.budget_cut = True
    return result



def rank_zero_decides() -> Callable[[bool], bool] | None:
    """With an initialized process group of several ranks: a function returning rank 0's decision to every rank.

    Example:
        >>> rank_zero_decides() is None  # one process
        True
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None

    def agree(go: bool) -> bool:
        box = [bool(go)]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    return agree


__all__ = ["COARSE_SHARE", "REFINE_TOP", "AutoEvaluate", "auto_search", "coarse_lam_indices", "rank_zero_decides"]
