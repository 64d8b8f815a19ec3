"""The one validator of k and lam grids: what a search (or a config's ``search`` section) may ask for.

A grid is written the same way everywhere (Python API, YAML configs, CLI overrides):

- a number: that one value;
- a non-empty list of numbers: those values (sorted, duplicates dropped);
- ``"paper"`` or ``"search"``: the paper's grid (k: :data:`DEFAULT_K_GRID`; lam: the method's
  :attr:`~lightning_ties.merging.methods.MergeMethod.paper_lam_grid`);
- ``None``: the method's default (k: its ``default_k``; lam: its ``default_lam``).

The config layer checks a file with these functions before any work starts, and the searches
expand the grid with the same call, so both accept and refuse exactly the same values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

from .methods import get_method
from .steps import PAPER_K, check_lam

#: k values searched for ``k="search"`` / ``"paper"``: the paper's neighbourhood of its k=0.2
#: (top 10, 20, 30% of each task vector).
DEFAULT_K_GRID: tuple[float, ...] = (0.1, 0.2, 0.3)
#: Words a grid may be instead of numbers.
GRID_WORDS: tuple[str, ...] = ("paper", "search")


def _values(value: Any, name: str, expected: str) -> list[Any] | None:
    """``value`` as a list of candidate numbers, None for a grid word; a ValueError otherwise."""
    if isinstance(value, str):
        if value in GRID_WORDS:
            return None
        raise ValueError(f"{name}={value!r}: expected {expected}")
    if isinstance(value, Sequence) and not isinstance(value, Mapping):
        values = list(value)
        if not values:
            raise ValueError(f"{name}={value!r}: the grid is empty; expected {expected}")
        return values
    return [value]


def _number(v: Any, name: str, grid: Any, expected: str) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise ValueError(f"{name}={grid!r}: {v!r} is not a number; expected {expected}")
    return float(v)


def check_k_grid(k: Any, method: str | None = None, name: str = "k") -> list[float | None]:
    """The k values to evaluate, checked: each in (0, 1] (the fraction of each task vector kept).

    Args:
        k: a number, a non-empty list of numbers, ``"paper"``/``"search"`` (:data:`DEFAULT_K_GRID`)
            or None (the method's default k; the paper's 0.2 when no method is given).
        method: a registered method name; for a method without k (task arithmetic, DARE) the
            value is still checked and the grid is ``[None]``.
        name: how the caller calls the value, used in error messages (``"search.k"`` in configs).

    Raises:
        ValueError: naming ``name`` and the value, for anything else.

    Example:
        >>> check_k_grid("paper")
        [0.1, 0.2, 0.3]
        >>> check_k_grid([0.3, 0.1, 0.3]), check_k_grid(None, "ties"), check_k_grid(0.5, "task_arithmetic")
        ([0.1, 0.3], [0.2], [None])
        >>> check_k_grid(1.5)
        Traceback (most recent call last):
        ...
        ValueError: k=1.5: 1.5 is outside (0, 1]; k is the fraction of each task vector kept
    """
    m = get_method(method) if method is not None else None
    expected = "a number in (0, 1], a non-empty list of them, 'paper' or 'search'"
    if k is None:
        default = m.default_k if m is not None else PAPER_K
        values: list[float] = [default] if default is not None else []
    else:
        raw = _values(k, name, expected)
        values = list(DEFAULT_K_GRID) if raw is None else [_number(v, name, k, expected) for v in raw]
        for v in values:
            if not 0.0 < v <= 1.0:  # nan fails this test too
                raise ValueError(f"{name}={k!r}: {v!r} is outside (0, 1]; k is the fraction of each task vector kept")
    if m is not None and not m.has_k:
        return [None]
    return sorted(set(values))


def check_lam_grid(method: str, lam: Any, name: str = "lam") -> list[float]:
    """The lam values to evaluate for ``method``, checked: each passes :func:`~lightning_ties.merging.steps.check_lam`.

    Args:
        method: a registered method name.
        lam: a number, a non-empty list of numbers, ``"paper"``/``"search"`` (the method's
            paper grid) or None (the method's default lam).
        name: how the caller calls the value, used in error messages (``"search.lam"`` in configs).

    Raises:
        ValueError: naming ``name`` and the value; also for a method without lam (averaging)
        given any lam but its fixed one.

    Example:
        >>> check_lam_grid("task_arithmetic", "paper")[:3]
        [0.1, 0.2, 0.3]
        >>> check_lam_grid("ties", 1.0), check_lam_grid("ties", [1.2, 0.8]), check_lam_grid("average", "search")
        ([1.0], [0.8, 1.2], [1.0])
        >>> check_lam_grid("ties", "best")
        Traceback (most recent call last):
        ...
        ValueError: lam='best': expected a number, a non-empty list of numbers, 'paper' or 'search'
    """
    m = get_method(method)
    expected = "a number, a non-empty list of numbers, 'paper' or 'search'"
    if lam is None:
        values = [m.default_lam]
    else:
        raw = _values(lam, name, expected)
        if raw is None:
            values = list(m.paper_lam_grid)
        else:
            values = [check_lam(_number(v, name, lam, expected), name) for v in raw]
    if not m.has_lam and any(v != m.default_lam for v in values):
        raise ValueError(
            f"{name}={lam!r}: method {m.name!r} has no lam to set or search; leave {name} out "
            f"(or use 'paper', which is its fixed {m.default_lam:g})"
        )
    return sorted(set(values))


#: More (method, k, lam) candidates than this are refused unless confirmed (a typo like ``lam=range(10**6)``).
MAX_CANDIDATES = 10_000


def grid_size_problem(
    candidates: int, limit: int = MAX_CANDIDATES, option: str = "search.max_candidates", grids: str = "search.k / search.lam"
) -> str | None:
    """Why a search grid of ``candidates`` (method, k, lam) points is refused (None: it is not).

    ``option`` is the setting that confirms a larger grid, ``grids`` the settings to narrow (as the caller names them).

    Example:
        >>> grid_size_problem(1000 * 1000)
        'the search grid has 1000000 candidates, more than search.max_candidates=10000: narrow search.k / search.lam, or set search.max_candidates=1000000 to confirm'
        >>> grid_size_problem(9, limit=10) is None
        True
    """
    if candidates <= limit:
        return None
    return (
        f"the search grid has {candidates} candidates, more than {option}={limit}: narrow {grids}, "
        f"or set {option}={candidates} to confirm"
    )


__all__ = ["DEFAULT_K_GRID", "GRID_WORDS", "MAX_CANDIDATES", "check_k_grid", "check_lam_grid", "grid_size_problem"]
