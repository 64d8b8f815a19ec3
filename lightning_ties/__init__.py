"""lightning-ties: TIES-Merging for PyTorch Lightning.

The merge engine (pure torch) loads eagerly; file sources and sinks (``lightning_ties.io``) load
on first use (the first path given to a merge, or any of their names), and so do the Lightning
parts (``TiesMerging``, ``MultiTaskMergeModule``, ...), so merging alone never pays Lightning's
import time. The Lightning parts come built on the Lightning package the process uses
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

from .merging import *  # noqa: F401,F403
from .merging import __all__ as _merging_all
from .merging import register_path_opener


def _open_path(path: Any, **kwargs: Any) -> Any:
    """Open a checkpoint path for the engine (``ties_merge("base/", ["a.ckpt"])``).

    The engine knows nothing of files; io loads here, on the first path, so that importing
    the engine (``lightning_ties.merging``) never loads io.
    """
    from .io import open_source

    return open_source(path, **kwargs)


register_path_opener(_open_path)

__version__ = "0.1.0"

#: Every public name loaded on first use, and where it lives: ``"io"`` (:mod:`lightning_ties.io`) or
#: ``"lightning"`` (the Lightning layer of :func:`lightning_layer`). One explicit table, checked by a
#: test against ``lightning_ties.io.__all__`` and the layer's ``__all__``, so looking up any other
#: name imports nothing and this package's face says what it offers.
LAZY_NAMES: dict[str, str] = {
    **dict.fromkeys((
        "ArgmaxAccuracy", "Candidate", "ContinualTiesMerging", "DEFAULT_K_GRID", "KeyMatchError", "LearnedMergeModule",
        "LearnedMergeResult", "MultiTaskMergeModule", "SearchOptions", "SearchResult", "TaskMetrics", "TiesMerging",
        "k_grid", "lam_grid", "learn_coefficients", "normalized", "plot_coefficients", "run_search", "summarize",
    ), "lightning"),
    **dict.fromkeys((
        "CheckpointError", "CommonRowsSource", "LoadReport", "LoraMergeReport", "LoraSource", "MergeInputError",
        "SafetensorsFile",
        "SafetensorsSource", "SafetensorsWriter", "ShardedWriter", "TaskVectorSource", "TaskVectorStore",
        "TorchFileSource", "atomic_dir", "atomic_file", "atomic_open", "build_model_card", "check_compatible",
        "load_into", "load_torch_file", "merge_lora_adapters", "merge_to", "open_source", "parse_size", "save_hf_folder", "save_lightning_checkpoint",
        "save_safetensors", "sha256_file",
    ), "io"),
    "io": "io",
}


def lightning_layer() -> ModuleType:
    """The Lightning layer for the Lightning package this process uses.

    ``lightning_ties.TiesMerging`` (and every other Lightning name) comes from
    :mod:`lightning_ties.pytorch` when the unified ``lightning`` package is imported and
    ``pytorch_lightning`` is not, else from :mod:`lightning_ties.pytorch_lightning`.
    When neither is imported yet, ``pytorch_lightning`` is used if installed. Set
    ``LIGHTNING_TIES_BACKEND=lightning`` or ``=pytorch_lightning`` to choose, or import
    ``lightning_ties.pytorch`` / ``lightning_ties.pytorch_lightning`` directly
    (``lightning_ties.lightning`` is the latter's first name).

    Example:
        >>> lightning_layer().__name__ in ("lightning_ties.pytorch_lightning", "lightning_ties.pytorch")
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
    return importlib.import_module("lightning_ties.pytorch" if choice == "lightning" else "lightning_ties.pytorch_lightning")


def __getattr__(name: str) -> Any:
    where = LAZY_NAMES.get(name)
    if where is None:
        raise AttributeError(f"module 'lightning_ties' has no attribute {name!r}")
    if where == "lightning":
        return getattr(lightning_layer(), name)
    io = importlib.import_module("lightning_ties.io")  # no Lightning there: cheap to load
    return io if name == "io" else getattr(io, name)


__all__ = [*_merging_all, "__version__", "lightning_layer"]
