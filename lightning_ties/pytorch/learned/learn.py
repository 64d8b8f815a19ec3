"""``learn_coefficients``: build a :class:`LearnedMergeModule`, train it with a ``Trainer``, return the result."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from ...merging.plan import Patterns
from .._compat import EarlyStopping, pl
from ...core.heads import HeadsArg
from .module import LearnedMergeModule
from ...core.learned.objectives import LossObjective
from ...core.learned.result import LearnedMergeResult, hf_base


def learn_coefficients(
    base: Any,
    tasks: Mapping[str, Any],
    dataloaders: Mapping[str, DataLoader],
    model: nn.Module | None = None,
    heads: HeadsArg = None,
    k: float | None = None,
    method: str = "ties",
    lam: float | None = None,
    granularity: str = "layer",
    groups: Patterns = None,
    objective: LossObjective = "ce",
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
        >>> import torch
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
    base_folder, base_model = hf_base(base, model)
    return LearnedMergeResult(
        state_dict=module.merged_state_dict(coefficients=final),
        heads={t: module.head_state_dict(t) for t in module.tasks},
        coefficients=final, tasks=list(module.tasks), groups=list(module.groups), history=list(module.history),
        best_epoch=module.best_epoch, epochs_run=trainer.current_epoch, train_seconds=seconds,
        report=module.report(), initial_coefficients=module.initial_coefficients.clone(),
        base_folder=base_folder, base_model=base_model,
    )


__all__ = ["learn_coefficients"]
