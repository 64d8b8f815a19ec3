"""Sources matched to a model: every task's checkpoint under the model's keys, the named heads, the plan.

The one sequence every Lightning entry point starts with (the merge module, the learned
module, the callback's checks at ``setup``): open each task's source under the model's own
``state_dict`` keys (:func:`~.keys.match_to_module`), find the keys ``heads`` names (a pattern
naming no key fails here), and plan the merge of everything else
(:func:`~lightning_ties.merging.plan_merge`). Specs only: no tensor is read.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_ties.merging import as_source
    >>> model = nn.Linear(2, 2)
    >>> tasks = {"a": {k: v + 1 for k, v in model.state_dict().items()}}
    >>> matched = match_sources(model, as_source(model.state_dict(), "base"), tasks, heads=r"^bias$")
    >>> matched.named_heads, matched.plan.merge_keys
    (['bias'], ['weight'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn

from ..merging import MergePlan, plan_merge
from ..merging.plan import Patterns
from ..merging.sources import TensorSource
from .heads import HeadsArg, exact_patterns, named_head_keys
from .keys import match_to_module


class MatchedSources(NamedTuple):
    """The outcome of :func:`match_sources`."""

    base: TensorSource
    tasks: list[TensorSource]
    named_heads: list[str]
    plan: MergePlan


def match_sources(
    model: nn.Module,
    base: TensorSource,
    tasks: Mapping[str, Any],
    heads: HeadsArg = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MatchedSources:
    """Match ``tasks`` to ``model``'s keys (over ``base``, already matched), name the heads, plan the rest.

    Args:
        model: the module the merge is written into; its ``state_dict`` keys are the target names.
        base: the base as a source under the model's keys.
        tasks: task name -> fine-tuned model (path, module, state dict, source or ``{"path", "prefix"}``).
        heads: regexes or submodules naming head keys; they are left out of the plan.
        include, exclude: regexes choosing the merged keys.
    """
    model_keys = list(model.state_dict())
    sources = [match_to_module(src, model_keys, label=name, base=base) for name, src in tasks.items()]
    named = named_head_keys(model, heads)
    plan = plan_merge(base, sources, include, exact_patterns(named, exclude), warn=False)
    return MatchedSources(base, sources, named, plan)


def check_model_keys(model: nn.Module, base: TensorSource, plan: MergePlan) -> None:
    """Raise, naming keys and shapes, when ``model`` lacks a key the merge writes or holds it in another shape."""
    targets = model.state_dict()
    missing = [k for k in plan.merge_keys if k not in targets]
    if missing:
        raise ValueError(
            f"base has {len(missing)} key(s) the model lacks, e.g. {missing[:5]}; base and model must "
            f"share key names (model keys start with {sorted(targets)[:5]})"
        )
    wrong = [
        f"{k}: base {base.spec(k).shape} vs model {tuple(targets[k].shape)}"
        for k in plan.merge_keys
        if tuple(targets[k].shape) != tuple(base.spec(k).shape)
    ]
    if wrong:
        raise ValueError("base and model shapes differ: " + "; ".join(wrong[:5]))


__all__ = ["MatchedSources", "check_model_keys", "match_sources"]
