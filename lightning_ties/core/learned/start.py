"""Where the coefficients start (the scale a search chose) and which granularity the hold-out prefers.

Learned coefficients refine a merge; they start best where a search put it: every coefficient at
the best lam of a search (:func:`start_scale`; ``lam="search"`` runs one on the hold-out,
:func:`search_start_scale`), not at the method's default. ``granularity="auto"`` trains per layer,
then per tensor from the per-layer result, and keeps the one with the lower hold-out loss
(:func:`choose_granularity`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from ..search import SearchResult, run_search

#: What ``lam=`` of learned coefficients accepts: a number, ``"search"``, a search's result, or None (the method's default).
StartScale = float | str | SearchResult | None
#: ``granularity="auto"`` tries these, coarse first; each later one starts from the one before.
AUTO_GRANULARITIES = ("layer", "tensor")
#: The share of the epochs and of the time budget the per-layer phase of ``granularity="auto"`` gets
#: (few coefficients: on the MiniLM benchmark its hold-out loss stopped improving after one epoch of 5).
AUTO_FIRST_SHARE = 0.2


def start_scale(lam: StartScale, method: str, k: float | None) -> tuple[float | str | None, float | None]:
    """``(lam, k)`` to build the coefficients from: a :class:`SearchResult` gives its best lam (and k).

    The result must be a search of ``method`` (a search over several methods: its winner); its k
    is used when ``k`` is None and must equal ``k`` otherwise. Numbers, ``"search"`` and None pass
    through (None: the method's default lam).

    Example:
        >>> from lightning_ties.core.search import run_search
        >>> searched = run_search(lambda k, lam: {"a": {"acc": -abs(lam - 1.2)}}, [0.2], [0.8, 1.2, 1.6])
        >>> start_scale(searched, "ties", None)
        (1.2, 0.2)
        >>> start_scale(0.7, "ties", 0.3)
        (0.7, 0.3)
    """
    if isinstance(lam, SearchResult):
        if lam.lam is None:
            raise ValueError("lam is a search result with no candidate and no chosen lam: run the search first")
        if lam.best_method != method:
            raise ValueError(f"lam is a search result whose best method is {lam.best_method!r}, but method={method!r}: "
                             f"pass method={lam.best_method!r} to learn on the winner's shares")
        if k is not None and lam.k is not None and float(k) != float(lam.k):
            raise ValueError(f"k={k} differs from the k the search chose ({lam.k}): leave k out to use the search's")
        return float(lam.lam), (lam.k if k is None else k)
    if isinstance(lam, str) and lam != "search":
        raise ValueError(f"lam={lam!r}: pass a number, 'search' (the best scale on the hold-out) or a search result")
    if lam is not None and not isinstance(lam, (str, int, float)):
        raise TypeError(f"lam must be a number, 'search', a SearchResult or None, got {type(lam).__name__}")
    return (float(lam) if isinstance(lam, (int, float)) else lam), k


def search_start_scale(holdout_losses: Callable[[float], Mapping[str, float]], grid: Sequence[float],
                       method: str) -> SearchResult:
    """The scale with the lowest mean hold-out loss over ``grid``, searched coarse to fine.

    ``holdout_losses(lam)`` sets every coefficient to ``lam`` and returns each task's hold-out loss.

    Example:
        >>> search_start_scale(lambda lam: {"a": (lam - 0.6) ** 2, "b": (lam - 0.8) ** 2}, [0.2, 0.4, 0.6, 0.8, 1.0], "tsv").lam
        0.6
    """
    if not grid:
        raise ValueError(f"method {method!r} has no lam grid to search the start scale on: pass lam= a number")
    return run_search(lambda _k, lam: {t: {"loss": v} for t, v in holdout_losses(lam).items()}, [None],
                      sorted(grid), strategy="coarse_to_fine", objective="mean:loss", mode="min", method=method)


def choose_granularity(best_losses: Mapping[str, float]) -> str:
    """The granularity with the lowest best hold-out loss; on a tie the first (the coarser) one.

    Example:
        >>> choose_granularity({"layer": 0.41, "tensor": 0.39}), choose_granularity({"layer": 0.4, "tensor": 0.4})
        ('tensor', 'layer')
    """
    if not best_losses:
        raise ValueError("no granularity was evaluated on the hold-out")
    return min(best_losses, key=lambda g: (best_losses[g], list(best_losses).index(g)))


def split_budget(max_epochs: int, max_time_s: float | None, share: float = AUTO_FIRST_SHARE) -> tuple[int, int, float | None]:
    """The epochs of the two phases of ``granularity="auto"`` and the first one's time limit.

    The first (per-layer) phase gets ``share`` of both; the second gets the rest of the epochs and
    whatever time the first left.

    Example:
        >>> split_budget(10, 300.0)
        (2, 8, 60.0)
    """
    first = min(max(1, round(max_epochs * share)), max(1, max_epochs - 1))
    return first, max(1, max_epochs - first), (None if max_time_s is None else max_time_s * share)


__all__ = ["AUTO_FIRST_SHARE", "AUTO_GRANULARITIES", "StartScale", "choose_granularity", "search_start_scale",
           "split_budget", "start_scale"]
