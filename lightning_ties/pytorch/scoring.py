"""Score models per task through Lightning's validation loop: the Trainer the workflows use and a scorer.

Used by the ``lightning-ties`` command (:mod:`lightning_ties.cli`) and the demo
(:mod:`lightning_ties.demo`), which both sit above this layer; it lives here, not in
:mod:`lightning_ties.evaluation`, because it builds Trainers and :class:`MultiTaskMergeModule`
objects, and ``evaluation`` sits below Lightning (the batch convention and the accuracy this
layer's validation loop uses).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> base = nn.Linear(2, 2)
    >>> task = {"a": {k: v + 0.1 for k, v in base.state_dict().items()}}
    >>> loaders = {"a": DataLoader(TensorDataset(torch.eye(2), torch.tensor([0, 1])), batch_size=2)}
    >>> with quiet_lightning():
    ...     scorer = TaskScorer(MultiTaskMergeModule(base, task), make_trainer(), task)
    ...     sorted(scorer.score_base(loaders))
    ['a']
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..core.heads import exact_patterns
from ..core.keys import held_names, match_to_module, module_ties
from ..merging import get_method
from ._compat import pl
from .module import MultiTaskMergeModule


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners (GPU/TPU lines, tips) and expected warnings."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*key\(s\) differ across models.*")
        warnings.filterwarnings("ignore", message=r".*LitLogger.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # Lightning 2.6 vs torch 2.13 pytree notice
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # frozen model, on purpose
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def make_trainer(logger: Any = None, **overrides: Any) -> Any:
    """The workflows' Trainer: one CPU device, no checkpoints, no summary, no per-pass progress bar.

    Args:
        logger: a Lightning logger, or None for none.
        overrides: other ``Trainer`` arguments (``max_epochs`` for training, ``enable_progress_bar``).
    """
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        enable_progress_bar=False,  # the workflows draw one bar over candidates instead of one per pass
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class TaskScorer:
    """Score models per task through :class:`MultiTaskMergeModule` and a Trainer (each call is validation passes).

    Args:
        module: the multitask module (base, tasks, per-task heads).
        trainer: runs Lightning's validation loop (loggers, progress).
        tasks: the task name -> fine-tuned model mapping the module was built from (to score
            other weights with the same per-task heads).
        eval_prefix: where the ``score_*`` passes are logged (``merge/test/<task>/<metric>``; their
            fine-tuned reference under ``finetuned/test``); pass ``"merge/val"`` when they run on
            validation data.
        search_prefix: where the search's candidates are logged (``merge/val/...``, one step each).
    """

    def __init__(
        self,
        module: MultiTaskMergeModule,
        trainer: Any,
        tasks: Mapping[str, Any],
        eval_prefix: str = "merge/test",
        search_prefix: str = "merge/val",
    ) -> None:
        self.module = module
        self.trainer = trainer
        self.tasks = dict(tasks)
        self.eval_prefix = eval_prefix
        self.search_prefix = search_prefix

    @staticmethod
    def _first(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        return {t: float(next(iter(v.values()))) for t, v in scores.items()}

    def metric_name(self) -> str:
        """The name of the first metric of the first task (the report's column)."""
        return next(iter(self.module.task_metrics.collection(self.module.tasks[0]).keys()), "score")

    def score_base(self, loaders: Mapping[str, Any]) -> dict[str, float]:
        """The pretrained weights with each task's head (lam = 0)."""
        # lam=0: the base, whatever the method
        return self._first(self.module.evaluate(self.trainer, dict(loaders), lam=0.0, log_prefix=self.eval_prefix))

    def score_finetuned(self, loaders: Mapping[str, Any]) -> dict[str, float]:
        """Each fine-tuned model on its own task (on ``loaders``, not the module's cached reference)."""
        cached = self.module.reference
        self.module.reference = {}
        try:
            return self._first(self.module.measure_finetuned(self.trainer, dict(loaders), log_prefix=self.eval_prefix))
        finally:
            self.module.reference = cached

    def score_merged(
        self, loaders: Mapping[str, Any], method: str, k: float | None, lam: float | None
    ) -> dict[str, float]:
        """``method`` at fixed (k, lam)."""
        self.use_method(method)
        return self._first(self.module.evaluate(self.trainer, dict(loaders), k=k, lam=lam, log_prefix=self.eval_prefix))

    def use_method(self, method: str) -> None:
        """Switch the module to another registry method, with that method's default parameters."""
        if method != self.module.method:
            self.module.method = method
            self.module.method_params = {}

    def score_weights(self, loaders: Mapping[str, Any], weights: Any) -> dict[str, float]:
        """Given merged weights (path, state dict or source), each task with its own head.

        The weights become the base of a second module over the same tasks, scored at lam = 0,
        so they run through the same validation loop and head swapping as every merge.

        Raises:
            ValueError: the weights lack a key of the model outside its heads, or hold one in another
                shape (see :func:`check_weights`).
        """
        check_weights(self.module, weights)
        # its own copy of the architecture: the main module tracks which head its model holds
        module = MultiTaskMergeModule(
            weights,
            self.tasks,
            model=copy.deepcopy(self.module.model),
            heads=exact_patterns(self.module.head_keys),
            method="task_arithmetic",
        )
        module._log_steps = self.module._log_steps  # noqa: SLF001  one step sequence per prefix in the logs
        return self._first(module.evaluate(self.trainer, dict(loaders), lam=0.0, log_prefix=self.eval_prefix))

    def search(
        self,
        loaders: Mapping[str, Any],
        method: str | Sequence[str],
        grid: Any,
        on_candidate: Callable[[Any], None] | None = None,
    ) -> Any:
        """Search (method,) k and lam on ``loaders`` with ``grid`` (``k``, ``lam``, ``strategy``, ``objective``).

        ``method``: one method, or a list to choose from (the module's method parameters reach the
        methods that have them). The chosen merge is left applied; ``result.method`` names it.
        """
        methods = [method] if isinstance(method, str) else list(method)
        ms = [get_method(m) for m in methods]
        if len(methods) == 1:
            self.use_method(methods[0])
        return self.module.search(
            self.trainer,
            dict(loaders),
            method=methods,
            k=grid.k if any(m.has_k for m in ms) else None,
            lam=grid.lam if any(m.has_lam for m in ms) else None,
            strategy=str(grid.strategy),
            objective=grid.objective,
            normalize=grid.objective.startswith("normalized"),
            resume=False,
            on_candidate=on_candidate,
            log_prefix=self.search_prefix,
        )


def check_weights(module: MultiTaskMergeModule, weights: Any, label: str = "weights to score") -> None:
    """Refuse weights that lack a key of ``module``'s model outside its heads, or hold one in another shape.

    Reads key names and shapes only (of a safetensors file, its header). Scored as the base of a
    module over the same tasks, such keys would differ across its checkpoints, and keys that differ
    are per-task heads: each task would run with its own fine-tuned value of them, and the weights
    would score as they are not.

    Args:
        module: the module whose model, base and per-task heads the weights must fit.
        weights: a path, state dict or source (keys as saved, matched to the model's as the base's are).
        label: how the error names the weights (``checkpoints.ties='runs/merged.safetensors'``).

    Raises:
        ValueError: naming the weights, the first keys that are missing or of another shape (with
            both shapes), and what to do.
    """
    model_state = module.model.state_dict()
    source = match_to_module(weights, list(model_state), label=label)
    held = held_names(source.keys(), module_ties(module.model))  # model key -> the name the weights hold it under
    base_keys = set(module.merger.base_source.keys())
    heads = set(module.head_keys)
    wrong = []
    for key, tensor in model_state.items():
        if key not in base_keys or key in heads:
            continue
        shape = tuple(tensor.shape)
        if key not in held:
            wrong.append(f"{key!r} {shape} missing")
        elif (held_shape := tuple(source.spec(held[key]).shape)) != shape:
            wrong.append(f"{key!r} is {held_shape}, the model's is {shape}")
    if wrong:
        raise ValueError(
            f"{label}: {len(wrong)} key(s) of the model outside its per-task heads are missing or of another "
            f"shape ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}); give weights of this architecture "
            "holding every key the base holds (only per-task heads may be absent or differ), or name the keys in "
            "heads if each task should run with its own"
        )


__all__ = ["TaskScorer", "check_weights", "make_trainer", "quiet_lightning"]
