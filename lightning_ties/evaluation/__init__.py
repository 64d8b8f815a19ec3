"""Evaluation conventions shared by every layer above: what a batch is, and the one accuracy.

Pure torch and torchmetrics: no Lightning, no files, no command line. The Lightning layer
(:mod:`lightning_ties.core` and its shells) builds its validation loop, its learned-coefficient objectives
and its Trainer-driven scorer on these; the CLI and the demo use them through that layer.

- :func:`split_batch`, :func:`logits_of`, :func:`predict_and_target`, :data:`TARGET_KEYS`: the batch convention;
- :class:`ArgmaxAccuracy`: the default per-task metric (a torchmetrics ``Metric``).

Example:
    >>> import torch
    >>> from lightning_ties.evaluation import ArgmaxAccuracy, predict_and_target
    >>> logits, y = predict_and_target(torch.nn.Identity(), (torch.eye(3), torch.tensor([0, 2, 2])))
    >>> ArgmaxAccuracy()(logits, y)
    tensor(0.6667)
"""

from .batches import TARGET_KEYS, Batch, logits_of, move_to_device, predict_and_target, split_batch
from .metrics import IGNORE_INDEX, ArgmaxAccuracy

__all__ = [
    "IGNORE_INDEX",
    "TARGET_KEYS",
    "ArgmaxAccuracy",
    "Batch",
    "logits_of",
    "move_to_device",
    "predict_and_target",
    "split_batch",
]
