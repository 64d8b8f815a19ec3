"""``lightning-ties evaluate``: per-task scores of the base, each fine-tuned model and given checkpoints."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, EvaluateConfig, to_dict
import pytorch_lightning as pl
from ..pytorch_lightning import MultiTaskMergeModule
from ..pytorch_lightning.scoring import TaskScorer, check_weights, make_trainer, quiet_lightning
from ..report import ResultRow, RunReport, log_report, write_report
from .common import (
    RESOLVED_CONFIG,
    Console,
    build_loaders,
    build_model,
    check_paths,
    prepare_output_dir,
    save_resolved_config,
    show_report,
)
from .runs import make_logger, module_for


def run_evaluate(cfg: EvaluateConfig, console: Console, config_path: str) -> int:
    """Score base, fine-tuned and ``cfg.checkpoints`` on ``cfg.split``; write and print the report."""
    check_paths(cfg)
    model = build_model(cfg)
    loaders = build_loaders(cfg, cfg.split)
    with quiet_lightning():  # key names and shapes only; the heads it detects would warn
        module = module_for(cfg, model)
    check_checkpoints(cfg, module)
    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite)  # only once the inputs are known to be good
    save_resolved_config(cfg, out / RESOLVED_CONFIG, cfg.overwrite)
    with quiet_lightning():
        pl.seed_everything(cfg.seed, verbose=False)
        scorer = TaskScorer(module, make_trainer(logger), cfg.tasks, eval_prefix=f"merge/{cfg.split}")
        report = RunReport("lightning-ties evaluate", list(cfg.tasks), metric=scorer.metric_name(), split=cfg.split)
        report.config = {"file": config_path, **to_dict(cfg)}
        report.add_row(ResultRow("base (pretrained)", "base", "reference", scorer.score_base(loaders)))
        report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", scorer.score_finetuned(loaders)))
        for name, path in cfg.checkpoints.items():
            console.say(f"evaluating {name}: {path}")
            report.add_row(ResultRow(name, "checkpoint", path, scorer.score_weights(loaders, path)))
    report.fill_normalized()
    paths = write_report(report, out, overwrite=cfg.overwrite)
    log_report(report, logger)
    show_report(report, paths)
    return 0


def check_checkpoints(cfg: EvaluateConfig, module: MultiTaskMergeModule) -> None:
    """Every ``cfg.checkpoints`` entry fits the model outside the per-task heads (names and shapes, before any work).

    Scoring would otherwise refuse a checkpoint of another architecture only after the base, the
    fine-tuned models and the checkpoints before it were scored, and score one lacking keys with
    each task's own fine-tuned values of them.
    """
    for name, path in cfg.checkpoints.items():
        where = f"checkpoints.{name}={path!r}"
        try:
            check_weights(module, path, label=where)
        except ValueError as err:  # unreadable, keys of another model, or keys missing or of another shape
            text = str(err)
            raise ConfigError(text if where in text else f"{where}: {text}") from None
