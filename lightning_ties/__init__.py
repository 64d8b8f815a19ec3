"""lightning-ties: TIES-Merging for PyTorch Lightning.

The merge engine (pure torch) and the file sources/sinks load eagerly; the Lightning parts
(``TiesMerging``, ``MultiTaskMergeModule``, ...) load on first use, so merging alone never
pays Lightning's import time.

Example:
    >>> import torch
    >>> from lightning_ties import ties_merge
    >>> base = {"w": torch.zeros(5)}
    >>> ties_merge(base, [{"w": torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5])}], k=0.4)["w"].tolist()
    [0.0, -2.0, 0.0, 3.0, 0.0]
"""

from __future__ import annotations

import importlib
from typing import Any

from . import io as io  # registers file sources with the engine
from .merging import *  # noqa: F401,F403
from .merging import __all__ as _merging_all

__version__ = "0.1.0"

# Subpackages whose public names (their ``__all__``) are re-exported lazily.
_LAZY_SUBPACKAGES = ("lightning_ties.io", "lightning_ties.lightning")


def __getattr__(name: str) -> Any:
    for modname in _LAZY_SUBPACKAGES:
        module = importlib.import_module(modname)
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module 'lightning_ties' has no attribute {name!r}")


__all__ = [*_merging_all, "__version__"]
