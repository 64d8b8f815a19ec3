"""Per-task heads: which keys are heads, each task's head tensors, and swapping them into a module.

A head is a key that is never merged: each task runs with its own value. Keys whose shape or
presence differs across the checkpoints are heads by detection (a classifier per label set);
users name more by regex or by submodule of the model. One home for the three users:
:class:`~lightning_ties.pytorch.MultiTaskMergeModule` swaps a task's head into its model before
that task's dataloader, :class:`~lightning_ties.pytorch.LearnedMergeModule` runs each task with
its head in a functional call, and :class:`~lightning_ties.pytorch.TiesMerging` restores
fine-tuned weights whose head may have another task's shape meanwhile.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ties.merging import as_source
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3))
    >>> named_head_keys(model, model[1])
    ['1.bias', '1.weight']
    >>> store = HeadStore(["1.weight", "1.bias"], {"b": as_source({"1.weight": torch.ones(5, 2), "1.bias": torch.zeros(5)})})
    >>> store.swap_into(model, "b")
    >>> tuple(model[1].weight.shape)
    (5, 2)
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from ..merging import MergePlan
from ..merging.plan import compile_patterns
from ..merging.sources import TensorSource

#: Heads as users give them: regexes searched in the model's keys, submodules of the model, or a list of both.
HeadsArg = str | nn.Module | Sequence[str | nn.Module] | None


def head_patterns(model: nn.Module, heads: HeadsArg) -> list[str]:
    """The regexes ``heads`` stands for; a submodule becomes the pattern of its key prefix."""
    items = [heads] if isinstance(heads, (str, nn.Module)) else list(heads or [])
    return [h if isinstance(h, str) else _module_pattern(model, h) for h in items]


def named_head_keys(model: nn.Module, heads: HeadsArg) -> list[str]:
    """The model's keys that ``heads`` names (sorted); a pattern that matches none of them is an error.

    Example:
        >>> named_head_keys(nn.Linear(2, 2), r"bias$")
        ['bias']
    """
    patterns = head_patterns(model, heads)
    compiled = compile_patterns(patterns, "heads")
    model_keys = list(model.state_dict())
    unmatched = [p.pattern for p in compiled if not any(p.search(k) for k in model_keys)]
    if unmatched:
        raise ValueError(
            f"heads pattern(s) {unmatched} match no key of the model; model keys look like {sorted(model_keys)[:5]}"
        )
    return sorted(k for k in model_keys if any(p.search(k) for p in compiled))


def differing_keys(plan: MergePlan, model_keys: Sequence[str], base_keys: Collection[str] | None = None) -> list[str]:
    """The model's keys (in its order) whose shape or presence differs across the checkpoints: heads by detection.

    With ``base_keys``, model keys the base lacks count as differing too (the base is not the
    model's own weights, so the model's value of such a key belongs to no checkpoint).
    """
    mismatched = plan.mismatched
    absent = set(model_keys) - set(base_keys) if base_keys is not None else set()
    return [k for k in model_keys if k in mismatched or k in absent]


def require_heads(keys: Sequence[str], sources: Sequence[TensorSource]) -> None:
    """Every task must have every head key (it runs with its own head)."""
    for src in sources:
        names = set(src.keys())
        lacking = [k for k in keys if k not in names]
        if lacking:
            raise ValueError(
                f"task {src.label!r} lacks head key(s) {lacking[:5]}: keys that differ across tasks are "
                "per-task heads and every task needs its own (name heads= or fix the checkpoint)"
            )


@torch.no_grad()
def copy_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` into ``module``'s tensors in place; a tensor of another shape (another task's head) replaces it."""
    targets = module.state_dict(keep_vars=True)
    for key, value in state.items():
        t = targets[key]
        if t.shape == value.shape:
            t.data.copy_(value)
        else:  # heads of tasks with different label sets differ in shape
            t.data = value.to(device=t.device, dtype=t.dtype).clone()


class HeadStore(nn.Module):
    """Each task's own head tensors, read from its source once and cached.

    ``as_buffers=False`` (what :class:`MultiTaskMergeModule` uses): a task's head is read on first
    use and kept where its source gives it (CPU for files), costing no device memory; a head key
    a task lacks is left out. ``as_buffers=True`` (:class:`LearnedMergeModule`): every head is read
    now into non-persistent buffers, which move with the owning module to the Trainer's device and
    stay out of its checkpoints.
    """

    def __init__(self, keys: Sequence[str], sources: Mapping[str, TensorSource], as_buffers: bool = False) -> None:
        super().__init__()
        self.keys = list(keys)
        self._sources = dict(sources)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._names: dict[str, dict[str, str]] = {}  # task -> key -> buffer name (as_buffers)
        if as_buffers:
            for ti, (task, src) in enumerate(self._sources.items()):
                self._names[task] = {}
                for ki, key in enumerate(self.keys):
                    name = f"t{ti}_{ki}"
                    self.register_buffer(name, src.get(key).detach().clone(), persistent=False)
                    self._names[task][key] = name
            self._sources = {}  # everything is read: keep no reference to the (possibly large) sources

    def of(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s head tensors, key -> tensor (the stored tensors themselves: clone before changing them)."""
        if task in self._names:
            return {key: getattr(self, name) for key, name in self._names[task].items()}
        heads = self._cache.get(task)
        if heads is None:
            if task not in self._sources:
                raise KeyError(f"unknown task {task!r}; tasks are {list(self._sources)}")
            src = self._sources[task]
            names = set(src.keys())
            heads = {k: src.get(k).detach().clone() for k in self.keys if k in names}
            self._cache[task] = heads
        return heads

    def swap_into(self, model: nn.Module, task: str) -> None:
        """Put ``task``'s head into ``model`` in place (shape changes included)."""
        copy_into(model, self.of(task))


def _module_pattern(model: nn.Module, head: nn.Module) -> str:
    """The key prefix of a head given as a submodule of the model."""
    for name, sub in model.named_modules():
        if sub is head and name:
            return f"^{re.escape(name)}\\."
    raise ValueError(f"heads: the {type(head).__name__} given is not a submodule of the model")


def exact_patterns(keys: Sequence[str], extra: str | Sequence[str] | None = None) -> list[str] | None:
    """Regexes matching exactly ``keys``, plus ``extra`` patterns (``None`` when there are none)."""
    patterns = [f"^{re.escape(k)}$" for k in keys]
    if isinstance(extra, str):
        patterns.append(extra)
    elif extra:
        patterns.extend(extra)
    return patterns or None


__all__ = ["HeadStore", "HeadsArg", "copy_into", "differing_keys", "exact_patterns", "head_patterns",
           "named_head_keys", "require_heads"]
