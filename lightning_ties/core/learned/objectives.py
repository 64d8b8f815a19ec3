"""Training objectives of the coefficients.

Batches and outputs are read with the package's one convention (:func:`~lightning_ties.evaluation.split_batch`,
:func:`~lightning_ties.evaluation.logits_of`, re-exported here): ``(inputs, target)``, a dict whose
``labels``/``label``/``y``/``target``/``targets`` entry is the target, or inputs alone (entropy objective).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...evaluation.batches import logits_of, split_batch

#: The objectives named by a string; a callable ``fn(output, target) -> loss`` is the other choice.
OBJECTIVES = ("ce", "entropy", "validation_step")
#: What the coefficients are trained to minimise: one of :data:`OBJECTIVES` or ``fn(output, target) -> loss``.
#: (Not :data:`lightning_ties.core.metrics.SearchObjective`, which a k/lam search maximises over scores.)
LossObjective = str | Callable[[Any, Any], torch.Tensor]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1).long(), ignore_index=-100)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions (AdaMerging's unsupervised objective)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean()


class StepCaller(nn.Module):
    """Lets ``functional_call`` run the user's ``validation_step`` with merged parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.inner.validation_step(batch, batch_idx)


__all__ = ["OBJECTIVES", "LossObjective", "cross_entropy", "logits_of", "prediction_entropy", "StepCaller", "split_batch"]
