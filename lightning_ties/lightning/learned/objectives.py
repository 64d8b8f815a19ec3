"""Training objectives of the coefficients and the batch/output conventions they read.

Batches are ``(inputs, target)`` (inputs a tensor, a tuple of positional arguments or a dict of
keyword arguments), a dict with a ``"labels"`` entry (the rest are keyword arguments), or inputs
alone (entropy objective). Model outputs are logits, or have a ``.logits`` / ``["logits"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: The objectives named by a string; a callable ``fn(output, target) -> loss`` is the other choice.
OBJECTIVES = ("ce", "entropy", "validation_step")
#: What the coefficients are trained to minimise: one of :data:`OBJECTIVES` or ``fn(output, target) -> loss``.
#: (Not :data:`lightning_ties.lightning.metrics.SearchObjective`, which a k/lam search maximises over scores.)
LossObjective = str | Callable[[Any, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor | None]:
    """``(args, kwargs, target)`` of a batch (see the module docstring for the accepted shapes).

    Example:
        >>> args, kwargs, y = split_batch((torch.ones(2, 3), torch.tensor([0, 1])))
        >>> args[0].shape, kwargs, y.tolist()
        (torch.Size([2, 3]), {}, [0, 1])
    """
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        target = kwargs.pop("labels", None)
        if target is None:
            target = kwargs.pop("label", None)
        return (), kwargs, target
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
        inputs, target = (batch[0], None) if len(batch) == 1 else batch
        if isinstance(inputs, Mapping):
            return (), dict(inputs), target
        if isinstance(inputs, (list, tuple)):
            return tuple(inputs), {}, target
        return (inputs,), {}, target
    raise ValueError(
        f"cannot read a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} elements" if isinstance(batch, (list, tuple)) else "")
        + ": use (inputs, target), a dict with 'labels', or inputs alone"
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output (a tensor, ``.logits`` or ``["logits"]``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"model output of type {type(output).__name__} has no logits; return a tensor or .logits")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1).long(), ignore_index=-100)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (AdaMerging's unsupervised objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


def correct_count(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    if target.dtype.is_floating_point or logits.shape[:-1] != target.shape:
        return 0.0, 0
    valid = target != -100
    return float(((logits.argmax(-1) == target) & valid).sum()), int(valid.sum())


class StepCaller(nn.Module):
    """Lets ``functional_call`` run the user's ``validation_step`` with merged parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.inner.validation_step(batch, batch_idx)


__all__ = ["OBJECTIVES", "LossObjective", "correct_count", "cross_entropy", "logits_of", "prediction_entropy", "StepCaller",
           "split_batch"]
