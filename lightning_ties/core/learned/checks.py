"""Checks of a learned merge's arguments, made before any tensor is read, and its coefficient logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .groups import check_granularity
from .objectives import OBJECTIVES

#: above this many coefficients, one mean per task is logged instead of every coefficient
LOG_EACH_COEFFICIENT = 64


def check_arguments(model: Any, tasks: Any, granularity: str, objective: Any, l2: Any, holdout: Any, lr: Any) -> None:
    """Refuse a bad argument of ``LearnedMergeModule``, naming it and its value.

    Example:
        >>> check_arguments(nn.Linear(1, 1), {"a": {}}, "layer", "ce", -1.0, 0.2, 0.01)
        Traceback (most recent call last):
        ...
        ValueError: l2 must be a number >= 0, got -1.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the architecture to run), got {type(model).__name__}")
    if not isinstance(tasks, Mapping) or len(tasks) < 1:
        raise ValueError("tasks must be a dict task name -> fine-tuned model with at least one task")
    check_granularity(granularity)
    if not callable(objective) and objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)} or a callable")
    if not (isinstance(l2, (int, float)) and l2 >= 0):
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(holdout, Mapping) and not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise ValueError(f"holdout must be a fraction in [0, 1) or a dict of loaders, got {holdout!r}")


def coefficient_logs(lam: torch.Tensor, tasks: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    """``learned/lam/<task>/<group>`` of every coefficient, or one mean per task when there are many.

    Example:
        >>> coefficient_logs(torch.tensor([[0.5, 1.0]]), ["a"], ["l0.", "l1."])
        {'learned/lam/a/l0': 0.5, 'learned/lam/a/l1': 1.0}
    """
    if lam.numel() > LOG_EACH_COEFFICIENT:
        return {f"learned/lam/{t}/mean": float(lam[i].mean()) for i, t in enumerate(tasks)}
    return {f"learned/lam/{t}/{g.rstrip('.')}": float(lam[i, j]) for i, t in enumerate(tasks) for j, g in enumerate(groups)}


__all__ = ["LOG_EACH_COEFFICIENT", "check_arguments", "coefficient_logs"]
