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

``method="auto"`` (:func:`~.auto.auto_search`) walks every method of :class:`~.options.SearchOptions`
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
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_file
from ..merging.grids import DEFAULT_K_GRID
from ..merging.steps import PAPER_K, PAPER_LAM
from .metrics import Scores, SearchObjective, metric_names, normalized, objective_value
from .options import MODES, STRATEGIES, check_choice, k_grid, lam_grid

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
        return self.best_of(None)

    def best_of(self, methods: Collection[str] | None) -> Candidate | None:
        """The best candidate among those of ``methods`` (None: all), ordered and tied as :attr:`best`.

        Example:
            >>> r = SearchResult(methods=["iso_c", "tsv"], candidates=[
            ...     Candidate(None, 2.0, {}, 0.9, "iso_c"), Candidate(None, 1.0, {}, 0.8, "tsv")])
            >>> r.best.method, r.best_of(["tsv"]).lam, r.best_of(["ties"])
            ('iso_c', 1.0, None)
        """
        kept = [c for c in self.candidates if methods is None or (c.method or self.method) in methods]
        if not kept:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        ordered = sorted(kept, key=self._order)
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


__all__ = [
    "DEFAULT_K_GRID",
    "Candidate",
    "SearchResult",
    "STRATEGIES",
    "coarse_to_fine_indices",
    "k_grid",
    "lam_grid",
    "run_search",
    "walk_grid",
]
