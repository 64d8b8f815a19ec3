"""``lightning-ties search``: pick lam (and k) on validation data, score on test, save the best model and the reports."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LEARNED, SearchConfig, finish_options, to_dict
from ..core.learned.start import finish_time, learned_method
from ..io import merge_to, save_safetensors
from ..merging import get_method
from ..pytorch_lightning import MultiTaskMergeModule, SearchResult, learn_coefficients
import pytorch_lightning as pl
from ..core.heads import exact_patterns
from ..pytorch_lightning.scoring import TaskScorer, make_trainer, quiet_lightning
from ..report import ResultRow, RunReport, SearchCurve, learned_row, log_report, write_report
from .common import (
    RESOLVED_CONFIG,
    Console,
    build_loaders,
    build_model,
    check_paths,
    method_args,
    prepare_output_dir,
    save_resolved_config,
    show_report,
)
from .runs import count_candidates, make_logger, module_for


def run_search_command(cfg: SearchConfig, console: Console, config_path: str) -> int:
    """Search lam (and k) on the validation split, score on test, save the best model and the reports."""
    check_paths(cfg)
    model = build_model(cfg)
    val = build_loaders(cfg, cfg.data.val_split)
    test = build_loaders(cfg, cfg.data.test_split) if cfg.data.test_split else None
    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, [str(cfg.save_model)] if cfg.save_model else [])  # only once the inputs are known to be good
    save_resolved_config(cfg, out / RESOLVED_CONFIG, cfg.overwrite)
    name, _, _ = method_args(cfg.method)
    with quiet_lightning():
        pl.seed_everything(cfg.seed, verbose=False)
        learned = name == LEARNED
        module = module_for(cfg, model, None if learned else cfg.method)
        # without a test split the reported scores are on validation data: log them as such
        eval_prefix = "merge/test" if cfg.data.test_split else "merge/val"
        scorer = TaskScorer(module, make_trainer(logger), cfg.tasks, eval_prefix=eval_prefix)
        split = cfg.data.test_split or cfg.data.val_split
        report = RunReport(f"lightning-ties search: {name}", list(cfg.tasks), metric=scorer.metric_name(), split=split)
        report.config = {"file": config_path, **to_dict(cfg)}
        eval_loaders = test or val
        report.add_row(ResultRow("base (pretrained)", "base", "reference", scorer.score_base(eval_loaders)))
        report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", scorer.score_finetuned(eval_loaders)))
        t0 = time.perf_counter()
        if learned:
            result = _learn(cfg, model, val, {k: v for k, v in cfg.method.items() if k != "name"})
            scores = scorer.score_weights(eval_loaders, result.state_dict)
            report.add_row(learned_row(result, scores))
            report.extra["learned"] = result.to_dict()
            merged_state = result.state_dict
        elif cfg.search.method == "auto":
            share, finish = finish_options(cfg.search.finish) if cfg.search.finish else (0.0, None)
            budget_s = None if cfg.search.budget_s is None else cfg.search.budget_s * (1 - share)
            result = _search_auto(cfg, scorer, val, console, budget_s)
            name = result.method
            merged_state = None
            if get_method(name).needs_data:  # RegMean: its Gram matrices stay those of the validation data
                merged_state = _merged_body(module)
                scores = scorer.score_weights(eval_loaders, merged_state)
            else:
                scores = scorer.score_merged(eval_loaders, name, result.k, result.lam)
            report.add_row(ResultRow(f"{name} (auto)", name, "auto on val", scores, result.k, result.lam))
            report.extra["auto"] = {"summary": result.summary, "budget_s": result.budget_s,
                                    "budget_cut": result.budget_cut, "candidates": result.rows()}
            if finish is not None:
                left = None if cfg.search.budget_s is None else \
                    finish_time(cfg.search.budget_s - (time.perf_counter() - t0), result, learned_method("auto", result))
                learned = _learn(cfg, model, val, {**finish, "method": "auto", "lam": result, "max_time_s": left})
                learned_scores = scorer.score_weights(eval_loaders, learned.state_dict)
                report.add_row(learned_row(learned, learned_scores))
                report.extra["finish"] = {"kept": learned.kept, "compared": learned.compared, "learned": learned.to_dict()}
                console.say(f"finish: learned coefficients on {learned.report.params['base_method']}'s shares; "
                            f"the hold-out keeps {learned.kept}")
                if learned.kept == LEARNED:
                    merged_state = learned.state_dict
            for m in result.methods:  # one curve per method tried, each marking its own best point
                part = SearchResult(method=m, candidates=[c for c in result.candidates if c.method == m], mode=result.mode)
                if part.candidates:
                    report.searches.append(SearchCurve.from_search(m, part, cfg.search.objective))
        else:
            # search.methods: choose the method on validation data too, each over its own lam grid
            methods = list(cfg.search.methods or [name])
            label = ", ".join(methods)
            bar = console.progress(count_candidates(methods, cfg.search), f"searching {label}")
            with bar:
                result = scorer.search(val, methods, cfg.search, on_candidate=lambda _c: bar.update())
            console.say(
                f"{label}: {len(result.candidates)} candidates, chose {result.method} "
                + ("" if result.k is None else f"k={result.k}, ") + f"lam={result.lam}"
            )
            name = result.method
            scores = scorer.score_merged(eval_loaders, name, result.k, result.lam)
            report.add_row(ResultRow(f"{name} (searched)", name, "searched on val", scores, result.k, result.lam))
            for m in methods:  # one curve per method searched, each marking its own best point
                part = SearchResult(method=m, candidates=[c for c in result.candidates if c.method == m], mode=result.mode)
                report.searches.append(SearchCurve.from_search(m, part if len(methods) > 1 else result, cfg.search.objective))
            merged_state = None
        report.extra["search_s"] = time.perf_counter() - t0
    report.fill_normalized()
    saved = _save_best(cfg, out, module, name, result, merged_state) if cfg.save_model else None
    if saved is not None:
        report.extra["model"] = str(saved)
    paths = write_report(report, out, overwrite=cfg.overwrite)
    log_report(report, logger)
    show_report(report, paths, saved)
    return 0


def _search_auto(cfg: SearchConfig, scorer: TaskScorer, val: Mapping[str, Any], console: Console,
                 budget_s: float | None) -> SearchResult:
    """``search.method: auto``: every registry method coarse to fine on ``val`` within ``budget_s``."""
    grid = cfg.search
    bar = console.progress(None, "searching auto")
    with bar:
        result = scorer.module.search(
            scorer.trainer, dict(val), method="auto", k=grid.k, lam=grid.lam, objective=grid.objective,
            normalize=grid.objective.startswith("normalized"), resume=False, on_candidate=lambda _c: bar.update(),
            log_prefix=scorer.search_prefix, budget_s=budget_s,
        )
    console.say(f"auto: {result.summary}")
    return result


def _merged_body(module: MultiTaskMergeModule) -> dict[str, Any]:
    """The merge the module holds, with the base's heads (as ``merge_to`` writes them)."""
    state = {key: value.detach().clone() for key, value in module.model.state_dict().items()}
    for key in module.head_keys:
        if key in module.merger.base_source.keys():
            state[key] = module.merger.base_source.get(key)
    return state


def _learn(cfg: SearchConfig, model: nn.Module, val: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    return learn_coefficients(
        cfg.base,
        dict(cfg.tasks),
        dict(val),
        model=model,
        heads=cfg.heads,
        include=cfg.include,
        exclude=cfg.exclude,
        seed=cfg.seed,
        trainer_kwargs={"enable_progress_bar": False, "enable_model_summary": False, "logger": False},
        **options,
    )


def _save_best(
    cfg: SearchConfig, out: Path, module: MultiTaskMergeModule, method: str, result: Any, merged_state: Any
) -> Path:
    """The chosen merge as a file: streamed from the checkpoints by ``merge_to`` (heads come from base)."""
    path = out / str(cfg.save_model)
    if merged_state is not None:  # learned coefficients: the weights exist only in memory
        return save_safetensors(merged_state, path, overwrite=cfg.overwrite)
    configured, _, params = method_args(cfg.method)
    if method != configured:  # a method chosen from search.methods: method.name's parameters it has
        accepted = get_method(method).parameters()
        params = {key: v for key, v in params.items() if key in accepted}
    params.pop("k", None)
    if result.k is not None:
        params["k"] = result.k
    exclude = exact_patterns(module.head_keys, cfg.exclude) or []
    merge_to(
        path,
        cfg.base,
        list(cfg.tasks.values()),
        method,
        result.lam,
        include=cfg.include,
        exclude=exclude or None,
        on_mismatch="base",
        progress=False,
        overwrite=cfg.overwrite,
        **params,
    )
    return path
