"""Pieces the Lightning-driven workflows (``search``, ``evaluate``, ``demo``) share: logger, module, candidates.

Imports Lightning (through :mod:`lightning_ties.lightning`); :mod:`.main` loads this only for
those workflows, so ``merge`` and ``--help`` start fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LEARNED, ConfigError, EvaluateConfig, Logger, SearchConfig, SearchGrid, SearchStrategy
from ..pytorch_lightning import MultiTaskMergeModule, k_grid, lam_grid
import pytorch_lightning as pl
from ..merging import get_method
from .common import method_args


def make_logger(kind: Logger | str, out_dir: Path) -> Any:
    """The Lightning logger the evaluation Trainer logs to: CSV (default), TensorBoard, or none."""
    kind = Logger(kind)
    if kind is Logger.none:
        return None
    if kind is Logger.tensorboard:
        try:  # optional dependency: only this logger needs it
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
        return pl.loggers.TensorBoardLogger(str(out_dir), name="logs")
    return pl.loggers.CSVLogger(str(out_dir), name="logs")


def module_for(
    cfg: SearchConfig | EvaluateConfig, model: nn.Module, method: Mapping[str, Any] | None = None
) -> MultiTaskMergeModule:
    """The multitask module over the config's base and tasks, set to ``method`` (default: TIES)."""
    name, lam, params = method_args(method or {"name": "ties"})
    k = params.pop("k", None)
    trim = {} if k is None else {"k": k}  # no k: the module's own default (the registry's) applies
    return MultiTaskMergeModule(
        cfg.base,
        dict(cfg.tasks),
        model=model,
        heads=cfg.heads,
        method=name,
        lam=lam,
        **trim,
        method_params=params,
        include=cfg.include,
        exclude=cfg.exclude,
    )


def count_candidates(methods: Sequence[str], grid: SearchGrid) -> int | None:
    """Search candidates the grid strategy evaluates (None for adaptive strategies: unknown up front)."""
    if SearchStrategy(grid.strategy) is not SearchStrategy.grid:
        return None
    total = 0
    for method in methods:
        if method == LEARNED or not get_method(method).searchable:
            continue
        ks = k_grid(grid.k) if get_method(method).has_k else [None]
        total += len(ks) * len(lam_grid(method, grid.lam))
    return total
