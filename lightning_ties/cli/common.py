"""Pieces every workflow of the command shares that need no Lightning: console, output folder, config checks.

Kept free of Lightning so that ``lightning-ties merge`` (and ``--help``) start without its import time.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from ..config import ConfigError, EvaluateConfig, MergeConfig, SearchConfig, resolve_target, to_yaml
from ..report import REPORT_FILES, RunReport, print_table, summary_lines, write_text_atomic

#: File name of the fully resolved config written next to every run's outputs.
RESOLVED_CONFIG = "config.yaml"


class Console:
    """Where the command's messages go: progress lines to stderr (unless quiet), results to stdout."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def say(self, line: str) -> None:
        """One progress line on stderr (nothing when quiet)."""
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def progress(self, total: int | None, desc: str) -> Any:
        """A bar over search candidates, drawn only on a terminal and when not quiet."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.quiet or not sys.stderr.isatty(), leave=False, unit="cand")


def prepare_output_dir(path: str, overwrite: bool, outputs: Sequence[str] = (), key: str = "output_dir") -> Path:
    """Check every file the run writes into its folder before any work; create the folder.

    The files are the resolved config, the reports and plots, and ``outputs`` (relative paths).
    One that exists is replaced only when lightning-ties wrote it, nobody changed it since (its
    folder's manifest lists it with the same size and sha256), and ``overwrite`` is set; other
    files in the folder are left alone.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}={path!r} is a file; give a folder for the run's outputs")
    for name in (RESOLVED_CONFIG, *REPORT_FILES, *outputs):
        check_output_file(out / name, overwrite, key)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_output_file(path: Path, overwrite: bool, key: str) -> None:
    """The ownership rule for one output file of the command, as a one-line config error."""
    from ..io.ownership import check_writable  # io loads when a workflow runs, not for --help

    try:
        check_writable(path, overwrite, kind="file")
    except (FileExistsError, ValueError) as err:
        hint = "" if "overwrite=True" not in str(err) else f" (set overwrite=true, or choose another {key})"
        raise ConfigError(f"{key}: {err}{hint}") from None


def save_resolved_config(cfg: Any, path: Path, overwrite: bool = True) -> Path:
    """Write the fully resolved config (re-running it reproduces the result)."""
    return write_text_atomic(path, to_yaml(cfg), overwrite=overwrite)


def check_paths(cfg: MergeConfig | SearchConfig | EvaluateConfig) -> None:
    """Every checkpoint the config names exists (before any work)."""
    named: list[tuple[str, str]] = [("base", cfg.base)]
    if isinstance(cfg, MergeConfig):
        named += [(f"models[{i}]", m) for i, m in enumerate(cfg.models)]
    else:
        named += [(f"tasks.{t}", p) for t, p in cfg.tasks.items()]
    if isinstance(cfg, EvaluateConfig):
        named += [(f"checkpoints.{n}", p) for n, p in cfg.checkpoints.items()]
    for key, path in named:
        if not Path(path).exists():
            raise ConfigError(f"{key}={path!r}: no such file or folder")


def method_args(section: Mapping[str, Any]) -> tuple[str, float | None, dict[str, Any]]:
    """``(name, lam, other parameters)`` of a config's ``method`` section."""
    params = dict(section)
    name = params.pop("name")
    lam = params.pop("lam", None)
    return name, lam, params


def build_model(cfg: SearchConfig | EvaluateConfig) -> nn.Module:
    """The architecture named by ``model.target`` (weights are replaced by base / the merge)."""
    factory = resolve_target(cfg.model.target, "model.target")
    try:
        model = factory(**cfg.model.args)
    except TypeError as err:
        raise ConfigError(
            f"model.args: {cfg.model.target} rejected the arguments {dict(cfg.model.args)}: {err}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.target={cfg.model.target!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_loaders(cfg: SearchConfig | EvaluateConfig, split: str) -> dict[str, Any]:
    """``data.target(split=..., **data.args)``: one dataloader per task of the config."""
    factory = resolve_target(cfg.data.target, "data.target")
    try:
        loaders = factory(split=split, **cfg.data.args)
    except TypeError as err:
        raise ConfigError(
            f"data.args: {cfg.data.target} rejected split={split!r} and {dict(cfg.data.args)}: {err}"
        ) from None
    if not isinstance(loaders, Mapping):
        raise ConfigError(
            f"data.target={cfg.data.target!r} must return a dict task -> DataLoader, got {type(loaders).__name__}"
        )
    missing = [t for t in cfg.tasks if t not in loaders]
    if missing:
        raise ConfigError(
            f"data.target={cfg.data.target!r} gave no {split!r} dataloader for task(s) {missing}; "
            f"it gave {sorted(loaders)}"
        )
    return {t: loaders[t] for t in cfg.tasks}


def show_report(report: RunReport, paths: Sequence[Path], model: Path | None = None) -> None:
    """Print the table, where the files went, the saved model and the total time (stdout)."""
    print_table(report)
    for line in summary_lines(report, paths):
        print(line)
    if model is not None:
        print(f"best merged model: {model}")
    if "timings" in report.extra:
        print(f"total time: {report.extra['timings']['total_s']:.1f}s")
