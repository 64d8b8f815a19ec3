"""Lazy tensor sources: the one interface the merge engine reads models through.

The engine never asks for a whole model. It asks a source for its key names, for a key's
shape and dtype (readable without loading data, so validation is cheap), and then for one
tensor at a time. In-memory state dicts and modules are wrapped here; file formats live in
:mod:`lightning_ties.io`, which registers an opener for paths so that this package stays
pure torch and knows nothing of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one entry, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


@runtime_checkable
class TensorSource(Protocol):
    """A model's weights, readable one tensor at a time.

    Implementations must return the same values for the same key on every call, since the
    engine may read a key more than once (the global trim reads each task twice).
    """

    label: str

    def keys(self) -> Sequence[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def get(self, key: str) -> torch.Tensor: ...


def tensor_identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two entries of a state dict one tensor (tied weights): the same storage seen the same way; None
    for an empty tensor (empty tensors may all share a null pointer without being tied)."""
    if t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def copy_state(state: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of ``state`` (on ``device``; None: where each tensor is) that keeps tied weights tied: every
    name of one tensor gets the same copy, so a merge of the copy still merges that tensor once.

    Example:
        >>> w = torch.ones(2)
        >>> copy = copy_state({"emb": w, "out": w, "b": torch.zeros(1)})
        >>> copy["emb"] is copy["out"], copy["emb"] is w
        (True, False)
    """
    copies: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    for key, t in state.items():
        identity = tensor_identity(t)
        copy = copies.get(identity) if identity is not None else None
        if copy is None:
            copy = t.detach().to(t.device if device is None else device, copy=True)
            if identity is not None:
                copies[identity] = copy
        out[key] = copy
    return out


class StateDictSource:
    """A source over an in-memory mapping name -> tensor (a state dict).

    Tied weights (two names for one tensor, e.g. ``out.weight`` is ``emb.weight``) are
    detected by storage identity (device, data pointer, shape, strides, dtype): ``aliases``
    maps each later name to the first one, so the engine merges the tensor once and gives
    both names the same result. ``device`` is where the tensors live (the first floating
    one's device; CPU for an empty dict): the engine merges there unless told otherwise.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str = "state_dict") -> None:
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{label}: entries {bad[:5]} are not tensors; pass a state dict of tensors")
        self._tensors = dict(state_dict)
        self.label = label
        self.aliases: dict[str, str] = {}
        first: dict[tuple[Any, ...], str] = {}
        for key, t in self._tensors.items():
            identity = tensor_identity(t)
            if identity is None:
                continue
            if identity in first:
                self.aliases[key] = first[identity]
            else:
                first[identity] = key
        floating = [t for t in self._tensors.values() if t.is_floating_point()]
        self.device = floating[0].device if floating else torch.device("cpu")

    def keys(self) -> Sequence[str]:
        return list(self._tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self._tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()


def read_strided(source: TensorSource, key: str, first: int, stride: int) -> torch.Tensor:
    """``source.get(key).reshape(-1)[first::stride]``, on the source's device.

    A source whose class defines ``get_strided(key, first, stride)`` (a safetensors file:
    only the picked entries' pages are read) answers it itself. The class's own method,
    never one a wrapper's ``__getattr__`` forwards: a wrapper that renames keys or
    changes rows (``CommonRowsSource``) would hand out the wrapped source's values.

    Example:
        >>> read_strided(StateDictSource({"w": torch.arange(6.0).reshape(2, 3)}), "w", 1, 2)
        tensor([1., 3., 5.])
    """
    reader = getattr(type(source), "get_strided", None)
    if reader is not None:
        return reader(source, key, first, stride)
    return source.get(key).reshape(-1)[first::stride]


PathOpener = Callable[..., TensorSource]
_path_opener: PathOpener | None = None


def register_path_opener(opener: PathOpener) -> None:
    """Let ``as_source`` open ``str``/``Path`` arguments (``lightning_ties.io`` registers itself)."""
    global _path_opener
    _path_opener = opener


def as_source(obj: Any, label: str | None = None, **open_kwargs: Any) -> TensorSource:
    """Turn a module, state dict, path or existing source into a :class:`TensorSource`.

    Paths go to the registered opener with ``open_kwargs`` (the engine passes ``base=`` for
    fine-tuned models, so that e.g. a LoRA adapter can be read as full weights); a path
    source is labelled by its path.

    Example:
        >>> src = as_source({"w": torch.zeros(2)}, label="base")
        >>> src.spec("w").shape
        (2,)
    """
    if isinstance(obj, TensorSource) and not isinstance(obj, Mapping):
        return obj
    if isinstance(obj, nn.Module):
        return StateDictSource(obj.state_dict(), label or type(obj).__name__)
    if isinstance(obj, Mapping):
        return StateDictSource(obj, label or "state_dict")
    if isinstance(obj, (str, os.PathLike)):
        if _path_opener is None:
            raise TypeError(
                f"cannot open path {os.fspath(obj)!r}: import lightning_ties (or lightning_ties.io) "
                "to enable file sources"
            )
        return _path_opener(obj, **open_kwargs)
    raise TypeError(
        f"{label or 'model'}: expected an nn.Module, a state dict, a path or a TensorSource, "
        f"got {type(obj).__name__}"
    )
