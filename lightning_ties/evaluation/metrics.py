"""The package's one accuracy: a torchmetrics ``Metric`` over arg-max predictions, any number of classes.

torchmetrics' ``MulticlassAccuracy`` needs ``num_classes`` up front; merged models are scored with
per-task heads whose label sets differ, so the default task metric reads the number of classes
from the logits instead. It is the same number as ``MulticlassAccuracy(num_classes,
average="micro", ignore_index=-100)`` (a test pins the two together), and, being a torchmetrics
``Metric``, its counts are summed across processes by the library.

Example:
    >>> import torch
    >>> m = ArgmaxAccuracy()
    >>> m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, -100]))
    >>> m.compute()
    tensor(0.5000)
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

#: Target value that marks a position to skip (PyTorch's ``cross_entropy`` and Hugging Face's default).
IGNORE_INDEX = -100


class ArgmaxAccuracy(Metric):
    """Share of samples whose arg-max prediction equals the target (targets equal to ``ignore_index`` skipped).

    Args:
        ignore_index: target value that is not counted (padding, masked tokens); None counts every target.

    Example:
        >>> import torch
        >>> m = ArgmaxAccuracy()
        >>> m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        >>> m.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int | None = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: ``preds`` are logits ``[..., classes]`` or labels shaped like ``target``."""
        labels = preds.argmax(dim=-1) if preds.dim() == target.dim() + 1 else preds
        if labels.shape != target.shape:
            raise ValueError(
                f"ArgmaxAccuracy: predictions of shape {tuple(preds.shape)} do not match targets of shape "
                f"{tuple(target.shape)}; pass logits [..., classes] or labels shaped like the targets"
            )
        counted = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        self.correct += ((labels == target) & counted).sum()
        self.total += counted.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


__all__ = ["IGNORE_INDEX", "ArgmaxAccuracy"]
