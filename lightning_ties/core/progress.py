"""Progress of a k/lam search that people can read: "candidate i of N, k, lam, best so far".

A search runs one ``trainer.validate`` per candidate; left alone, Lightning draws one anonymous
"Validation" bar per candidate (twenty of them for a small grid). While a search runs,
:class:`SearchProgress` turns the trainer's own bar off and shows instead:

- one line per finished candidate through ``rank_zero_info`` (plain consoles, log files, rank zero only);
- when the trainer had a progress bar, one tqdm bar over the candidates whose postfix carries the
  candidate's k, lam and score and the best so far.

Example:
    >>> from lightning_ties.core.search import Candidate, SearchResult
    >>> result = SearchResult(method="ties", candidates=[Candidate(0.2, 1.0, {"a": {"acc": 0.5}}, 0.5)])
    >>> describe_candidate(result, result.candidates[0], total=18)
    'ties search: candidate 1 of 18: k=0.2, lam=1, objective=0.5 | best so far 0.5 at k=0.2, lam=1'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
from tqdm.auto import tqdm

from ..merging import MergeOptions, as_source
from ..merging.sources import TensorSource
from .search import Candidate, SearchResult


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _point(candidate: Candidate, with_method: bool = False) -> str:
    method = f"{candidate.method} " if with_method and candidate.method else ""
    k = "" if candidate.k is None else f"k={_num(candidate.k)}, "
    return f"{method}{k}lam={_num(candidate.lam)}"


def describe_candidate(result: SearchResult, candidate: Candidate, total: int | None) -> str:
    """One line for a finished candidate: its place, k, lam, objective and the best so far."""
    index = result.candidates.index(candidate) + 1 if candidate in result.candidates else len(result.candidates)
    of = f" of {total}" if total else ""
    several = len(result.methods or ()) > 1  # name the method only when there is a choice of them
    name = "method" if several else result.method
    line = f"{name} search: candidate {index}{of}: {_point(candidate, several)}, objective={_num(candidate.objective)}"
    best = result.best
    if best is not None:
        line += f" | best so far {_num(best.objective)} at {_point(best, several)}"
    return line


class SearchProgress:
    """Report a search's candidates as they finish (a context manager around the search).

    Args:
        method: the merge method searched (the bar's label).
        total: candidates the search evaluates, or None when the strategy decides as it goes.
        done: candidates already finished (a resumed search).
        trainer: the Trainer whose validation runs the candidates, or None (no bar).
        say: where the per-candidate lines go (``rank_zero_info``).
    """

    def __init__(
        self, method: str, total: int | None, done: int, trainer: Any, say: Callable[[str], None]
    ) -> None:
        self.method = method
        self.total = total
        self.done = done
        self.trainer = trainer
        self.say = say
        self.bar: Any = None
        self._silenced: Any = None

    def __enter__(self) -> SearchProgress:
        inner = getattr(self.trainer, "progress_bar_callback", None) if self.trainer is not None else None
        if inner is not None and inner.is_enabled:
            inner.disable()  # one bar over candidates instead of one validation bar per candidate
            self._silenced = inner
            if self.trainer.is_global_zero:
                self.bar = tqdm(
                    total=self.total, initial=self.done, desc=f"{self.method} search", unit="candidate", leave=True
                )
        return self

    def update(self, result: SearchResult, candidate: Candidate) -> None:
        """Report ``candidate``, just added to ``result``."""
        self.say(describe_candidate(result, candidate, self.total))
        if self.bar is not None:
            best = result.best
            postfix = f"{_point(candidate)}, score={_num(candidate.objective)}"
            if best is not None:
                postfix += f", best={_num(best.objective)} at {_point(best)}"
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._silenced is not None:
            self._silenced.enable()
            self._silenced = None


class _ReadProgress:
    """``source``, advancing ``bar`` by each tensor's bytes as the engine reads it (once per key
    in a per-tensor method's pass)."""

    def __init__(self, source: TensorSource, bar: Any) -> None:
        self.source, self.bar, self.label = source, bar, source.label

    def __getattr__(self, name: str) -> Any:  # keys, spec, aliases, files... of the wrapped source
        return getattr(self.__dict__["source"], name)

    def keys(self) -> Sequence[str]:
        return self.source.keys()

    def spec(self, key: str) -> Any:
        return self.source.spec(key)

    def get(self, key: str) -> torch.Tensor:
        value = self.source.get(key)
        self.bar.update(value.numel() * value.element_size())
        return value


@contextlib.contextmanager
def preparation_progress(base: TensorSource, options: MergeOptions, keys: Sequence[str]) -> Iterator[Any]:
    """``base`` as the engine should read it: for per-tensor (SVD, closed-form) methods, whose
    preparation factors every tensor before the first candidate (minutes on a large model), a
    tqdm bar over the bytes of the merged tensors (shown on a terminal); others read it as is.

    Example:
        >>> src = as_source({"w": torch.zeros(2)})
        >>> with preparation_progress(src, MergeOptions("ties"), ["w"]) as read:
        ...     read is src
        True
    """
    if options.spec.tensor_fn is None:
        yield base
        return
    from tqdm import auto  # looked up when called (as tqdm.auto.tqdm): what a caller patched is what shows

    total = sum(base.spec(k).numel * torch.empty((), dtype=base.spec(k).dtype).element_size() for k in keys)
    with auto.tqdm(total=total, desc=f"preparing {options.method}", unit="B", unit_scale=True, unit_divisor=1024,
              leave=False, disable=None) as bar:
        yield _ReadProgress(base, bar)


__all__ = ["SearchProgress", "describe_candidate", "preparation_progress"]
