"""lightning-ties: TIES-Merging for PyTorch Lightning.

The merge engine (pure torch) and the file sources/sinks load eagerly; the Lightning parts
(``TiesMerging``, ``MultiTaskMergeModule``, ...) load on first use, so merging alone never
pays Lightning's import time, and they come built on the Lightning package the process uses
(``pytorch_lightning`` or the unified ``lightning``; see :func:`lightning_layer`).

Example:
    >>> import torch
    >>> from lightning_ties import ties_merge
    >>> base = {"w": torch.zeros(5)}
    >>> ties_merge(base, [{"w": torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5])}], k=0.4)["w"].tolist()
    [0.0, -2.0, 0.0, 3.0, 0.0]
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from . import io as io  # registers file sources with the engine
from .io import __all__ as _io_all
from .merging import *  # noqa: F401,F403
from .merging import __all__ as _merging_all

__version__ = "0.1.0"

#: Public names of the Lightning layer (``lightning_ties.lightning.__all__``, checked by a test), listed
#: here so that looking up any other name never imports Lightning.
LIGHTNING_NAMES = frozenset({
    "ArgmaxAccuracy", "Candidate", "DEFAULT_K_GRID", "LearnedMergeModule", "LearnedMergeResult",
    "MultiTaskMergeModule", "SearchResult", "TaskMetrics", "TiesMerging", "k_grid", "lam_grid",
    "learn_coefficients", "normalized", "plot_coefficients", "run_search", "summarize",
})


def lightning_layer() -> ModuleType:
    """The Lightning layer for the Lightning package this process uses.

    ``lightning_ties.TiesMerging`` (and every other Lightning name) comes from
    :mod:`lightning_ties.pytorch` when the unified ``lightning`` package is imported and
    ``pytorch_lightning`` is not, else from :mod:`lightning_ties.lightning` (``pytorch_lightning``).
    When neither is imported yet, ``pytorch_lightning`` is used if installed. Set
    ``LIGHTNING_TIES_BACKEND=lightning`` or ``=pytorch_lightning`` to choose, or import
    ``lightning_ties.pytorch`` / ``lightning_ties.lightning`` directly.

    Example:
        >>> lightning_layer().__name__ in ("lightning_ties.lightning", "lightning_ties.pytorch")
        True
    """
    choice = os.environ.get("LIGHTNING_TIES_BACKEND", "").strip()
    if choice not in ("", "lightning", "pytorch_lightning"):
        raise ValueError(f"LIGHTNING_TIES_BACKEND={choice!r}: use 'lightning' or 'pytorch_lightning'")
    if not choice:
        unified = "lightning.pytorch" in sys.modules
        classic = "pytorch_lightning" in sys.modules
        if unified != classic:
            choice = "lightning" if unified else "pytorch_lightning"
        else:
            has_classic = importlib.util.find_spec("pytorch_lightning") is not None
            choice = "pytorch_lightning" if classic or has_classic else "lightning"
    return importlib.import_module("lightning_ties.pytorch" if choice == "lightning" else "lightning_ties.lightning")


def __getattr__(name: str) -> Any:
    if name in _io_all:
        return getattr(io, name)
    if name in LIGHTNING_NAMES:
        return getattr(lightning_layer(), name)
    raise AttributeError(f"module 'lightning_ties' has no attribute {name!r}")


__all__ = [*_merging_all, "__version__", "lightning_layer"]
