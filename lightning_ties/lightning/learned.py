"""Learned merging coefficients (AdaMerging-style) on top of TIES, trained by a plain ``Trainer``.

The merged model is ``theta = theta_base + sum_t lam[t, g] * delta_t``: ``delta_t`` is task t's
share of the TIES disjoint merge (so that ``sum_t delta_t = tau_m``), or its plain task vector
(``method="task_arithmetic"``), computed once by the engine and stored compactly; ``lam[t, g]``
has one entry per task and per group of parameters (``granularity``: ``"task"``, ``"layer"``,
``"tensor"``) and starts where the chosen merge is (``lam=1`` over TIES components is exactly
``ties_merge(k, lam=1)``). The coefficients are the only trainable parameters of
:class:`LearnedMergeModule`; the model runs through ``torch.func.functional_call`` with the
merged tensors and each task's own head. Objectives: cross-entropy on labelled validation
batches (``"ce"``), the user's ``LightningModule.validation_step`` loss (``"validation_step"``),
or AdaMerging's entropy on unlabelled inputs (``"entropy"``), plus an optional L2 pull towards
the initial coefficients. Part of the data is held out to pick the final coefficients (and for
early stopping).

One call (what the CLI's ``method=learned`` and the demo use)::

    from lightning_ties.lightning.learned import learn_coefficients

    result = learn_coefficients(
        base=pretrained_model,                    # nn.Module (also the architecture), state dict or path
        tasks={"a": "runs/a.ckpt", "b": model_b},  # fine-tuned models from that base
        dataloaders={"a": val_a, "b": val_b},      # labelled (or unlabelled for "entropy") batches
        heads=None,                                # auto: keys that differ across tasks; or regexes
        k=0.2, granularity="layer", objective="ce", max_epochs=10,
    )
    result.state_dict            # merged weights (base's keys); result.task_state_dict("a") adds a's head
    result.coefficients          # [tasks, groups] tensor; result.coefficient_table() as nested dict
    result.history               # hold-out loss/accuracy per validation epoch

Batches are ``(inputs, target)`` (inputs a tensor, a tuple of positional arguments or a dict of
keyword arguments), a dict with a ``"labels"`` entry (the rest are keyword arguments), or inputs
alone (entropy objective). Model outputs are logits, or have a ``.logits`` / ``["logits"]``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, random_split
from torchmetrics import MeanMetric

from ..merging import MergeReport, TaskVectorMerger, as_source, get_method, plan_merge
from ..merging.plan import Patterns, compile_patterns
from ._compat import EarlyStopping, pl
from .keys import match_to_module
from .module import module_device

GRANULARITIES = ("task", "layer", "tensor")
OBJECTIVES = ("ce", "entropy", "validation_step")
Objective = str | Callable[[Any, Any], torch.Tensor]
_LOG_EACH_COEFFICIENT = 64  # above this many coefficients, log one mean per task


# ---- groups of parameters -------------------------------------------------------------------
def default_group(key: str) -> str:
    """The block a key belongs to: its prefix through the first numeric part, else its parent module's.

    Example:
        >>> default_group("encoder.layer.3.attention.self.query.weight")
        'encoder.layer.3.'
        >>> default_group("embeddings.word_embeddings.weight"), default_group("bert.pooler.dense.bias")
        ('embeddings.', 'bert.pooler.')
    """
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    if len(parts) == 1:
        return key
    # "emb.word.weight" -> "emb.", "head.weight" -> "head.": one level above the tensor's own module
    return ".".join(parts[: max(1, len(parts) - 2)]) + "."


def group_keys(keys: Sequence[str], granularity: str, patterns: Patterns = None) -> tuple[list[str], list[int]]:
    """Group names and, per key, the index of its group.

    ``"task"``: one group; ``"tensor"``: one per key; ``"layer"``: the text matched by the first
    of ``patterns`` (regexes, searched in the key) that matches, else :func:`default_group`.

    Example:
        >>> group_keys(["l.0.w", "l.0.b", "l.1.w", "out.w"], "layer")
        (['l.0.', 'l.1.', 'out.'], [0, 0, 1, 2])
    """
    check_granularity(granularity)
    if granularity == "task":
        return ["all"], [0] * len(keys)
    if granularity == "tensor":
        return list(keys), list(range(len(keys)))
    compiled = compile_patterns(patterns, "group")
    used = [False] * len(compiled)
    labels = []
    for key in keys:
        label = None
        for i, pattern in enumerate(compiled):
            match = pattern.search(key)
            if match:
                label, used[i] = match.group(0), True
                break
        labels.append(label if label is not None else default_group(key))
    unused = [p.pattern for p, u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(
            f"group pattern(s) {unused} match no merged key; merged keys look like {list(keys)[:3]}"
        )
    groups = list(dict.fromkeys(labels))
    index = {g: i for i, g in enumerate(groups)}
    return groups, [index[g] for g in labels]


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")


# ---- compact components -------------------------------------------------------------------
class TaskComponents(nn.Module):
    """Each task's share delta_t of every merged key, stored densely or as values + flat indices.

    A key is stored sparsely (float32 values, int32/int64 indices, per-task counts) when that
    takes less memory than the dense ``[N, numel]`` block (the trimmed TIES components keep only
    about a fraction k); the merge is exact either way (same float32 products and sums). A key
    whose components are all zero stores nothing and stays base's. Buffers are not persistent: checkpoints hold only the coefficients.

    Example:
        >>> comps = TaskComponents.from_iterable(iter([("w", torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))]), 2)
        >>> comps.merged("w", torch.zeros(3), torch.tensor([1.0, 0.5]))
        tensor([1., 0., 1.])
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.keys: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.layouts: list[str] = []  # "sparse", "dense" or "empty" (all components zero)
        self._buffer_names: list[str] = []

    @classmethod
    def from_iterable(cls, components: Iterator[tuple[str, torch.Tensor]], n_tasks: int) -> TaskComponents:
        store = cls(n_tasks)
        for key, deltas in components:
            store.add(key, deltas)
        return store

    def add(self, key: str, deltas: torch.Tensor) -> None:
        flat = deltas.detach().reshape(self.n_tasks, -1).to(torch.float32)
        nnz = int(torch.count_nonzero(flat))
        index_dtype = torch.int32 if flat.shape[1] < 2**31 else torch.int64
        name = f"c{len(self.keys)}"
        if nnz == 0:
            layout = "empty"  # no task changes this key: it stays base's, outside the autograd graph
        elif nnz * (4 + index_dtype.itemsize) < flat.numel() * 4:
            layout = "sparse"
            task_idx, pos = torch.nonzero(flat, as_tuple=True)  # row-major: grouped by task
            self.register_buffer(f"{name}_values", flat[task_idx, pos].contiguous(), persistent=False)
            self.register_buffer(f"{name}_index", pos.to(index_dtype), persistent=False)
            self.register_buffer(f"{name}_counts", torch.bincount(task_idx, minlength=self.n_tasks), persistent=False)
        else:
            layout = "dense"
            self.register_buffer(f"{name}_dense", flat.contiguous(), persistent=False)
        self.keys.append(key)
        self.layouts.append(layout)
        self.shapes.append(tuple(deltas.shape[1:]))
        self._buffer_names.append(name)

    def merged(self, i_or_key: int | str, base: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``base + sum_t coefficients[t] * delta_t`` for one key, float32, base's shape."""
        i = self.keys.index(i_or_key) if isinstance(i_or_key, str) else i_or_key
        name, layout = self._buffer_names[i], self.layouts[i]
        flat = base.reshape(-1).to(torch.float32)
        if layout == "sparse":
            values = getattr(self, f"{name}_values")
            counts = getattr(self, f"{name}_counts")
            scale = coefficients.to(values.dtype).repeat_interleave(counts, output_size=values.numel())
            flat = flat.index_add(0, getattr(self, f"{name}_index"), values * scale)
        elif layout == "dense":
            flat = flat + coefficients.to(torch.float32) @ getattr(self, f"{name}_dense")
        return flat.view(base.shape)

    def stacked(self, key: str) -> torch.Tensor:
        """The components of one key as a dense ``[N, *shape]`` tensor (for inspection and tests)."""
        i = self.keys.index(key)
        name, layout, shape = self._buffer_names[i], self.layouts[i], self.shapes[i]
        if layout == "dense":
            return getattr(self, f"{name}_dense").reshape(self.n_tasks, *shape).clone()
        out = torch.zeros(self.n_tasks, math.prod(shape))
        if layout == "sparse":
            values = getattr(self, f"{name}_values")
            rows = torch.repeat_interleave(torch.arange(self.n_tasks, device=values.device), getattr(self, f"{name}_counts"))
            out = out.to(values.device)
            out[rows, getattr(self, f"{name}_index").long()] = values
        return out.reshape(self.n_tasks, *shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


# ---- batches and outputs ------------------------------------------------------------------
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


class _StepCaller(nn.Module):
    """Lets ``functional_call`` run the user's ``validation_step`` with merged parameters."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.inner.validation_step(batch, batch_idx)


# ---- data -----------------------------------------------------------------------------------
def split_holdout(loader: DataLoader, fraction: float, seed: int, task: str) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint random parts of ``loader``'s dataset (fit part shuffled)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ValueError(
            f"task {task!r}: cannot hold out part of a loader over an iterable dataset or with a batch "
            "sampler; pass holdout= as a dict of loaders (or holdout=0)"
        )
    n = len(loader.dataset)  # type: ignore[arg-type]
    n_hold = int(round(n * fraction))
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"task {task!r}: {n} examples cannot be split with holdout={fraction}; add data or change it")
    fit_part, hold_part = random_split(loader.dataset, [n - n_hold, n_hold], generator=torch.Generator().manual_seed(seed))
    common = dict(batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                  pin_memory=loader.pin_memory)
    fit = DataLoader(fit_part, shuffle=True, drop_last=loader.drop_last,
                     generator=torch.Generator().manual_seed(seed), **common)
    return fit, DataLoader(hold_part, shuffle=False, **common)


def _check_loaders(loaders: Any, tasks: Sequence[str], what: str) -> dict[str, DataLoader]:
    if not isinstance(loaders, Mapping) or not loaders:
        raise ValueError(f"no {what}: pass a dict task name -> DataLoader for the tasks {list(tasks)}")
    unknown = [t for t in loaders if t not in tasks]
    if unknown:
        raise ValueError(f"{what} for unknown task(s) {unknown}; the tasks are {list(tasks)}")
    for t, dl in loaders.items():
        if not isinstance(dl, DataLoader):
            raise TypeError(f"{what}[{t!r}] must be a torch DataLoader, got {type(dl).__name__}")
        if not isinstance(dl.dataset, IterableDataset) and len(dl.dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{what}[{t!r}] is empty: the task has no data to learn coefficients from")
    return dict(loaders)


# ---- the module -----------------------------------------------------------------------------
class LearnedMergeModule(pl.LightningModule):
    """A LightningModule whose only trainable parameters are the merging coefficients lam[task, group].

    Train it with ``Trainer.fit(module)`` (its own ``train_dataloader``/``val_dataloader`` serve
    the fit part and the hold-out of ``dataloaders``); the frozen model stays in eval mode, so
    Lightning's note about modules in eval mode is expected. Checkpoints hold only the
    coefficients: to resume, build the module with the same arguments and pass ``ckpt_path``.

    Example:
        >>> base = nn.Linear(2, 2)
        >>> fts = {"a": {k: v + 1 for k, v in base.state_dict().items()}, "b": base.state_dict()}
        >>> x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
        >>> loaders = {t: DataLoader(list(zip(x, y)), batch_size=4) for t in fts}
        >>> module = LearnedMergeModule(base, fts, loaders, k=1.0, granularity="task", holdout=0.0)
        >>> module.coefficients.shape
        torch.Size([2, 1])

    Args:
        model: the architecture the merged weights run in (an ``nn.Module`` whose state dict has
            base's keys); by default it holds the base weights itself. Kept frozen in eval mode.
        tasks: task name -> fine-tuned model (module, state dict, path or source) from base, matched
            to ``model``'s keys like base (:mod:`lightning_ties.lightning.keys`). The components live
            in this module's buffers, so the Trainer puts them (and the coefficients) on its device.
        dataloaders: task name -> DataLoader of validation batches to learn from.
        base: the pretrained weights when they are not ``model``'s own (they are written into
            ``model`` in place, so one copy is kept).
        heads: regexes naming per-task keys (never merged; each task runs with its own). Keys
            whose shape or presence differs across tasks are heads too.
        method: registry method whose components are learned (``"ties"``, ``"task_arithmetic"``,
            any method with a linear per-task merge); ``k`` (default: the method's, 0.2 for
            TIES) and ``params`` go to it.
        lam: initial coefficient (default: the method's, 1.0 for TIES: the first forward is
            ``ties_merge(k, lam=1)``).
        granularity: ``"task"``, ``"layer"`` or ``"tensor"``; ``groups``: regexes for ``"layer"``.
        objective: ``"ce"``, ``"entropy"``, ``"validation_step"`` or ``fn(output, target) -> loss``.
        l2: weight of ``||lam - lam_init||^2`` added to the loss.
        holdout: fraction of each task's data held out to pick the final coefficients, a dict of
            hold-out loaders, or 0 (no hold-out: the last coefficients are final).
        lr: Adam learning rate of the coefficients.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Any],
        dataloaders: Mapping[str, DataLoader],
        base: Any = None,
        heads: Patterns = None,
        method: str = "ties",
        k: float | None = None,
        lam: float | None = None,
        granularity: str = "layer",
        groups: Patterns = None,
        objective: Objective = "ce",
        l2: float = 0.0,
        holdout: float | Mapping[str, DataLoader] = 0.2,
        lr: float = 1e-2,
        seed: int = 0,
        include: Patterns = None,
        exclude: Patterns = None,
        **params: Any,
    ) -> None:
        super().__init__()
        self._check_arguments(model, tasks, granularity, objective, l2, holdout, lr)
        self.tasks = list(tasks)
        self.objective = objective
        self.l2 = float(l2)
        self.lr = float(lr)
        self.granularity = granularity
        loaders = _check_loaders(dataloaders, self.tasks, "dataloaders")
        self._fit_loaders, self._holdout_loaders = self._split(loaders, holdout, seed)
        self.strict_loading = False  # checkpoints hold the coefficients, not the frozen weights
        self.method = get_method(method)
        if k is not None:
            params["k"] = k  # a method without k refuses it below, by name
        spec = self.method.build_spec(**params)
        self.merge_params = {**self.method.parameters(), **params}
        # Everything is checked on specs before any tensor is read or model is changed.
        # sources are matched to the model's own keys (an inner model's folder under its attribute...)
        model_keys = list(model.state_dict())
        base_src = match_to_module(base, model_keys, label="base") if base is not None else as_source(model, "base")
        sources = [match_to_module(tasks[t], model_keys, label=t, base=base_src) for t in self.tasks]
        self.plan = plan_merge(base_src, sources, include, _merge_patterns(exclude, heads), warn=False)
        self.head_keys = self._head_keys(model, base_src, sources, heads)
        self.groups, self.key_group = group_keys(self.plan.merge_keys, granularity, groups)
        self.model = model.requires_grad_(False).eval()
        if base is not None and base is not model:
            _write_base_into(model, base_src)
        self.heads = _HeadStore({t: {key: src.get(key) for key in self.head_keys} for t, src in zip(self.tasks, sources)})
        # components are computed where the model is (the GPU when it already lives there) and move
        # with this module: the Trainer puts them, the heads and the coefficients on its device
        merger = TaskVectorMerger(as_source(model, "base"), sources, spec, plan=self.plan, device=module_device(model))
        self.components = TaskComponents.from_iterable(merger.components(), len(self.tasks))
        self.thresholds = [t.value for t in merger.thresholds] if merger.thresholds else None
        init = float(self.method.lam if lam is None else lam)
        shape = (len(self.tasks), len(self.groups))
        self.coefficients = nn.Parameter(torch.full(shape, init))
        self.register_buffer("initial_coefficients", torch.full(shape, init))
        self.register_buffer("best_coefficients", torch.full(shape, init))
        self.register_buffer("best_score", torch.tensor(math.inf))
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.val_loss = nn.ModuleList(MeanMetric() for _ in self.tasks)
        self.val_acc = nn.ModuleList(MeanMetric() for _ in self.tasks)
        self._val_params: dict[str, torch.Tensor] | None = None

    # ---- construction helpers --------------------------------------------------------------
    @staticmethod
    def _check_arguments(model, tasks, granularity, objective, l2, holdout, lr) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the architecture to run), got {type(model).__name__}")
        if not isinstance(tasks, Mapping) or len(tasks) < 1:
            raise ValueError("tasks must be a dict task name -> fine-tuned model with at least one task")
        check_granularity(granularity)
        if not callable(objective) and objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)} or a callable")
        if objective == "validation_step" and not isinstance(model, pl.LightningModule):
            raise ValueError("objective='validation_step' needs model to be a LightningModule with validation_step")
        if not (isinstance(l2, (int, float)) and l2 >= 0):
            raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if not isinstance(holdout, Mapping) and not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
            raise ValueError(f"holdout must be a fraction in [0, 1) or a dict of loaders, got {holdout!r}")

    def _split(self, loaders: dict[str, DataLoader], holdout: Any, seed: int):
        if isinstance(holdout, Mapping):
            return loaders, _check_loaders(holdout, self.tasks, "holdout")
        if holdout == 0:
            return loaders, {}
        fit, hold = {}, {}
        for t, dl in loaders.items():
            fit[t], hold[t] = split_holdout(dl, float(holdout), seed, t)
        return fit, hold

    def _head_keys(self, model: nn.Module, base_src, sources, heads: Patterns) -> list[str]:
        """User-named heads plus keys that differ across tasks; each task must have them all."""
        named = compile_patterns(heads, "heads")
        model_keys = list(model.state_dict().keys())
        out = []
        for key in model_keys:
            reason = self.plan.skipped.get(key, "")
            differs = reason.startswith(("missing", "shape")) or key not in set(base_src.keys())
            if any(p.search(key) for p in named) or differs:
                out.append(key)
        unmatched = [p.pattern for p in named if not any(p.search(k) for k in model_keys)]
        if unmatched:
            raise ValueError(f"heads pattern(s) {unmatched} match no key of the model; keys look like {model_keys[:3]}")
        for src in sources:
            keys = set(src.keys())
            lacking = [k for k in out if k not in keys]
            if lacking:
                raise ValueError(
                    f"task {src.label!r} lacks head key(s) {lacking[:5]}: keys that differ across tasks are "
                    "per-task heads and every task needs its own (name heads= or fix the checkpoint)"
                )
        not_in_model = [k for k in self.plan.merge_keys if k not in set(model_keys)]
        if not_in_model:
            raise ValueError(f"merged key(s) {not_in_model[:5]} are not in the model; pass the matching architecture")
        return out

    # ---- the merged parameters -------------------------------------------------------------
    def merged_parameters(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """theta_base + sum_t lam[t, g] * delta_t for every merged key (differentiable in lam)."""
        lam = self.coefficients if coefficients is None else coefficients
        base = self.model.state_dict(keep_vars=True)
        out = {}
        for i, key in enumerate(self.components.keys):
            if self.components.layouts[i] == "empty":
                continue  # base's own value, left to the model
            b = base[key]
            merged = self.components.merged(i, b.detach(), lam[:, self.key_group[i]])
            out[key] = merged.to(b.dtype)
        return out

    def task_forward(self, task: str, batch: Any, params: Mapping[str, torch.Tensor], batch_idx: int = 0) -> Any:
        """Run the model on one task's batch with ``params`` plus that task's own head."""
        full = {**params, **self.heads.of(task)}
        if self.objective == "validation_step":
            wrapper = _StepCaller(self.model)
            prefixed = {f"inner.{k}": v for k, v in full.items()}
            return functional_call(wrapper, prefixed, (batch, batch_idx))
        args, kwargs, _ = split_batch(batch)
        return functional_call(self.model, full, args, kwargs)

    def task_loss(self, task: str, batch: Any, params: Mapping[str, torch.Tensor], batch_idx: int = 0):
        """``(loss, output, target)`` of one task's batch under the objective."""
        output = self.task_forward(task, batch, params, batch_idx)
        if self.objective == "validation_step":
            loss = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(loss, torch.Tensor):
                raise TypeError("validation_step must return the loss tensor (or a dict with 'loss') for this objective")
            return loss, None, None
        _, _, target = split_batch(batch)
        if self.objective == "entropy":
            return prediction_entropy(logits_of(output)), output, target
        if target is None:
            raise ValueError(
                f"task {task!r}: the batch has no labels but objective={self.objective!r} needs them; "
                "use objective='entropy' for unlabelled data"
            )
        if callable(self.objective):
            return self.objective(output, target), output, target
        return cross_entropy(logits_of(output), target), output, target

    # ---- Lightning hooks -------------------------------------------------------------------
    def train(self, mode: bool = True) -> LearnedMergeModule:
        super().train(mode)
        self.model.eval()  # frozen: no dropout noise, no BatchNorm statistics updates
        return self

    def train_dataloader(self) -> dict[str, DataLoader]:
        return self._fit_loaders

    def val_dataloader(self) -> list[DataLoader]:
        return [self._holdout_loaders[t] for t in self.tasks if t in self._holdout_loaders]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.lr)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        params = self.merged_parameters()
        losses = {}
        for task, task_batch in batch.items():
            if task_batch is not None:
                losses[task] = self.task_loss(task, task_batch, params, batch_idx)[0]
        loss = torch.stack(list(losses.values())).mean()
        # one step = one batch per task: epoch means weigh steps equally (batch_size=1)
        for task, value in losses.items():
            self.log(f"learned/train/{task}/loss", value.detach(), on_step=True, on_epoch=True, batch_size=1)
        if self.l2 > 0:
            loss = loss + self.l2 * (self.coefficients - self.initial_coefficients).square().sum()
        self.log("learned/train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=1)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self._coefficient_logs())

    def on_validation_epoch_start(self) -> None:
        for metric in [*self.val_loss, *self.val_acc]:
            metric.reset()  # states left by trainer.validate are inference tensors; fit may not use inference mode
        self._val_params = {k: v.detach() for k, v in self.merged_parameters().items()}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        held = [t for t in self.tasks if t in self._holdout_loaders]
        i = self.tasks.index(held[dataloader_idx])
        loss, output, target = self.task_loss(self.tasks[i], batch, self._val_params or {}, batch_idx)
        n = len(target) if target is not None else 1
        self.val_loss[i].update(loss.detach(), weight=n)
        if target is not None and output is not None:
            correct, count = correct_count(logits_of(output), target)
            if count:
                self.val_acc[i].update(torch.tensor(correct / count), weight=count)

    def on_validation_epoch_end(self) -> None:
        self._val_params = None
        record: dict[str, Any] = {"epoch": self.current_epoch, "step": self.global_step,
                                  "stage": "fit" if self.trainer.state.fn == "fit" else "init"}
        losses = []
        for i, task in enumerate(self.tasks):
            if task not in self._holdout_loaders:
                continue
            loss = self.val_loss[i].compute()
            losses.append(loss)
            record[f"{task}/loss"] = float(loss)
            if self.val_acc[i].update_count:
                record[f"{task}/acc"] = float(self.val_acc[i].compute())
            self.val_loss[i].reset()
            self.val_acc[i].reset()
        if not losses or self.trainer.sanity_checking:
            return
        score = torch.stack(losses).mean()
        record["loss"] = float(score)
        accs = [v for k, v in record.items() if k.endswith("/acc")]
        if accs:
            record["acc"] = sum(accs) / len(accs)
        self.log_dict({f"learned/val/{k}": v for k, v in record.items() if "/" in k or k in ("loss", "acc")})
        self.history.append(record)
        if float(score) < float(self.best_score):
            self.best_score.fill_(float(score))
            self.best_coefficients.copy_(self.coefficients.detach())
            self.best_epoch = self.current_epoch if record["stage"] == "fit" else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("model.", "components.", "heads."))]:
            del state[key]  # frozen and rebuilt from the sources when the module is constructed
        checkpoint["learned_merge"] = {"tasks": self.tasks, "groups": self.groups, "history": self.history,
                                       "best_epoch": self.best_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("learned_merge")
        if saved is None or "coefficients" not in checkpoint.get("state_dict", {}):
            raise ValueError("checkpoint has no learned merging coefficients: it was not saved by LearnedMergeModule")
        if saved["tasks"] != self.tasks or saved["groups"] != self.groups:
            raise ValueError(
                f"checkpoint coefficients are for tasks {saved['tasks']} x {len(saved['groups'])} groups, this "
                f"module has tasks {self.tasks} x {len(self.groups)} groups: build it with the same tasks and granularity"
            )
        self.history = list(saved["history"])
        self.best_epoch = saved["best_epoch"]

    # ---- results ---------------------------------------------------------------------------
    def final_coefficients(self) -> torch.Tensor:
        """The best hold-out coefficients when a hold-out was evaluated, else the current ones."""
        return self.best_coefficients if math.isfinite(float(self.best_score)) else self.coefficients.detach()

    @torch.no_grad()
    def merged_state_dict(self, task: str | None = None, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The merged model's state dict (model's keys and dtypes); with ``task``, that task's head.

        Without ``task``, head keys hold the model's (base) values; use ``task=`` for a model
        that runs a task, or :meth:`head_state_dict` for the heads alone.
        """
        if task is not None and task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; the tasks are {self.tasks}")
        lam = self.final_coefficients() if coefficients is None else coefficients
        merged = self.merged_parameters(lam)
        out = {k: merged[k].detach().clone() if k in merged else v.detach().clone()
               for k, v in self.model.state_dict().items()}
        if task is not None:
            out.update({k: v.clone() for k, v in self.heads.of(task).items()})
        return out

    def head_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.heads.of(task).items()}

    def coefficient_table(self, coefficients: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """task -> group -> coefficient."""
        lam = self.final_coefficients() if coefficients is None else coefficients
        return {t: {g: float(lam[i, j]) for j, g in enumerate(self.groups)} for i, t in enumerate(self.tasks)}

    def report(self) -> MergeReport:
        """A :class:`MergeReport` of the learned merge (coefficients in ``params``)."""
        params = {**self.merge_params, "base_method": self.method.name, "granularity": self.granularity,
                  "groups": self.groups, "coefficients": self.coefficient_table(),
                  "objective": self.objective if isinstance(self.objective, str) else "custom",
                  "best_epoch": self.best_epoch, "heads": self.head_keys}
        return MergeReport(method="learned", params=params, sources=list(self.tasks),
                           merged_keys=list(self.plan.merge_keys), skipped=dict(self.plan.skipped),
                           thresholds=self.thresholds, lam=None)

    def _coefficient_logs(self) -> dict[str, float]:
        lam = self.coefficients.detach()
        if lam.numel() > _LOG_EACH_COEFFICIENT:
            return {f"learned/lam/{t}/mean": float(lam[i].mean()) for i, t in enumerate(self.tasks)}
        return {f"learned/lam/{t}/{g.rstrip('.')}": float(lam[i, j])
                for i, t in enumerate(self.tasks) for j, g in enumerate(self.groups)}


class _HeadStore(nn.Module):
    """Each task's own head tensors (frozen buffers, moved with the module, not checkpointed)."""

    def __init__(self, heads: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        super().__init__()
        self._names: dict[str, dict[str, str]] = {}
        for ti, (task, tensors) in enumerate(heads.items()):
            self._names[task] = {}
            for ki, (key, value) in enumerate(tensors.items()):
                name = f"t{ti}_{ki}"
                self.register_buffer(name, value.detach().clone(), persistent=False)
                self._names[task][key] = name

    def of(self, task: str) -> dict[str, torch.Tensor]:
        return {key: getattr(self, name) for key, name in self._names[task].items()}


def _merge_patterns(exclude: Patterns, heads: Patterns) -> list[str]:
    out: list[str] = []
    for p in (exclude, heads):
        if p is not None:
            out += [p] if isinstance(p, str) else list(p)
    return out


@torch.no_grad()
def _write_base_into(model: nn.Module, src: Any) -> None:
    """Copy base's values into ``model``'s matching entries in place (one copy of the base)."""
    targets = model.state_dict(keep_vars=True)
    for key in src.keys():
        if key in targets and tuple(targets[key].shape) == tuple(src.spec(key).shape):
            targets[key].data.copy_(src.get(key))


# ---- one call ------------------------------------------------------------------------------
@dataclass
class LearnedMergeResult:
    """What :func:`learn_coefficients` returns: merged weights, each task's head, coefficients, history."""

    state_dict: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]]
    coefficients: torch.Tensor
    tasks: list[str]
    groups: list[str]
    history: list[dict[str, Any]]
    best_epoch: int | None
    epochs_run: int
    train_seconds: float
    report: MergeReport
    initial_coefficients: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The merged weights with ``task``'s own head: a model that runs that task."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; the tasks are {self.tasks}")
        return {**self.state_dict, **self.heads[task]}

    def coefficient_table(self) -> dict[str, dict[str, float]]:
        return {t: {g: float(self.coefficients[i, j]) for j, g in enumerate(self.groups)} for i, t in enumerate(self.tasks)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for model cards and the CLI)."""
        return {"tasks": self.tasks, "groups": self.groups, "coefficients": self.coefficient_table(),
                "history": self.history, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
                "train_seconds": self.train_seconds, "report": self.report.to_dict()}

    def save(
        self,
        path: str | os.PathLike[str],
        task: str | None = None,
        config_from: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the merged model (with ``task``'s head if given) through the io sinks, atomically.

        ``*.safetensors``: one file, the coefficients in its metadata; ``*.ckpt``: a Lightning
        checkpoint, the coefficients in its hyper-parameters; any other path: a Hugging Face
        folder (``config_from``'s config and tokenizer files copied) with ``README.md``
        (model card with the coefficient table) and ``learned_merge.json``.
        """
        from ..io import save_lightning_checkpoint, save_safetensors
        from ..io.atomic import atomic_dir, check_output
        from ..io.sinks import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, copy_model_files

        state = self.task_state_dict(task) if task is not None else self.state_dict
        summary = {**self.to_dict(), "head_of": task}
        path = Path(path)
        if path.suffix == ".safetensors":
            return save_safetensors(state, path, {"lightning_ties.learned": json.dumps(summary)}, overwrite=overwrite)
        if path.suffix == ".ckpt":
            return save_lightning_checkpoint(state, path, {"learned_merge": summary}, overwrite=overwrite)
        path = check_output(path, overwrite)
        with atomic_dir(path) as tmp:
            specs = {k: as_source(state).spec(k) for k in state}
            with ShardedWriter(tmp, specs, DEFAULT_MAX_SHARD_SIZE) as writer:
                for key, value in state.items():
                    writer.write(key, value)
            copy_model_files(config_from, tmp)
            (tmp / "learned_merge.json").write_text(json.dumps(summary, indent=2))
            (tmp / "README.md").write_text(model_card(summary))
        return path


def model_card(summary: Mapping[str, Any]) -> str:
    """A model card (markdown) recording how the coefficients were learned and their values."""
    params = summary["report"]["params"]
    groups = summary["groups"]
    lines = [
        "---", "tags:", "- merge", "- lightning-ties", "- learned-merging-coefficients", "---", "",
        f"# Merged model (learned coefficients over {params['base_method']})", "",
        f"Tasks: {', '.join(summary['tasks'])}; granularity {params['granularity']}; objective "
        f"{params['objective']}; best hold-out epoch {summary['best_epoch']}; "
        f"{summary['train_seconds']:.0f} s of coefficient training."
        + (f" Head: task {summary['head_of']!r}." if summary.get("head_of") else ""),
        "", "| task | " + " | ".join(g.rstrip(".") for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for task, row in summary["coefficients"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row[g]:.3f}" for g in groups) + " |")
    return "\n".join(lines) + "\n"


def plot_coefficients(table: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str]) -> Path:
    """Draw the coefficients as a heat map, groups down and tasks across (PNG/SVG/PDF by suffix), atomically.

    Example:
        >>> import tempfile
        >>> plot_coefficients({"a": {"l.0.": 1.0, "l.1.": 0.5}}, tempfile.mkdtemp() + "/lam.png").suffix
        '.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_file

    tasks = list(table)
    groups = list(next(iter(table.values())))
    labels = [g.rstrip(".") for g in groups]
    # groups as rows: there may be hundreds (granularity "tensor") with long names
    values = [[table[t][g] for t in tasks] for g in groups]
    width = 3.0 + 0.8 * len(tasks) + 0.07 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.22 * len(groups)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(groups)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, label="lam")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def learn_coefficients(
    base: Any,
    tasks: Mapping[str, Any],
    dataloaders: Mapping[str, DataLoader],
    model: nn.Module | None = None,
    heads: Patterns = None,
    k: float | None = None,
    method: str = "ties",
    lam: float | None = None,
    granularity: str = "layer",
    groups: Patterns = None,
    objective: Objective = "ce",
    l2: float = 0.0,
    holdout: float | Mapping[str, DataLoader] = 0.2,
    lr: float = 1e-2,
    max_epochs: int = 10,
    max_time_s: float | None = None,
    patience: int | None = None,
    seed: int = 0,
    include: Patterns = None,
    exclude: Patterns = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> LearnedMergeResult:
    """Learn merging coefficients with a ``Trainer`` and return the merged model (see module docs).

    The initial coefficients are evaluated on the hold-out first, so the result is never worse
    on the hold-out than the merge it starts from. ``include``/``exclude`` (regexes) choose the
    merged keys as in ``ties_merge``; ``train_seconds`` counts the Trainer's work (validation of
    the initial coefficients and fit), not the one-off computation of the components.

    Example:
        >>> base = nn.Linear(2, 2)
        >>> fts = {"a": {k: v + 0.1 for k, v in base.state_dict().items()}, "b": base.state_dict()}
        >>> data = [(torch.randn(2), torch.tensor(0)) for _ in range(8)]
        >>> loaders = {t: DataLoader(data, batch_size=4) for t in fts}
        >>> r = learn_coefficients(base, fts, loaders, k=1.0, granularity="task", max_epochs=1,
        ...                        trainer_kwargs={"enable_progress_bar": False, "logger": False,
        ...                                        "enable_model_summary": False})
        >>> r.coefficients.shape
        torch.Size([2, 1])
    """
    if model is None:
        if not isinstance(base, nn.Module):
            raise ValueError("base is not an nn.Module: pass model= (the architecture the merged weights run in)")
        model = base
    pl.seed_everything(seed, verbose=False)
    module = LearnedMergeModule(
        model, tasks, dataloaders, base=base, heads=heads, method=method, k=k, lam=lam, granularity=granularity,
        groups=groups, objective=objective, l2=l2, holdout=holdout, lr=lr, seed=seed, include=include,
        exclude=exclude,
    )
    kwargs: dict[str, Any] = {"max_epochs": max_epochs, "enable_checkpointing": False, "logger": False,
                              "num_sanity_val_steps": 0, **(trainer_kwargs or {})}
    if max_time_s is not None:
        kwargs["max_time"] = timedelta(seconds=max_time_s)
    if patience is not None and module._holdout_loaders:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), EarlyStopping("learned/val/loss", patience=patience)]
    trainer = pl.Trainer(**kwargs)
    t0 = time.perf_counter()  # the components are computed: from here on it is training
    with warnings.catch_warnings():
        # the frozen model is kept in eval mode on purpose (LearnedMergeModule.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        if module._holdout_loaders:
            trainer.validate(module, verbose=False)
        trainer.fit(module)
    seconds = time.perf_counter() - t0
    final = module.final_coefficients().detach().clone()
    return LearnedMergeResult(
        state_dict=module.merged_state_dict(coefficients=final),
        heads={t: module.head_state_dict(t) for t in module.tasks},
        coefficients=final, tasks=list(module.tasks), groups=list(module.groups), history=list(module.history),
        best_epoch=module.best_epoch, epochs_run=trainer.current_epoch, train_seconds=seconds,
        report=module.report(), initial_coefficients=module.initial_coefficients.clone(),
    )


__all__ = [
    "LearnedMergeModule",
    "LearnedMergeResult",
    "TaskComponents",
    "default_group",
    "group_keys",
    "learn_coefficients",
    "model_card",
    "plot_coefficients",
]
