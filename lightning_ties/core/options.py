"""Search options, checked once: the methods, the k and lam grids, the objective, its mode, the strategy.

The public entry points (``TiesMerging``, ``MultiTaskMergeModule.search``, ``run_search``) build a
:class:`SearchOptions` with :meth:`SearchOptions.build`, which checks every value against the
method registry and the grids (a typo fails there, before any training step or validation pass);
everything below them takes the frozen object and checks nothing again.

Example:
    >>> options = SearchOptions.build(["ties", "task_arithmetic"], k=[0.1, 0.2], lam=1.0)
    >>> options.grids(default_k=0.2)
    {'ties': ([0.1, 0.2], [1.0]), 'task_arithmetic': ([None], [1.0])}
    >>> options.searching
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..merging import METHODS, MergeOptions, get_method
from ..merging.grids import DEFAULT_K_GRID, MAX_CANDIDATES, check_k_grid, check_lam_grid, grid_size_problem
from ..merging.registry import AUTO_METHOD
from .metrics import SearchObjective

STRATEGIES = ("grid", "coarse_to_fine")
MODES = ("max", "min")
#: What a string objective may start with (``"mean"``, ``"normalized:acc"``).
OBJECTIVE_KINDS = ("mean", "normalized")


#: ``method="auto"`` with validation data: the order candidates are tried in (the budget cuts the
#: tail, ties go to the earlier method): the best data-free method on record first, then the methods
#: that came close on the benchmarks (bench_methods.py: Iso-CTS/Iso-C with a searched scale, WUDI,
#: ACE), RegMean, the classic ones, then every other registered method in registry order.
AUTO_FIRST = (AUTO_METHOD, "iso_cts", "iso_c", "wudi", "ace", "regmean", "ties", "task_arithmetic")


def auto_methods(with_data_methods: bool = True) -> list[str]:
    """The methods ``method="auto"`` searches, in the order they are tried.

    ``with_data_methods=False`` leaves out the methods that need each task's data (RegMean), for
    layers that cannot compute them (a sharded fit-end merge).

    Example:
        >>> auto_methods()[:3], "regmean" in auto_methods(False)
        (['tsv', 'iso_cts', 'iso_c'], False)
    """
    names = list(dict.fromkeys([m for m in AUTO_FIRST if m in METHODS] + list(METHODS)))
    return [m for m in names if with_data_methods or not get_method(m).needs_data]


@dataclass(frozen=True)
class AutoGrid:
    """One method's grids in an auto search: the coarse pass uses ``ks[0]`` and lams around ``default_lam``.

    Attributes:
        method: the registered method.
        ks: its k values (``[None]`` without k), the method's default first.
        lams: its lam grid, sorted.
        default_lam: where the coarse lams are centred (the method's default).
    """

    method: str
    ks: tuple[float | None, ...]
    lams: tuple[float, ...]
    default_lam: float


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices``; the error names the argument and the choices.

    Example:
        >>> check_choice("mode", "max", MODES)
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_methods(method: Any) -> list[str]:
    """``method`` (a name or a list of names) as a list without repeats, every name checked against the registry.

    Example:
        >>> check_methods(["ties", "tsv", "ties"])
        ['ties', 'tsv']
    """
    methods = [method] if isinstance(method, str) else list(method) if isinstance(method, Sequence) else None
    if not methods or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"method={method!r}: expected a registered method name or a non-empty list of them")
    for m in methods:
        get_method(m)  # an unknown name fails here, naming the registered methods
    return list(dict.fromkeys(methods))


def check_objective(objective: Any, normalize: bool = True) -> None:
    """``"mean"``, ``"normalized"``, ``"<either>:<metric>"`` or a callable; ``"normalized"`` needs ``normalize``."""
    if callable(objective):
        return
    kind = objective.partition(":")[0] if isinstance(objective, str) else ""
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(
            f"objective must be 'mean', 'normalized', 'mean:<metric>', 'normalized:<metric>' or a callable, got {objective!r}"
        )
    if kind == "normalized" and not normalize:
        raise ValueError("objective 'normalized' needs the fine-tuned scores: leave normalize=True")


def k_grid(k: Any) -> list[float]:
    """The k values to evaluate (the registry's one grid validator, :func:`~lightning_ties.merging.check_k_grid`).

    Example:
        >>> k_grid("search")
        [0.1, 0.2, 0.3]
    """
    return check_k_grid(k)  # type: ignore[return-value]  # without a method every value is a number


def lam_grid(method: str, lam: Any) -> list[float]:
    """The lam values to evaluate (the registry's one grid validator, :func:`~lightning_ties.merging.check_lam_grid`).

    Example:
        >>> lam_grid("task_arithmetic", "paper")[:3]
        [0.1, 0.2, 0.3]
        >>> lam_grid("ties", 1.0)
        [1.0]
    """
    return check_lam_grid(method, lam)


@dataclass(frozen=True)
class SearchOptions:
    """What a k/lam search walks and how it picks: checked by :meth:`build`, then passed inward as is.

    Attributes:
        methods: the merge methods searched (registered names, no repeats; ties go to the first).
        ks: the k grid of the methods that trim; ``None``: the merger's own k.
        lams: each method's lam grid.
        objective: ``"mean"``, ``"normalized"``, ``"<either>:<metric>"`` or a callable of the scores.
        mode: ``"max"`` or ``"min"``.
        strategy: ``"grid"`` or ``"coarse_to_fine"``.
        normalize: measure each fine-tuned model's own score (needed by ``"normalized"``).
        auto: ``method="auto"``: a budgeted coarse-to-fine search over :attr:`methods`
            (:func:`~.search.auto_search`) instead of walking each grid.
        budget_s: wall seconds an auto search may spend (``None``: no limit).
    """

    methods: tuple[str, ...]
    ks: tuple[float, ...] | None
    lams: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: MappingProxyType({}))
    objective: SearchObjective = "mean"
    mode: str = "max"
    strategy: str = "grid"
    normalize: bool = True
    auto: bool = False
    budget_s: float | None = None

    @classmethod
    def build(
        cls,
        method: str | Sequence[str] = "ties",
        k: Any = None,
        lam: Any = "paper",
        objective: str | Callable[..., float] = "mean",
        mode: str = "max",
        strategy: str = "grid",
        normalize: bool = True,
        strict_k: bool = True,
        max_candidates: int = MAX_CANDIDATES,
        budget_s: float | None = None,
        with_data_methods: bool = True,
    ) -> SearchOptions:
        """Check every value and freeze them.

        Args:
            method: a registered method or a list of them.
            k: a number, a list, ``"search"`` (0.1, 0.2, 0.3) or ``None`` (the merger's k); a k given
                for methods of which none trims is an error (``strict_k=False``: ignored).
            lam: ``"paper"``/``"search"`` (each method's own grid), a number or a list (every method).
            objective, mode, strategy, normalize: as the attributes.
            max_candidates: a larger grid is refused (pass its size to confirm it).
            budget_s: wall seconds for ``method="auto"`` (a positive number or ``None``).
                ``method="auto"`` searches each method's own grids: a single k or lam number is
                ignored there, a list replaces every method's grid.
            with_data_methods: whether ``method="auto"`` includes RegMean (needs each task's data).
        """
        auto = method == "auto"
        methods = auto_methods(with_data_methods) if auto else check_methods(method)
        if budget_s is not None:
            if not auto:
                raise ValueError(f"budget_s={budget_s!r} limits method='auto' only; leave it out for method={method!r}")
            if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
                raise ValueError(f"budget_s must be a positive number of seconds or None, got {budget_s!r}")
        if k is not None and not any(get_method(m).has_k for m in methods):
            if strict_k and not auto:
                raise ValueError(f"method(s) {methods} have no k to search; leave k out")
            k = None
        if auto:  # a search of each method's own grids: only lists replace them (a callback's default k, lam don't)
            k = None if isinstance(k, (int, float)) else k
            lam = "paper" if lam is None or isinstance(lam, (int, float)) else lam
        ks = tuple(k_grid(k)) if k is not None else None
        # a method without lam (averaging) refuses any lam but its own here
        # an auto search keeps the fixed lam of methods without one (averaging) whatever list is given
        lams = MappingProxyType(
            {m: tuple(lam_grid(m, lam if get_method(m).has_lam or not auto else "paper")) for m in methods}
        )
        check_choice("mode", mode, MODES)
        check_choice("search_strategy", strategy, STRATEGIES)
        check_objective(objective, normalize)
        size = sum((len(ks) if ks is not None and get_method(m).has_k else 1) * len(lams[m]) for m in methods)
        problem = grid_size_problem(size, max_candidates, "max_candidates", "k / lam / method")
        if problem:
            raise ValueError(problem)
        return cls(tuple(methods), ks, lams, objective, mode, strategy, bool(normalize), auto,
                   None if budget_s is None else float(budget_s))

    def k_values(self, method: str, default_k: float | None) -> list[float | None]:
        """The k grid of ``method``: ``[None]`` for methods without k, else :attr:`ks` or ``[default_k]``."""
        if not get_method(method).has_k:
            return [None]
        return list(self.ks) if self.ks is not None else k_grid(default_k)

    def grids(self, default_k: float | None) -> dict[str, tuple[list[float | None], list[float]]]:
        """Each method's (k grid, lam grid), in :attr:`methods` order."""
        return {m: (self.k_values(m, default_k), list(self.lams[m])) for m in self.methods}

    def auto_grids(self) -> list[AutoGrid]:
        """Each method's :class:`AutoGrid` for ``method="auto"``, in :attr:`methods` order.

        A trimming method's k grid is its default k then :attr:`ks` (default 0.1, 0.2, 0.3).

        Example:
            >>> g = SearchOptions.build("auto").auto_grids()[0]
            >>> g.method, g.ks, g.default_lam, len(g.lams)
            ('tsv', (None,), 1.0, 30)
        """
        grids = []
        for m in self.methods:
            spec = get_method(m)
            ks: tuple[float | None, ...] = (None,)
            if spec.has_k:
                ks = tuple(dict.fromkeys([spec.default_k, *(self.ks if self.ks is not None else DEFAULT_K_GRID)]))
            grids.append(AutoGrid(m, ks, tuple(sorted(self.lams[m])), spec.default_lam))
        return grids

    def total(self, default_k: float | None) -> int | None:
        """How many candidates a grid search scores (``None`` for coarse-to-fine and auto: it depends on the scores)."""
        if self.strategy != "grid" or self.auto:
            return None
        return sum(len(ks) * len(lams) for ks, lams in self.grids(default_k).values())

    def without_data_methods(self) -> SearchOptions:
        """These options less the methods that need each task's data (RegMean), as ``with_data_methods=False``
        builds them: what a layer that cannot compute those methods (a sharded fit-end merge) searches.

        Example:
            >>> SearchOptions.build("auto").without_data_methods().methods == tuple(auto_methods(False))
            True
        """
        methods = tuple(m for m in self.methods if not get_method(m).needs_data)
        if not methods:
            raise ValueError(f"method(s) {list(self.methods)} all need each task's data; choose a data-free method")
        return replace(self, methods=methods, lams=MappingProxyType({m: self.lams[m] for m in methods}))

    @property
    def searching(self) -> bool:
        """Whether there is more than one candidate to choose from."""
        return (
            len(self.methods) > 1
            or (self.ks is not None and len(self.ks) > 1 and any(get_method(m).has_k for m in self.methods))
            or any(len(g) > 1 for g in self.lams.values())
        )


def params_for(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``params`` that ``method`` has (one ``method_params`` serves every method of a search).

    Example:
        >>> params_for("tsv", {"sign": "count"}), params_for("ties", {"sign": "count"})
        ({}, {'sign': 'count'})
    """
    accepted = get_method(method).parameters()
    return {name: value for name, value in params.items() if name in accepted}


def check_method_params(methods: Sequence[str], params: Mapping[str, Any]) -> None:
    """Refuse, before any work, a ``method_params`` name that none of ``methods`` has (a typo), or a value one of
    them refuses; each method later gets the names it has (:func:`params_for`), in any order of ``methods``.

    Example:
        >>> check_method_params(["tsv", "ties"], {"sign": "count"})
        >>> check_method_params(["ties", "tsv"], {"sigm": "count"})
        Traceback (most recent call last):
        ...
        ValueError: method_params ['sigm']: no method of ['ties', 'tsv'] has them; their parameters: ties ['k', 'merge', 'scope', 'sign'], tsv [] (lam is an argument of its own, not a method parameter)
    """
    unknown = [name for name in params if not any(name in get_method(m).parameters() for m in methods)]
    if unknown:
        known = ", ".join(f"{m} {sorted(get_method(m).parameters())}" for m in methods)
        raise ValueError(f"method_params {unknown}: no method of {list(methods)} has them; their parameters: {known}"
                         " (lam is an argument of its own, not a method parameter)")
    for method in methods:
        MergeOptions.from_keywords(method, **params_for(method, params))  # the method names a value it refuses


__all__ = [
    "AUTO_FIRST",
    "AutoGrid",
    "auto_methods",
    "MODES",
    "OBJECTIVE_KINDS",
    "STRATEGIES",
    "SearchOptions",
    "check_choice",
    "check_method_params",
    "check_methods",
    "check_objective",
    "k_grid",
    "lam_grid",
    "params_for",
]
