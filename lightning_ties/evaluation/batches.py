"""One convention for what a batch is: which part goes into the model and which part is the target.

Every user of batches (``MultiTaskMergeModule``'s validation loop, the learned coefficients'
objectives, the demo) reads them through :func:`split_batch` and :func:`logits_of`, so a batch
that one accepts, all accept. Accepted batches:

- ``(inputs, target)``; extra elements after the target (sample ids, weights) are ignored;
- ``(inputs,)`` or a tensor alone: no target (unlabelled data, e.g. the entropy objective);
- a dict: the first of :data:`TARGET_KEYS` present is the target, the other entries are keyword
  arguments of the model (Hugging Face style ``model(**batch)``).

``inputs`` is a tensor (one positional argument), a tuple/list (positional arguments) or a dict
(keyword arguments). Model outputs are logits, or carry them as ``.logits``, ``["logits"]`` or as
the first element of a tuple.

Example:
    >>> import torch
    >>> args, kwargs, target = split_batch({"input_ids": torch.ones(2, 3), "labels": torch.tensor([0, 1])})
    >>> args, sorted(kwargs), target.tolist()
    ((), ['input_ids'], [0, 1])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

#: Keys of a dict batch that hold the target, in order of preference (Hugging Face uses ``labels``).
TARGET_KEYS: tuple[str, ...] = ("labels", "label", "y", "target", "targets")


class Batch(NamedTuple):
    """A batch split into the model's positional and keyword arguments and the target (None: unlabelled)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any


def _inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    return (inputs,), {}


def split_batch(batch: Any) -> Batch:
    """Split ``batch`` into ``(args, kwargs, target)`` following the convention of this module.

    Raises:
        ValueError: for a batch of another type (or an empty tuple); pass your own ``forward_fn``.

    Example:
        >>> import torch
        >>> args, kwargs, y = split_batch((torch.ones(2, 3), torch.tensor([0, 1])))
        >>> args[0].shape, kwargs, y.tolist()
        (torch.Size([2, 3]), {}, [0, 1])
        >>> split_batch(torch.ones(2)).target is None
        True
    """
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        key = next((k for k in TARGET_KEYS if k in kwargs), None)
        target = kwargs.pop(key) if key is not None else None
        return Batch((), kwargs, target)
    if isinstance(batch, torch.Tensor):
        return Batch((batch,), {}, None)
    if isinstance(batch, (list, tuple)) and batch:
        args, kwargs = _inputs(batch[0])
        return Batch(args, kwargs, batch[1] if len(batch) >= 2 else None)
    raise ValueError(
        f"cannot split a batch of type {type(batch).__name__}"
        + (" with no elements" if isinstance(batch, (list, tuple)) else "")
        + f" into inputs and target: use (inputs, target), a dict with one of {list(TARGET_KEYS)}, "
        "or inputs alone; otherwise pass forward_fn"
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits``, ``["logits"]``, or a tuple's first element.

    Example:
        >>> import torch
        >>> logits_of((torch.zeros(1, 2), "hidden states")).shape
        torch.Size([1, 2])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"model output of type {type(output).__name__} has no logits; return a tensor, .logits, ['logits'] "
        "or a tuple whose first element is the logits"
    )


def predict_and_target(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    """Run ``model`` on one batch: ``(logits, target)`` (target None for unlabelled batches).

    Example:
        >>> import torch
        >>> logits, y = predict_and_target(torch.nn.Identity(), {"input": torch.eye(2), "y": torch.tensor([0, 1])})
        >>> logits.tolist(), y.tolist()
        ([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    """
    args, kwargs, target = split_batch(batch)
    return logits_of(model(*args, **kwargs)), target


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor (anything with a ``.to``) moved to ``device``, containers rebuilt.

    What Lightning's ``move_data_to_device`` does for the batches of this convention, without
    Lightning: the merge core runs its plain evaluation loops (and RegMean's data pass) with it.

    Example:
        >>> import torch
        >>> moved = move_to_device({"x": (torch.ones(1),), "n": 3}, "cpu")
        >>> moved["x"][0].device.type, moved["n"]
        ('cpu', 3)
    """
    if callable(getattr(batch, "to", None)) and not isinstance(batch, type):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple: rebuilt field by field
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, Mapping):
        items = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a mapping type that cannot be built from a dict
            return items
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


__all__ = ["TARGET_KEYS", "Batch", "logits_of", "move_to_device", "predict_and_target", "split_batch"]
