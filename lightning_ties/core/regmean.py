"""RegMean in the merge core: each task's Gram matrices from its own validation data, then the closed form.

The maths is :mod:`lightning_ties.merging.regmean` (pure torch); this file only drives it from a
:class:`~lightning_ties.core.merger.Merger` (any object with the attributes of :class:`RegMeanHost`,
so that this file imports nothing of the merger): for every task, that task's
fine-tuned weights are put into the module's model, up to ``examples`` examples of the task's
dataloader run through it (the module's batch convention, or its ``forward_fn``) while
:class:`~lightning_ties.merging.regmean.GramCollector` records the inputs of every merged
``nn.Linear``, and the model's weights are restored afterwards. Then, key by key (one key of
the N models in memory at a time), linear weights are merged by
:func:`~lightning_ties.merging.regmean.regmean` and every other merged entry is averaged, as
:func:`~lightning_ties.merging.regmean.regmean_state_dict` does; the result is returned as
tau_m = merged - base, so the module applies it like any other method (lam=1.0: RegMean's weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from ..evaluation.batches import move_to_device, split_batch
from ..merging import MergePlan, get_method
from ..merging.regmean import collect_grams, regmean, shrink_off_diagonal
from ..merging.registry import REGMEAN_NEEDS_DATA
from ..merging.results import MergedTaskVector, MergeReport
from ..merging.sources import TensorSource



class RegMeanHost(Protocol):
    """What RegMean reads of a merger: its model, sources and plan, and how to put a task's weights in place."""

    tasks: list[str]
    model: torch.nn.Module
    plan: MergePlan
    base_source: TensorSource
    task_sources: list[TensorSource]
    current: tuple[float | None, float] | None
    head_task: str | None
    forward_fn: Any

    @property
    def compute_device(self) -> torch.device: ...

    def load_task(self, task: str) -> None: ...

    def use_task(self, task: str) -> None: ...

    def predict_and_target(self, batch: Any, task: str | None = None) -> Any: ...

__all__ = ["RegMeanHost", "regmean_params", "regmean_task_vector"]


def regmean_params(params: Mapping[str, Any]) -> tuple[float, int]:
    """``(alpha, examples)`` from a method's parameters, checked before any data pass.

    Example:
        >>> regmean_params({"alpha": 0.5})
        (0.5, 256)
    """
    defaults = get_method("regmean").parameters()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"method 'regmean' has no parameter(s) {unknown}; its parameters are {sorted(defaults)} and lam")
    alpha = float(params.get("alpha", defaults["alpha"]))
    shrink_off_diagonal(torch.zeros(1, 1), alpha)  # the one check of alpha's range, raised now
    examples = params.get("examples", defaults["examples"])
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"regmean's examples (per task) must be a positive integer, got {examples!r}")
    return alpha, examples


def _batches(loaders: Sequence[Any], device: torch.device) -> Iterator[Any]:
    for dl in loaders:
        for batch in dl:
            yield move_to_device(batch, device)


def _attention_mask(batch: Any) -> torch.Tensor | None:
    """Padding rows are not data: a dict batch's ``attention_mask`` (also inside ``(inputs, target)``)."""
    inputs = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), torch.Tensor):
        return inputs["attention_mask"]
    return None


def regmean_task_vector(
    merger: RegMeanHost, dataloaders: Mapping[str, Sequence[Any]] | None, params: Mapping[str, Any]
) -> MergedTaskVector:
    """RegMean's tau_m for ``merger``'s tasks, Gram matrices collected on ``dataloaders`` (``{task: [dl, ...]}``).

    Raises:
        ValueError: without dataloaders (naming where to pass them), for a bad ``alpha`` / ``examples``,
            or where a task's dataloader yields no batch.
    """
    alpha, examples = regmean_params(params)
    if not dataloaders:
        raise ValueError(REGMEAN_NEEDS_DATA)
    missing = [t for t in merger.tasks if t not in dataloaders]
    if missing:
        raise ValueError(f"method 'regmean' needs a dataloader for every task; task(s) {missing} have none")
    keys = list(merger.plan.merge_keys)
    wanted = set(keys)
    grams = _collect_task_grams(merger, dataloaders, examples, lambda name, _: f"{name}.weight" in wanted)

    device = merger.compute_device
    base = merger.base_source
    tau = MergedTaskVector()
    for key in keys:
        w0 = base.get(key)
        if not w0.is_floating_point():
            continue  # integer buffers (counters) are not merged, as the engine's plan
        stacked = torch.stack([src.get(key).to(device) for src in merger.task_sources])
        if key in grams[0] and stacked.dim() == 3:
            merged = regmean(stacked, torch.stack([g[key] for g in grams]).to(device), alpha).float()
        else:  # biases, norms, embeddings: averaged, as regmean_state_dict does
            merged = stacked.float().mean(0)
        tau[key] = merged - w0.to(device, torch.float32)
    tau.report = MergeReport.from_plan(
        merger.plan, "regmean", {"alpha": alpha, "examples": examples}, [s.label for s in merger.task_sources]
    )
    return tau


def _collect_task_grams(
    merger: RegMeanHost, dataloaders: Mapping[str, Sequence[Any]], examples: int, include: Any
) -> list[dict[str, torch.Tensor]]:
    """Each task's Gram matrices, its own fine-tuned weights in the model; the model's weights restored after."""
    model = merger.model
    keys = list(merger.plan.merge_keys)
    targets = model.state_dict(keep_vars=True)
    saved = {k: targets[k].detach().clone() for k in keys}
    current, head_task = merger.current, merger.head_task
    original = next((t.device for t in targets.values() if t.is_floating_point()), torch.device("cpu"))
    device = merger.compute_device  # the Trainer's device in a search (Lightning moves the model back after validate)
    grams: list[dict[str, torch.Tensor]] = []
    try:
        model.to(device)
        for task in merger.tasks:
            merger.load_task(task)

            def forward(m: torch.nn.Module, batch: Any, task: str = task) -> None:
                if merger.forward_fn is not None:
                    merger.predict_and_target(batch, task)
                else:
                    args, kwargs, _ = split_batch(batch)
                    m(*args, **kwargs)

            try:
                task_grams, _ = collect_grams(
                    model, _batches(dataloaders[task], device), forward, examples, include, _attention_mask
                )
            except ValueError as err:
                raise ValueError(f"regmean, task {task!r}: {err}") from err
            grams.append(task_grams)
    finally:
        model.to(original)
        targets = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in saved.items():
                targets[k].data.copy_(v)
        merger.current = current
        if head_task is not None:
            merger.head_task = None
            merger.use_task(head_task)
    return grams
