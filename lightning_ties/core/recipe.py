"""What a fit-end merge does with the validation data it has: search, the paper's recipe, or fixed (k, lam).

- Data for every task: the search of the callback's :class:`~.options.SearchOptions` (or its one
  candidate, scored).
- No data at all: a search falls back to the paper's recipe (k=0.2, lam=1.0), unscored.
- Data for some tasks only: refused when there is something to search (the choice would ignore
  the others), else the fixed (k, lam) is applied unscored. Methods that need data (RegMean)
  need it for every task.

Example:
    >>> options = SearchOptions.build("ties", k=0.2, lam=[0.8, 1.0])
    >>> check_fit_data(options, {"a", "b"}, given=set(), task="b")
    "no validation data, so k/lam are not searched: the paper's recipe k=0.2, lam=1.0 will be used"
    >>> fixed_choice(options, some_data=False)
    (0.2, 1.0, 'no validation data: paper recipe k=0.2, lam=1.0')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..merging import get_method
from .options import SearchOptions
from .search import PAPER_DEFAULT_K, PAPER_DEFAULT_LAM


def check_fit_data(options: SearchOptions, names: set[str], given: set[str], task: str) -> str | None:
    """Refuse validation data that cannot drive ``options``; a note to show when the paper's recipe will be used.

    Args:
        options: the search.
        names: every task of the merge.
        given: the tasks that have validation data.
        task: this run's task (its own validation dataloaders evaluate it).
    """
    needs_data = [m for m in options.methods if get_method(m).needs_data]
    if needs_data and given != names:  # RegMean collects each task's Gram matrices on its data
        raise ValueError(
            f"method(s) {needs_data} need a validation dataloader for every task {sorted(names)} "
            f"(missing: {sorted(names - given)}); pass val_dataloaders, or choose a data-free method"
        )
    if given and given != names and options.searching:
        raise ValueError(
            f"task(s) {sorted(names - given)} have no validation dataloader; pass val_dataloaders for every task "
            f"{sorted(names)} (this run's own val dataloaders evaluate {task!r}), or none at all "
            f"to use the paper's recipe k={PAPER_DEFAULT_K}, lam={PAPER_DEFAULT_LAM}"
        )
    if not given and options.searching:
        return (
            "no validation data, so k/lam are not searched: the paper's recipe "
            f"k={PAPER_DEFAULT_K}, lam={PAPER_DEFAULT_LAM} will be used"
        )
    return None


def check_known_tasks(val_dataloaders: Mapping[str, Any], names: set[str]) -> None:
    """Every task ``val_dataloaders`` names must be one of ``names``."""
    unknown = sorted(set(val_dataloaders) - names)
    if unknown:
        raise ValueError(f"val_dataloaders given for unknown task(s) {unknown}; tasks are {sorted(names)}")


def fixed_choice(options: SearchOptions, some_data: bool) -> tuple[float | None, float, str]:
    """``(k, lam, reason)`` of a merge applied without scoring: the paper's recipe for a search, else the given values."""
    method = get_method(options.methods[0])
    if options.searching:
        k = PAPER_DEFAULT_K if method.has_k else None
        lam = PAPER_DEFAULT_LAM if method.has_lam else method.default_lam
        return k, lam, f"no validation data: paper recipe k={k}, lam={lam}"
    k = options.k_values(options.methods[0], PAPER_DEFAULT_K)[0]
    lam = options.lams[options.methods[0]][0]
    why = "validation data for some tasks only" if some_data else "no validation data"
    return k, lam, f"{why}: fixed k={k}, lam={lam}, not scored"


__all__ = ["check_fit_data", "check_known_tasks", "fixed_choice"]
