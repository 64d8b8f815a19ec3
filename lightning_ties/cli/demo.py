"""``lightning-ties demo``: the offline digits demo (train, merge every way, print the table, write the reports)."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, DemoConfig, to_dict
from ..demo.data import DigitsTask
from ..demo.run import run_continual, run_demo
from ..report import log_report, write_report
from .common import RESOLVED_CONFIG, Console, prepare_output_dir, save_resolved_config, show_report
from .runs import count_candidates, make_logger


def run_demo_command(cfg: DemoConfig, console: Console, config_path: str | None) -> int:
    """Run the demo (or its continual variant) into ``cfg.output_dir``; write and print the report."""
    check_tasks(cfg, config_path or "the demo config")
    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(
        cfg.output_dir, cfg.overwrite, [f"checkpoints/{t}.safetensors" for t in ("base", *cfg.tasks)]
    )
    save_resolved_config(cfg, out / RESOLVED_CONFIG, cfg.overwrite)
    if cfg.continual:
        report = run_continual(cfg, out, logger=logger, say=console.say)
    else:
        bar = console.progress(count_candidates(cfg.methods, cfg.search), "searching lam/k")
        with bar:
            report = run_demo(cfg, out, logger=logger, say=console.say, tick=bar.update)
    report.config = {"file": config_path or "(embedded default)", **to_dict(cfg)}
    paths = write_report(report, out, overwrite=cfg.overwrite)
    log_report(report, logger)
    show_report(report, paths)
    return 0


def check_tasks(cfg: DemoConfig, where: str) -> None:
    """Every task name is one the demo can build (``parity``, ``mod3_flip``...), before any work."""
    for task in cfg.tasks:
        try:
            DigitsTask.parse(task)
        except ValueError as err:
            raise ConfigError(f"{where}: tasks: {err}") from None
