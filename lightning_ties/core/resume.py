"""Search progress between runs: where a fit-end search keeps its finished candidates, and its results.

A search interrupted (killed, preempted) and started again re-scores nothing it finished: after
every candidate the progress (a :class:`~.search.SearchResult`) is written to
``save_dir/search_progress.json`` (atomically), or, without ``save_dir``, into the Trainer's
``last.ckpt`` through the callback's ``state_dict`` (see :func:`snapshot`). The final result is
written as ``search.json`` and ``search.csv``.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> write_progress(folder, SearchResult(method="ties", chosen=(0.2, 1.0)))
    >>> read_progress(folder).chosen
    (0.2, 1.0)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.atomic import atomic_open
from ..io.jsonsafe import loads
from .metrics import Scores
from .search import SearchResult

PROGRESS_FILE = "search_progress.json"


def read_progress(save_dir: str | os.PathLike[str] | None) -> SearchResult | None:
    """The progress stored under ``save_dir``, or ``None`` when there is none."""
    if save_dir is None:
        return None
    path = Path(save_dir) / PROGRESS_FILE
    return SearchResult.from_dict(loads(path.read_bytes(), str(path))) if path.exists() else None


def write_progress(save_dir: str | os.PathLike[str], progress: SearchResult) -> None:
    """Store ``progress`` under ``save_dir`` (atomically: a kill leaves the previous file whole)."""
    os.makedirs(save_dir, exist_ok=True)
    with atomic_open(Path(save_dir) / PROGRESS_FILE) as f:
        f.write(json.dumps(progress.to_dict(), indent=2, sort_keys=True).encode())


def write_results(save_dir: str | os.PathLike[str], result: SearchResult) -> None:
    """The chosen merge and every candidate: ``search.json`` and ``search.csv`` under ``save_dir``."""
    os.makedirs(save_dir, exist_ok=True)
    result.to_json(Path(save_dir) / "search.json")
    result.to_csv(Path(save_dir) / "search.csv")


def snapshot(running: SearchResult | None, reference: Scores, stored: SearchResult | None) -> SearchResult | None:
    """The progress as of now: a copy of the running search with the references measured so far, else ``stored``.

    Fine-tuned reference scores enter a result only once every task is measured; a snapshot keeps
    the finished ones, so a resumed search does not measure them again.
    """
    if running is None:
        return stored
    progress = SearchResult.from_dict(running.to_dict())
    progress.reference = {**reference, **progress.reference}
    return progress


__all__ = ["PROGRESS_FILE", "read_progress", "snapshot", "write_progress", "write_results"]
