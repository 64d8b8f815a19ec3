"""Where the coefficients start (the scale a search chose) and which granularity the hold-out prefers.

Learned coefficients refine a merge; they start best where a search put it: every coefficient at
the best lam of a search (:func:`start_scale`; ``lam="search"`` runs one on the hold-out,
:func:`search_start_scale`), not at the method's default. ``granularity="auto"`` trains per layer,
then per tensor from the per-layer result, and keeps the one with the lower hold-out loss
(:func:`choose_granularity`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from ...merging.registry import METHODS
from ..search import SearchResult, run_search

#: What ``lam=`` of learned coefficients accepts: a number, ``"search"``, a search's result, or None (the method's default).
StartScale = float | str | SearchResult | None
#: ``granularity="auto"`` tries these, coarse first; each later one starts from the one before.
AUTO_GRANULARITIES = ("layer", "tensor")
#: The share of the epochs and of the time budget the per-layer phase of ``granularity="auto"`` gets
#: (few coefficients: on the MiniLM benchmark its hold-out loss stopped improving after one epoch of 5).
AUTO_FIRST_SHARE = 0.2


def learned_method(method: str, lam: StartScale) -> str:
    """The method whose shares are learned: ``method``, or for ``"auto"`` the best of the search ``lam`` that splits into shares.

    ``method="auto"`` finishes a search over several methods (``method="auto"`` of the module's
    search, the callback or the command): the winner may not split into per-task shares (Iso-C
    and Iso-CTS do not), so the coefficients are learned on the best candidate's method among
    those that do.

    Example:
        >>> from lightning_ties.core.search import Candidate
        >>> r = SearchResult(methods=["iso_cts", "tsv"], candidates=[
        ...     Candidate(None, 2.4, {}, 0.86, "iso_cts"), Candidate(None, 1.2, {}, 0.85, "tsv")])
        >>> learned_method("auto", r), learned_method("ties", r)
        ('tsv', 'ties')
    """
    if method != "auto":
        return method
    if not isinstance(lam, SearchResult):
        raise ValueError("method='auto' learns on the best method of a search: pass lam= that search's result "
                         "(e.g. module.search(trainer, loaders, method='auto'))")
    shared = lam.best_of([m for m in METHODS if METHODS[m].decomposes])
    if shared is None:
        tried = sorted({c.method or lam.method for c in lam.candidates})
        raise ValueError(f"the search in lam= tried no method that splits into per-task shares (tried: {tried}); "
                         f"search one of {sorted(m for m in METHODS if METHODS[m].decomposes)} too")
    return shared.method or lam.method


def start_scale(lam: StartScale, method: str, k: float | None) -> tuple[float | str | None, float | None]:
    """``(lam, k)`` to build the coefficients from: a :class:`SearchResult` gives ``method``'s best lam (and k).

    The result must hold candidates of ``method`` (a search over several methods: the best of
    ``method``'s, which need not be the winner's); its k is used when ``k`` is None and must
    equal ``k`` otherwise. Numbers, ``"search"`` and None pass through (None: the method's default lam).

    Example:
        >>> from lightning_ties.core.search import run_search
        >>> searched = run_search(lambda k, lam: {"a": {"acc": -abs(lam - 1.2)}}, [0.2], [0.8, 1.2, 1.6])
        >>> start_scale(searched, "ties", None)
        (1.2, 0.2)
        >>> start_scale(0.7, "ties", 0.3)
        (0.7, 0.3)
    """
    if isinstance(lam, SearchResult):
        best = lam.best_of([method])
        if best is None and lam.candidates:
            tried = sorted({c.method or lam.method for c in lam.candidates})
            raise ValueError(f"lam is a search result with no candidate of method={method!r} (it tried {tried}): "
                             f"pass method= one of those, or method='auto' for the best that splits into shares")
        lam_best = best.lam if best is not None else (lam.chosen[1] if lam.chosen and lam.method == method else None)
        if lam_best is None:
            raise ValueError("lam is a search result with no candidate and no chosen lam: run the search first")
        k_best = best.k if best is not None else lam.chosen[0]
        if k is not None and k_best is not None and float(k) != float(k_best):
            raise ValueError(f"k={k} differs from the k the search chose ({k_best}): leave k out to use the search's")
        return float(lam_best), (k_best if k is None else k)
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


def prefer_on_holdout(compared: Mapping[str, Mapping[str, float]]) -> str:
    """The merge the hold-out prefers: the highest mean accuracy (then the lower loss) when every
    entry has an accuracy, else the lowest loss; among equals the first (the learned coefficients).

    Example:
        >>> prefer_on_holdout({"learned": {"loss": 0.40, "acc": 0.86}, "iso_cts": {"loss": 0.45, "acc": 0.87}})
        'iso_cts'
        >>> prefer_on_holdout({"learned": {"loss": 0.40, "acc": 0.86}, "iso_cts": {"loss": 0.45, "acc": 0.86}})
        'learned'
    """
    if not compared:
        raise ValueError("nothing was scored on the hold-out to compare")
    with_acc = all("acc" in v for v in compared.values())
    names = list(compared)
    return min(names, key=lambda n: ((-compared[n]["acc"], compared[n]["loss"]) if with_acc else (compared[n]["loss"],),
                                     names.index(n)))


def finish_time(left_s: float, searched: SearchResult, method: str) -> float:
    """The training time of a learned finish that leaves ``left_s`` of a search's budget, all in.

    What the finish does besides training is taken off: computing ``method``'s shares and the
    winner's merge for the hold-out comparison, each about what that method's first candidate of
    the search took (its tau_m and one scoring pass).

    Example:
        >>> from lightning_ties.core.search import Candidate
        >>> r = SearchResult(methods=["iso_cts", "tsv"], candidates=[Candidate(None, 1.3, {}, 0.8, "iso_cts", 7.0),
        ...     Candidate(None, 2.0, {}, 0.9, "iso_cts", 3.0), Candidate(None, 1.0, {}, 0.85, "tsv", 6.0)])
        >>> finish_time(180.0, r, "tsv")
        167.0
    """
    firsts: dict[str, float] = {}
    for c in searched.candidates:
        firsts.setdefault(c.method or searched.method, c.seconds or 0.0)
    winner = searched.best_method
    reserve = firsts.get(method, 0.0) + (firsts.get(winner, 0.0) if winner != method else 0.0)
    return max(1.0, left_s - reserve)


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


__all__ = ["AUTO_FIRST_SHARE", "AUTO_GRANULARITIES", "StartScale", "choose_granularity", "finish_time", "learned_method",
           "prefer_on_holdout", "search_start_scale", "split_budget", "start_scale"]
