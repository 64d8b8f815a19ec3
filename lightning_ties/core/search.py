"""lam / k search: candidate grids, the strategies that walk them, and the result table.

The search itself is independent of Lightning: :func:`run_search` asks an ``evaluate(k, lam)``
callable for scores (the module runs a validation loop there) and records every finished
candidate in a :class:`SearchResult`, so an interrupted search resumed with the same result
object re-evaluates nothing that was finished. Strategies:

- ``"grid"``: every lam of the grid, for every k.
- ``"coarse_to_fine"``: every 4th lam of the (sorted) grid plus its last value, then the grid
  neighbours of the best at distance 2, then 1. On a unimodal curve it finds the grid's best
  with about half the validation passes of the full grid (10 instead of 18 on the paper's
  TIES grid); ``benchmarks/bench_search.py`` measures it against the grid.

Ties between candidates break deterministically: the earlier candidate in grid order (smaller
k, then smaller lam) wins.

``method="auto"`` (:func:`auto_search`) walks every method of :class:`~.options.SearchOptions`
coarse to fine under a time budget: see its docstring for the schedule.

Example:
    >>> from lightning_ties import TIES_LAM_GRID
    >>> result = run_search(lambda k, lam: {"a": {"acc": -abs(lam - 1.2)}}, [0.2], list(TIES_LAM_GRID))
    >>> result.best.lam, len(result.candidates)
    (1.2, 18)
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_file
from ..merging.grids import DEFAULT_K_GRID
from ..merging.steps import PAPER_K, PAPER_LAM
from .metrics import Scores, SearchObjective, metric_names, normalized, objective_value
from .options import MODES, STRATEGIES, AutoGrid, check_choice, k_grid, lam_grid

#: The paper's recipe when there is no validation data (the registry's numbers, named for this layer).
PAPER_DEFAULT_K = PAPER_K
PAPER_DEFAULT_LAM = PAPER_LAM


@dataclass
class Candidate:
    """One evaluated (method, k, lam): its per-task scores and objective value.

    ``method`` is None in results written before searches covered several methods: such a
    candidate belongs to its result's :attr:`SearchResult.method` (``from_dict`` fills it in).
    ``seconds`` (wall time of its merge and evaluation) and ``phase`` (``"coarse"`` or
    ``"refine"``) are recorded by :func:`auto_search`; other searches leave them None.
    """

    k: float | None
    lam: float
    scores: Scores
    objective: float
    method: str | None = None
    seconds: float | None = None
    phase: str | None = None

    def key(self) -> tuple[float | None, float]:
        return (self.k, self.lam)


@dataclass
class SearchResult:
    """Every evaluated candidate, the chosen one, and the fine-tuned reference scores.

    Attributes:
        method: the merge method chosen (a single-method search: the method searched).
        methods: every method searched, in the order given (ties between methods go to the earlier one).
        candidates: evaluated candidates, in evaluation order.
        reference: each task's fine-tuned model's scores (for normalized scores), or empty.
        mode: ``"max"`` or ``"min"`` (direction of the objective).
        reason: how the choice was made (``"search"``, ``"fixed"``, or the no-validation recipe).
        chosen: ``(k, lam)`` applied when no candidate was evaluated (no validation data).
        fingerprint: what the candidates' scores depend on (tasks, method, objective); a resumed
            search reuses candidates only when it matches.
        budget_s: the wall-time budget of an auto search (``None``: none, or not an auto search).
        budget_cut: whether the budget stopped the auto search before its schedule was done.
    """

    method: str = "ties"
    candidates: list[Candidate] = field(default_factory=list)
    reference: Scores = field(default_factory=dict)
    mode: str = "max"
    reason: str = "search"
    chosen: tuple[float | None, float] | None = None
    fingerprint: str = ""
    methods: list[str] = field(default_factory=list)
    budget_s: float | None = None
    budget_cut: bool = False

    def __post_init__(self) -> None:
        if not self.methods:
            self.methods = [self.method]

    def _order(self, c: Candidate) -> tuple[int, float, float]:
        """Grid order: method (as given), then k, then lam."""
        m = c.method or self.method
        rank = self.methods.index(m) if m in self.methods else len(self.methods)
        return (rank, c.k if c.k is not None else -1.0, c.lam)

    @property
    def best(self) -> Candidate | None:
        """The best candidate (first in grid order among equals), or None if nothing was evaluated."""
        if not self.candidates:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        ordered = sorted(self.candidates, key=self._order)
        return max(ordered, key=lambda c: sign * _finite(c.objective, sign))

    @property
    def best_method(self) -> str:
        """The method of the best candidate (:attr:`method` when nothing was evaluated)."""
        best = self.best
        return (best.method or self.method) if best is not None else self.method

    @property
    def k(self) -> float | None:
        best = self.best
        return best.k if best is not None else (self.chosen[0] if self.chosen else None)

    @property
    def lam(self) -> float | None:
        best = self.best
        return best.lam if best is not None else (self.chosen[1] if self.chosen else None)

    def find(self, k: float | None, lam: float, method: str | None = None) -> Candidate | None:
        """The finished candidate (method, k, lam), or None; ``method`` None: this result's :attr:`method`."""
        method = method or self.method
        for c in self.candidates:
            if c.k == k and c.lam == lam and (c.method or self.method) == method:
                return c
        return None

    @property
    def summary(self) -> str:
        """One line: what was tried, what won and why (its objective), and whether the budget cut the search.

        Example:
            >>> r = SearchResult(candidates=[Candidate(0.2, 1.0, {"a": {"acc": 0.5}}, 0.5, "ties", 2.0)])
            >>> r.summary
            'tried 1 candidate(s) of 1 method(s) in 2.0 s; chose ties k=0.2 lam=1.0: objective 0.5000, the max'
        """
        best = self.best
        if best is None:
            return f"no candidate evaluated; applied k={self.k}, lam={self.lam} ({self.reason})"
        tried = {c.method or self.method for c in self.candidates}
        seconds = sum(c.seconds or 0.0 for c in self.candidates)
        line = (
            f"tried {len(self.candidates)} candidate(s) of {len(tried)} method(s) in {seconds:.1f} s; chose "
            f"{best.method or self.method} k={best.k} lam={best.lam}: objective {best.objective:.4f}, the {self.mode}"
        )
        if self.budget_s is not None:
            line += f"; budget {self.budget_s:g} s " + ("cut the search" if self.budget_cut else "not reached")
        return line

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per candidate: method, k, lam, objective, ``<task>/<metric>`` (and normalized) columns.

        Auto searches add each candidate's ``seconds`` and ``phase``.
        """
        rows = []
        for c in sorted(self.candidates, key=self._order):
            row: dict[str, Any] = {"method": c.method or self.method, "k": c.k, "lam": c.lam, "objective": c.objective}
            if c.seconds is not None:
                row.update(seconds=c.seconds, phase=c.phase)
            for task, values in c.scores.items():
                for name, v in values.items():
                    row[f"{task}/{name}"] = v
            for name in metric_names(c.scores):
                row[f"mean/{name}"] = sum(t[name] for t in c.scores.values()) / len(c.scores)
            if self.reference:
                for task, values in normalized(c.scores, self.reference).items():
                    for name, v in values.items():
                        row[f"{task}/normalized_{name}"] = v
            rows.append(row)
        return rows

    @property
    def table(self) -> str:
        """The candidates as an aligned text table; the chosen row is marked with ``*``."""
        rows = self.rows()
        head = f"{', '.join(self.methods)}: {self.reason}"
        if len(self.methods) > 1:
            head += f"; chose {self.best_method}"
        if self.budget_s is not None:
            head += f"\n{self.summary}"
        if not rows:
            return f"{head}; applied k={self.k}, lam={self.lam} (no candidate evaluated)"
        cols = list(dict.fromkeys(c for r in rows for c in r))
        best = self.best
        cells = [["", *cols]]
        for r in rows:
            chosen = best is not None and (r["method"], r["k"], r["lam"]) == (best.method or self.method, *best.key())
            mark = "*" if chosen else ""
            cells.append([mark, *(_fmt(r.get(c)) for c in cols)])
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
        if self.reference:
            ref = ", ".join(f"{t}: {_fmt(next(iter(v.values())))}" for t, v in self.reference.items() if v)
            lines.append(f"fine-tuned reference: {ref}")
        return "\n".join([head, *lines])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["best"] = asdict(self.best) if self.best is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        data = {k: v for k, v in data.items() if k != "best"}
        # results written before multi-method searches have no ``methods`` and no candidate method:
        # every candidate is then the result's one method
        method = data.get("method", "ties")
        data["candidates"] = [
            Candidate(**{**c, "method": c.get("method") or method}) for c in data.get("candidates", [])
        ]
        if data.get("chosen") is not None:
            data["chosen"] = tuple(data["chosen"])
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; with ``path``, also written there atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            _write_atomic(path, text)
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per candidate as CSV text; with ``path``, also written there atomically."""
        rows = self.rows()
        buf = io.StringIO()
        cols = list(dict.fromkeys(c for r in rows for c in r)) or ["method", "k", "lam", "objective"]
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        if path is not None:
            _write_atomic(path, buf.getvalue())
        return buf.getvalue()


def _finite(v: float, sign: float) -> float:
    return v if math.isfinite(v) else -math.inf * sign


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _write_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


Evaluate = Callable[[float | None, float], Scores]


def run_search(
    evaluate: Evaluate,
    ks: Sequence[float | None],
    lams: Sequence[float],
    strategy: str = "grid",
    objective: SearchObjective = "mean",
    mode: str = "max",
    result: SearchResult | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    before_k: Callable[[float | None], None] | None = None,
    method: str | None = None,
) -> SearchResult:
    """Evaluate candidates (k, lam) with ``strategy``, skipping those already in ``result``.

    Args:
        evaluate: ``(k, lam) -> scores``; called once per new candidate.
        ks: k values (``[None]`` for methods without k); each is searched over ``lams``.
        lams: lam grid (sorted ascending).
        strategy: ``"grid"`` or ``"coarse_to_fine"``.
        objective: ``"mean"``, ``"normalized"`` or a callable of the scores.
        mode: ``"max"`` (higher is better) or ``"min"``.
        result: an earlier (possibly interrupted) result to continue; a new one if None.
        on_candidate: called after each new candidate (e.g. to save progress).
        before_k: called before the first new evaluation of each k (e.g. to compute tau_m once).
        method: the method ``evaluate`` merges with, recorded in each candidate (default:
            ``result.method``); a search over several methods calls this once per method on one result.

    Example:
        >>> r = run_search(lambda k, lam: {"t": {"acc": lam}}, [None], [0.1, 0.2], mode="min")
        >>> r.best.lam
        0.1
    """
    check_choice("search_strategy", strategy, STRATEGIES)
    check_choice("mode", mode, MODES)
    return walk_grid(evaluate, ks, lams, strategy, objective, mode, result, on_candidate, before_k, method)


def walk_grid(
    evaluate: Evaluate,
    ks: Sequence[float | None],
    lams: Sequence[float],
    strategy: str,
    objective: SearchObjective,
    mode: str,
    result: SearchResult | None = None,
    on_candidate: Callable[[Candidate], None] | None = None,
    before_k: Callable[[float | None], None] | None = None,
    method: str | None = None,
) -> SearchResult:
    """:func:`run_search` without its checks: for callers holding checked :class:`~.options.SearchOptions`."""
    result = result if result is not None else SearchResult(method=method or "ties")
    result.mode = mode
    method = method or result.method
    if method not in result.methods:
        result.methods.append(method)
    sign = 1.0 if mode == "max" else -1.0
    lams = sorted(lams)
    for k in ks:
        prepared = False

        def score(i: int, k: float | None = k) -> float:
            nonlocal prepared
            done = result.find(k, lams[i], method)
            if done is None:
                if not prepared and before_k is not None:
                    before_k(k)
                prepared = True
                scores = evaluate(k, lams[i])
                value = objective_value(objective, scores, result.reference or None)
                done = Candidate(k, lams[i], scores, value, method)
                result.candidates.append(done)
                if on_candidate is not None:
                    on_candidate(done)
            return sign * _finite(done.objective, sign)

        if strategy == "grid":
            for i in range(len(lams)):
                score(i)
        else:
            _coarse_to_fine(len(lams), score)
    return result


def coarse_to_fine_indices(n: int, stride: int = 4) -> list[int]:
    """The first (coarse) pass of ``coarse_to_fine``: every ``stride``-th index and the last one."""
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def _coarse_to_fine(n: int, score: Callable[[int], float], stride: int = 4) -> int:
    """Index of the best lam found: coarse pass, then halve the step around the best so far."""
    values = {i: score(i) for i in coarse_to_fine_indices(n, stride)}
    best = max(sorted(values), key=lambda i: values[i])
    step = stride
    while step > 1:
        step //= 2
        for i in (best - step, best + step):
            if 0 <= i < n and i not in values:
                values[i] = score(i)
        best = max(sorted(values), key=lambda i: values[i])
    return best


#: Share of ``budget_s`` the coarse pass may use: the rest is kept for refining the best methods.
COARSE_SHARE = 0.6
#: How many methods (the best after the coarse pass) are refined.
REFINE_TOP = 2

AutoEvaluate = Callable[[str, float | None, float], Scores]


def coarse_lam_indices(lams: Sequence[float], default_lam: float) -> list[int]:
    """The coarse pass's lams (indices into the sorted ``lams``): the default's nearest and one step either side.

    The step is a sixth of the grid (at least one value): TIES's 0.8..2.5 -> 0.8, 1.0, 1.3; the
    subspace methods' 0.1..3.0 around 1.0 -> 0.5, 1.0, 1.5.

    Example:
        >>> coarse_lam_indices([0.5, 1.0, 1.5], 1.0), coarse_lam_indices([1.0], 2.0)
        ([0, 1, 2], [0])
    """
    centre = min(range(len(lams)), key=lambda i: (abs(lams[i] - default_lam), i))
    step = _coarse_step(len(lams))
    return sorted({max(centre - step, 0), centre, min(centre + step, len(lams) - 1)})


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

    1. coarse: each method in ``grids`` order at its first k (its default) and three lams around
       its default lam (:func:`coarse_lam_indices`);
    2. refine the :data:`REFINE_TOP` best methods (ties: the earlier): hill-climb lam from the
       coarse best at the coarse step, halving it down to one grid step; a trimming method then
       tries its other ks at that lam and, at the best k, climbs lam one step either side.

    Budget: before each new candidate its cost is predicted from the measured ones (a (method, k)'s
    first candidate, which computes tau_m, from earlier first candidates; the others from earlier
    lam-only candidates); the coarse pass starts no candidate that would end past
    :data:`COARSE_SHARE` of ``budget_s``, the refining none past ``budget_s``; once refused, that
    pass starts nothing more. The decision depends on the clock, so with several processes
    ``agree(go) -> go`` must return rank 0's decision to every rank (a broadcast); ``clock`` is
    injectable for tests. Candidates already in ``result`` are reused (resume) and their recorded
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
            best = max(sorted(values), key=lambda i: values[i])
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


__all__ = [
    "COARSE_SHARE",
    "DEFAULT_K_GRID",
    "REFINE_TOP",
    "AutoEvaluate",
    "Candidate",
    "SearchResult",
    "STRATEGIES",
    "auto_search",
    "coarse_lam_indices",
    "coarse_to_fine_indices",
    "k_grid",
    "lam_grid",
    "run_search",
    "walk_grid",
]
