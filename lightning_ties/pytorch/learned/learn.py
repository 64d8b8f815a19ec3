"""``learn_coefficients``: build a :class:`LearnedMergeModule`, train it with a ``Trainer``, return the result."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ...merging.plan import Patterns
from .._compat import EarlyStopping, pl
from ...core.heads import HeadsArg
from .module import LearnedMergeModule
from ...core.learned.groups import GRANULARITIES, check_granularity, expand_coefficients
from ...core.learned.objectives import LossObjective
from ...core.learned.result import LearnedMergeResult, hf_base
from ...core.learned.start import (AUTO_GRANULARITIES, StartScale, choose_granularity, learned_method, prefer_on_holdout,
                                   split_budget, start_scale)
from ...core.merger import module_device
from ...core.search import SearchResult
from ...merging import MergeOptions, TaskVectorMerger, apply_task_vector, as_source, get_method


def learn_coefficients(
    base: Any,
    tasks: Mapping[str, Any],
    dataloaders: Mapping[str, DataLoader],
    model: nn.Module | None = None,
    heads: HeadsArg = None,
    k: float | None = None,
    method: str = "ties",
    lam: StartScale = None,
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

    The start is evaluated on the hold-out first, so the result is never worse on the hold-out
    than the merge it starts from. ``lam``: where every coefficient starts: a number, a search's
    :class:`~lightning_ties.core.search.SearchResult` (its best lam and k), ``"search"`` (the
    method's lam grid walked coarse to fine on the hold-out loss) or None (the method's default).
    ``method="auto"`` with ``lam=`` an auto search's result (a search over several methods)
    learns on the best method of the search that splits into per-task shares (TSV-M when the
    winner is Iso-CTS, which does not), starting at that method's best lam; the search's winner is
    then scored on the same hold-out, and ``result.compared`` / ``result.kept`` say which of the
    two the hold-out prefers (accuracy first, then loss)::

        searched = module.search(trainer, val_loaders, method="auto", budget_s=120)
        result = learn_coefficients(base, tasks, val_loaders, method="auto", lam=searched, max_time_s=180)
        result.kept  # "learned", or the winner's method: then ``module.apply_merge`` keeps the search's merge

    ``granularity="auto"``: per layer first (:data:`~...core.learned.start.AUTO_FIRST_SHARE` of
    the epochs and time), then per tensor starting from the per-layer result; the granularity with
    the lower best hold-out loss is kept (``result.report.params["granularity"]``), and
    ``result.history`` holds both phases (each record names its granularity).
    ``include``/``exclude`` (regexes) choose the merged keys as in ``ties_merge``;
    ``train_seconds`` counts the Trainer's work (start search, hold-out passes and fit: what
    ``max_time_s`` bounds), not the one-off computation of the components.

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
    check_granularity(granularity, (*GRANULARITIES, "auto"))
    searched = lam if isinstance(lam, SearchResult) else None
    method = learned_method(method, lam)
    lam, k = start_scale(lam, method, k)  # once: both phases of "auto" use the search's k
    if granularity == "auto" and holdout == 0:
        raise ValueError("granularity='auto' is chosen on the hold-out: pass holdout= a fraction > 0 or loaders")
    common = dict(base=base, heads=heads, method=method, k=k, groups=groups, objective=objective, l2=l2,
                  holdout=holdout, lr=lr, seed=seed, include=include, exclude=exclude)
    fit = dict(patience=patience, trainer_kwargs=trainer_kwargs)
    t0 = time.perf_counter()
    if granularity != "auto":
        module, seconds = _train_one(model, tasks, dataloaders, common, granularity, lam, max_epochs, max_time_s, seed, **fit)
        return _compared(_result(module, seconds, base, model), module, searched, trainer_kwargs)
    first_epochs, second_epochs, first_time = split_budget(max_epochs, max_time_s)
    coarse, seconds = _train_one(model, tasks, dataloaders, common, AUTO_GRANULARITIES[0], lam, first_epochs, first_time, seed, **fit)
    start = coarse.final_coefficients().detach().cpu()
    left = None if max_time_s is None else max(0.0, max_time_s - (time.perf_counter() - t0))
    fine, more = _train_one(model, tasks, dataloaders, common, AUTO_GRANULARITIES[1], start, second_epochs, left, seed,
                            coarse=coarse, **fit)
    best = {m.granularity: float(m.best_score) for m in (coarse, fine)}
    chosen = coarse if choose_granularity(best) == coarse.granularity else fine
    chosen.history = [*coarse.history, *fine.history]
    return _compared(_result(chosen, seconds + more, base, model, candidates=best), chosen, searched, trainer_kwargs)


def _compared(result: LearnedMergeResult, module: LearnedMergeModule, searched: SearchResult | None,
              trainer_kwargs: Mapping[str, Any] | None) -> LearnedMergeResult:
    """With a search's result as the start whose winner is another method: score that winner on the hold-out too.

    The winner (say Iso-CTS, which has no shares to learn) is the merge to beat; ``result.kept``
    names what the hold-out prefers (:func:`~...core.learned.start.prefer_on_holdout`).
    """
    best = searched.best if searched is not None else None
    winner = (best.method or searched.method) if best is not None else None
    if winner is None or winner == module.method.name or not module._holdout_loaders or get_method(winner).needs_data:
        return result
    kwargs = {"enable_checkpointing": False, "logger": False, **(trainer_kwargs or {})}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        scores = module.holdout_scores(pl.Trainer(**kwargs), merge_of(module, winner, best.k, best.lam))
    # the kept coefficients' record: the lowest hold-out loss of the kept granularity (the first among equals)
    learned = min((h for h in module.history if h["granularity"] == module.granularity and h["stage"] != "compare"),
                  key=lambda h: h["loss"])
    result.compared = {"learned": _summary(learned), winner: {"k": best.k, "lam": best.lam, **_summary(scores)}}
    result.kept = prefer_on_holdout(result.compared)
    return result


def merge_of(module: LearnedMergeModule, method: str, k: float | None, lam: float) -> dict[str, torch.Tensor]:
    """Another registry method's merge of the module's learned keys at (k, lam): base + lam * tau_m, base's dtypes."""
    base = module.model.state_dict()
    merger = TaskVectorMerger(as_source(module.model, "base"), module.sources, MergeOptions.from_keywords(method, k=k),
                              plan=module.plan, device=module_device(module.model))
    tau = dict(merger)
    return dict(apply_task_vector({key: base[key] for key in tau}, tau, lam))


def _summary(record: Mapping[str, Any]) -> dict[str, float]:
    return {name: record[name] for name in ("loss", "acc") if name in record}


def _train_one(model, tasks, dataloaders, common, granularity, lam, max_epochs, max_time_s, seed, patience, trainer_kwargs,
               coarse: LearnedMergeModule | None = None) -> tuple[LearnedMergeModule, float]:
    """Build one module, start it (at ``lam``; with ``coarse``: at its coefficients ``lam``, expanded), validate and fit it."""
    pl.seed_everything(seed, verbose=False)
    search = isinstance(lam, str)  # "search", checked by start_scale
    module = LearnedMergeModule(model, tasks, dataloaders, granularity=granularity,
                                lam=None if search or coarse is not None else lam, **common)
    if coarse is not None:
        module.start_from(expand_coefficients(lam, coarse.key_group, module.key_group))
    kwargs: dict[str, Any] = {"max_epochs": max_epochs, "enable_checkpointing": False, "logger": False,
                              "num_sanity_val_steps": 0, **(trainer_kwargs or {})}
    if patience is not None and module._holdout_loaders:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), EarlyStopping("learned/val/loss", patience=patience)]
    t0 = time.perf_counter()  # the components are computed: from here on it is training
    with warnings.catch_warnings():
        # the frozen model is kept in eval mode on purpose (LearnedMergeModule.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        validator = pl.Trainer(**kwargs)
        if search:
            module.search_start(validator)
        if module._holdout_loaders:
            validator.validate(module, verbose=False)
        if max_time_s is not None:  # what the start's hold-out passes took is part of the budget
            kwargs["max_time"] = timedelta(seconds=max(0.0, max_time_s - (time.perf_counter() - t0)))
        pl.Trainer(**kwargs).fit(module)
    return module, time.perf_counter() - t0


def _result(module: LearnedMergeModule, seconds: float, base: Any, model: nn.Module,
            candidates: dict[str, float] | None = None) -> LearnedMergeResult:
    final = module.final_coefficients().detach().clone()
    base_folder, base_model = hf_base(base, model)
    report = module.report()
    if candidates is not None:
        report.params["granularity_candidates"] = candidates  # best hold-out loss of each granularity tried
    return LearnedMergeResult(
        state_dict=module.merged_state_dict(coefficients=final),
        heads={t: module.head_state_dict(t) for t in module.tasks},
        coefficients=final, tasks=list(module.tasks), groups=list(module.groups), history=list(module.history),
        best_epoch=module.best_epoch, epochs_run=module.current_epoch, train_seconds=seconds,
        report=report, initial_coefficients=module.initial_coefficients.clone(),
        base_folder=base_folder, base_model=base_model,
    )


__all__ = ["learn_coefficients"]
