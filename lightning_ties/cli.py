"""The ``lightning-ties`` command: ``merge``, ``search``, ``evaluate`` and ``demo``, driven by YAML configs.

Every subcommand takes a config file (the demo has an embedded default) and ``key=value``
overrides (omegaconf dotlist), checks the whole config before any work, writes the fully
resolved config next to its outputs, and exits non-zero with one line on bad input (the
traceback only with ``--debug``).

Example (the same as ``lightning-ties demo --fast --quiet methods=[ties]`` in a shell)::

    from lightning_ties.cli import main
    exit_code = main(["demo", "--fast", "--quiet", "methods=[ties]", "output_dir=runs/demo-fast"])
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import (
    DEMO_FAST,
    LEARNED,
    ConfigError,
    DemoConfig,
    EvaluateConfig,
    MergeConfig,
    SearchConfig,
    load_config,
    resolve_target,
    to_dict,
    to_yaml,
)
from .merging import describe_methods, get_method

PROG = "lightning-ties"
RESOLVED_CONFIG = "config.yaml"

EXAMPLES = {
    "merge": """examples:
  lightning-ties merge configs/merge.yaml
  lightning-ties merge configs/merge.yaml method=task_arithmetic output=runs/merged-ta.safetensors
  lightning-ties merge configs/merge.yaml method.k=0.1 method.lam=1.5 output=runs/merged/ overwrite=true""",
    "search": """examples:
  lightning-ties search configs/search.yaml
  lightning-ties search configs/search.yaml method=task_arithmetic output_dir=runs/search-ta
  lightning-ties search configs/search.yaml search.k=[0.2] search.lam=[0.8,1.0,1.2]
  lightning-ties search configs/search.yaml method=learned method.granularity=layer""",
    "evaluate": """examples:
  lightning-ties evaluate configs/evaluate.yaml
  lightning-ties evaluate configs/evaluate.yaml checkpoints.ties=runs/search/merged.safetensors split=val""",
    "demo": """examples:
  lightning-ties demo                      # the full demo (well under a minute on 2 CPU cores)
  lightning-ties demo --fast               # reduced mode, seconds
  lightning-ties demo configs/demo.yaml methods=[average,ties] output_dir=runs/demo2
  lightning-ties demo configs/continual.yaml""",
}


# ---- small shared pieces ---------------------------------------------------------------------------
class Console:
    """Where the command's messages go: progress lines to stderr (unless quiet), results to stdout."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def progress(self, total: int | None, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.quiet or not sys.stderr.isatty(), leave=False, unit="cand")


def prepare_output_dir(path: str, overwrite: bool, key: str = "output_dir") -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (checked before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}={path!r} is a file; give a folder for the run's outputs")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{key}={path!r} exists and is not empty; set overwrite=true or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_resolved_config(cfg: Any, path: Path) -> Path:
    """Write the fully resolved config (re-running it reproduces the result)."""
    from .report import write_text_atomic

    return write_text_atomic(path, to_yaml(cfg))


def make_logger(kind: str, out_dir: Path) -> Any:
    """The Lightning logger the evaluation Trainer logs to: CSV (default), TensorBoard, or none."""
    if kind == "none":
        return None
    from pytorch_lightning import loggers

    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
        return loggers.TensorBoardLogger(str(out_dir), name="logs")
    return loggers.CSVLogger(str(out_dir), name="logs")


def build_model(cfg: SearchConfig | EvaluateConfig) -> Any:
    """The architecture named by ``model.target`` (weights are replaced by base / the merge)."""
    from torch import nn

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


def check_paths(cfg: Any) -> None:
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


# ---- scoring through MultiTaskMergeModule --------------------------------------------------------
class TaskScorer:
    """Score models per task through :class:`~lightning_ties.lightning.MultiTaskMergeModule` and a Trainer.

    Args:
        module: the multitask module (base, tasks, per-task heads).
        trainer: runs Lightning's validation loop (loggers, progress).
        tasks: the task name -> fine-tuned model mapping the module was built from (to score
            other weights with the same per-task heads).
    """

    def __init__(self, module: Any, trainer: Any, tasks: Mapping[str, Any]) -> None:
        self.module = module
        self.trainer = trainer
        self.tasks = dict(tasks)

    @staticmethod
    def _first(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        return {t: float(next(iter(v.values()))) for t, v in scores.items()}

    def metric_name(self) -> str:
        return next(iter(self.module.task_metrics.collection(self.module.tasks[0]).keys()), "score")

    def base(self, loaders: Mapping[str, Any]) -> dict[str, float]:
        """The pretrained weights with each task's head (lam = 0)."""
        return self._first(self.module.evaluate(self.trainer, dict(loaders), lam=0.0))  # lam=0: base, any method

    def finetuned(self, loaders: Mapping[str, Any]) -> dict[str, float]:
        """Each fine-tuned model on its own task (on ``loaders``, not the module's cached reference)."""
        cached = self.module.reference
        self.module.reference = {}
        try:
            return self._first(self.module.measure_finetuned(self.trainer, dict(loaders)))
        finally:
            self.module.reference = cached

    def merged(self, loaders: Mapping[str, Any], method: str, k: float | None, lam: float | None) -> dict[str, float]:
        """``method`` at fixed (k, lam)."""
        self.use_method(method)
        return self._first(self.module.evaluate(self.trainer, dict(loaders), k=k, lam=lam))

    def use_method(self, method: str) -> None:
        """Switch the module to another registry method, with that method's default parameters."""
        if method != self.module.method:
            self.module.method = method
            self.module.method_params = {}

    def weights(self, loaders: Mapping[str, Any], weights: Any) -> dict[str, float]:
        """Given merged weights (path, state dict or source), each task with its own head.

        The weights become the base of a second module over the same tasks, scored at lam = 0,
        so they run through the same validation loop and head swapping as every merge.
        """
        import copy

        from .lightning import MultiTaskMergeModule

        # its own copy of the architecture: the main module tracks which head its model holds
        module = MultiTaskMergeModule(
            weights,
            self.tasks,
            model=copy.deepcopy(self.module.model),
            heads=_exact(self.module.head_keys) or None,
            method="task_arithmetic",
        )
        return self._first(module.evaluate(self.trainer, dict(loaders), lam=0.0))

    def search(
        self, loaders: Mapping[str, Any], method: str, grid: Any, on_candidate: Callable[[Any], None] | None = None
    ) -> Any:
        """Search (k, lam) on ``loaders``; the chosen merge is left applied."""
        m = get_method(method)
        self.use_method(method)
        result = self.module.search(
            self.trainer,
            dict(loaders),
            method=method,
            k=grid.k if "k" in m.parameters() else None,
            lam=grid.lam if m.searchable else None,
            strategy=grid.strategy,
            objective=grid.objective,
            normalize=grid.objective.startswith("normalized"),
            resume=False,
            on_candidate=on_candidate,
        )
        return result


def make_trainer(logger: Any = None) -> Any:
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger if logger is not None else False,
        enable_progress_bar=False,  # one bar over candidates instead of one per validation pass
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def search_curve(method: str, result: Any, objective: str) -> Any:
    from .report import SearchCurve

    return SearchCurve(
        method=method,
        points=[{"k": c.k, "lam": c.lam, "objective": c.objective} for c in result.candidates],
        chosen_k=result.k,
        chosen_lam=result.lam,
        objective=objective,
    )


def count_candidates(methods: Sequence[str], grid: Any) -> int | None:
    """Search candidates the grid strategy evaluates (None for adaptive strategies: unknown up front)."""
    from .lightning import k_grid, lam_grid

    if grid.strategy != "grid":
        return None
    total = 0
    for method in methods:
        if method == LEARNED or not get_method(method).searchable:
            continue
        ks = k_grid(grid.k) if "k" in get_method(method).parameters() else [None]
        total += len(ks) * len(lam_grid(method, grid.lam))
    return total


def _exact(keys: Sequence[str]) -> list[str]:
    return [f"^{re.escape(k)}$" for k in keys]


def _method_args(section: Mapping[str, Any]) -> tuple[str, float | None, dict[str, Any]]:
    params = dict(section)
    name = params.pop("name")
    lam = params.pop("lam", None)
    return name, lam, params


# ---- the workflows ----------------------------------------------------------------------------------
def run_merge(cfg: MergeConfig, console: Console) -> int:
    """Merge checkpoint files into ``cfg.output`` with the I/O layer's streaming ``merge_to``."""
    import torch

    from .io import merge_to

    check_paths(cfg)
    name, lam, params = _method_args(cfg.method)
    t0 = time.perf_counter()
    report = merge_to(
        cfg.output,
        cfg.base,
        list(cfg.models),
        name,
        lam,
        include=cfg.include,
        exclude=cfg.exclude,
        common_rows=cfg.common_rows,
        on_mismatch=cfg.on_mismatch,  # type: ignore[arg-type]
        output_format=cfg.output_format,  # type: ignore[arg-type]
        max_shard_size=cfg.max_shard_size,
        prefix=cfg.prefix,
        trust_pickle=cfg.trust_pickle,
        progress=None if not console.quiet else False,
        overwrite=cfg.overwrite,
        compute_dtype=getattr(torch, cfg.compute_dtype),
        **params,
    )
    out = Path(cfg.output)
    config_path = out / RESOLVED_CONFIG if out.is_dir() else out.with_name(out.name + ".config.yaml")
    save_resolved_config(cfg, config_path)
    print(
        f"merged {len(cfg.models)} model(s) with {name} (lam={report.lam}) into {out} "
        f"in {time.perf_counter() - t0:.1f}s: "
        f"{len(report.merged_keys)} keys merged, {len(report.skipped)} taken from base; config: {config_path}"
    )
    return 0


def _module_for(cfg: SearchConfig | EvaluateConfig, model: Any, method: Mapping[str, Any] | None = None) -> Any:
    from .lightning import MultiTaskMergeModule

    name, lam, params = _method_args(method or {"name": "ties"})
    k = params.pop("k", 0.2)
    module = MultiTaskMergeModule(
        cfg.base,
        dict(cfg.tasks),
        model=model,
        heads=cfg.heads,
        method=name,
        k=k,
        lam=lam,
        method_params=params,
        include=cfg.include,
        exclude=cfg.exclude,
    )
    return module


def run_search(cfg: SearchConfig, console: Console, config_path: str) -> int:
    """Search lam (and k) on the validation split, score on test, save the best model and the reports."""
    from .demo.run import learned_row, quiet_lightning
    from .report import ResultRow, RunReport, log_report, write_report

    check_paths(cfg)
    model = build_model(cfg)
    val = build_loaders(cfg, cfg.data.val_split)
    test = build_loaders(cfg, cfg.data.test_split) if cfg.data.test_split else None
    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite)  # only once the inputs are known to be good
    save_resolved_config(cfg, out / RESOLVED_CONFIG)
    name, _, _ = _method_args(cfg.method)
    with quiet_lightning():
        import pytorch_lightning as pl

        pl.seed_everything(cfg.seed, verbose=False)
        learned = name == LEARNED
        module = _module_for(cfg, model, None if learned else cfg.method)
        scorer = TaskScorer(module, make_trainer(logger), cfg.tasks)
        split = cfg.data.test_split or cfg.data.val_split
        report = RunReport(f"lightning-ties search: {name}", list(cfg.tasks), metric=scorer.metric_name(), split=split)
        report.config = {"file": config_path, **to_dict(cfg)}
        eval_loaders = test or val
        report.add_row(ResultRow("base (pretrained)", "base", "reference", scorer.base(eval_loaders)))
        report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", scorer.finetuned(eval_loaders)))
        t0 = time.perf_counter()
        if learned:
            result = _learn(cfg, model, val)
            scores = scorer.weights(eval_loaders, result.state_dict)
            report.add_row(learned_row(result, scores))
            report.extra["learned"] = result.to_dict()
            merged_state = result.state_dict
        else:
            bar = console.progress(count_candidates([name], cfg.search), f"searching {name}")
            with bar:
                result = scorer.search(val, name, cfg.search, on_candidate=lambda _c: bar.update())
            console.say(f"{name}: {len(result.candidates)} candidates, chose k={result.k}, lam={result.lam}")
            scores = scorer.merged(eval_loaders, name, result.k, result.lam)
            report.add_row(ResultRow(f"{name} (searched)", name, "searched on val", scores, result.k, result.lam))
            report.searches.append(search_curve(name, result, cfg.search.objective))
            merged_state = None
        report.extra["search_s"] = time.perf_counter() - t0
    report.fill_normalized()
    saved = _save_best(cfg, out, module, name, result, merged_state) if cfg.save_model else None
    if saved is not None:
        report.extra["model"] = str(saved)
    paths = write_report(report, out)
    log_report(report, logger)
    _show(report, paths, console, saved)
    return 0


def _learn(cfg: SearchConfig, model: Any, val: Mapping[str, Any]) -> Any:
    from .lightning.learned import learn_coefficients

    options = {k: v for k, v in cfg.method.items() if k != "name"}
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


def _save_best(cfg: SearchConfig, out: Path, module: Any, method: str, result: Any, merged_state: Any) -> Path:
    """The chosen merge as a file: streamed from the checkpoints by ``merge_to`` (heads come from base)."""
    from .io import merge_to, save_safetensors

    path = out / str(cfg.save_model)
    if merged_state is not None:  # learned coefficients: the weights exist only in memory
        return save_safetensors(merged_state, path)
    _, _, params = _method_args(cfg.method)
    params.pop("k", None)
    if result.k is not None:
        params["k"] = result.k
    exclude = [*_exact(module.head_keys), *(cfg.exclude or [])]
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
        overwrite=True,
        **params,
    )
    return path


def run_evaluate(cfg: EvaluateConfig, console: Console, config_path: str) -> int:
    """Per-task scores of the base, each fine-tuned model and every checkpoint in ``checkpoints``."""
    from .demo.run import quiet_lightning
    from .report import ResultRow, RunReport, log_report, write_report

    check_paths(cfg)
    model = build_model(cfg)
    loaders = build_loaders(cfg, cfg.split)
    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite)  # only once the inputs are known to be good
    save_resolved_config(cfg, out / RESOLVED_CONFIG)
    with quiet_lightning():
        import pytorch_lightning as pl

        pl.seed_everything(cfg.seed, verbose=False)
        scorer = TaskScorer(_module_for(cfg, model), make_trainer(logger), cfg.tasks)
        report = RunReport("lightning-ties evaluate", list(cfg.tasks), metric=scorer.metric_name(), split=cfg.split)
        report.config = {"file": config_path, **to_dict(cfg)}
        report.add_row(ResultRow("base (pretrained)", "base", "reference", scorer.base(loaders)))
        report.add_row(ResultRow("fine-tuned (own task)", "finetuned", "reference", scorer.finetuned(loaders)))
        for name, path in cfg.checkpoints.items():
            console.say(f"evaluating {name}: {path}")
            report.add_row(ResultRow(name, "checkpoint", path, scorer.weights(loaders, path)))
    report.fill_normalized()
    paths = write_report(report, out)
    log_report(report, logger)
    _show(report, paths, console)
    return 0


def run_demo_command(cfg: DemoConfig, console: Console, config_path: str | None) -> int:
    """The offline digits demo: train, merge every way, print the table, write the reports."""
    from .demo.run import run_continual, run_demo
    from .report import log_report, write_report

    logger = make_logger(cfg.logger, Path(cfg.output_dir))
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite)
    save_resolved_config(cfg, out / RESOLVED_CONFIG)
    if cfg.continual:
        report = run_continual(cfg, out, logger=logger, say=console.say)
    else:
        total = count_candidates(cfg.methods, cfg.search)
        bar = console.progress(total, "searching lam/k")
        with bar:
            report = run_demo(cfg, out, logger=logger, say=console.say, tick=bar.update)
    report.config = {"file": config_path or "(embedded default)", **to_dict(cfg)}
    paths = write_report(report, out)
    log_report(report, logger)
    _show(report, paths, console)
    return 0


def _show(report: Any, paths: Sequence[Path], console: Console, model: Path | None = None) -> None:
    from .report import print_table, summary_lines

    print_table(report)
    for line in summary_lines(report, paths):
        print(line)
    if model is not None:
        print(f"best merged model: {model}")
    if "timings" in report.extra:
        print(f"total time: {report.extra['timings']['total_s']:.1f}s")


# ---- argument parsing ------------------------------------------------------------------------------
def _common(debug_default: bool = False) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="print only the results")
    common.add_argument(
        "--allow-env", action="store_true", default=argparse.SUPPRESS,
        help="let the config read environment variables with ${oc.env:NAME} (off by default; the saved "
        "config keeps the ${oc.env:...} form, not the value)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands merge, search, evaluate, demo)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="TIES-Merging for PyTorch Lightning: merge fine-tuned models, search lam/k, evaluate, demo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
        epilog="merge methods (method=<name>, parameters as method.<param>=<value>):\n"
        + describe_methods()
        + f"\n  {LEARNED:<16} learned per-task/per-layer coefficients (search and demo)\n\n"
        + "\n\n".join(EXAMPLES.values()),
    )
    sub = parser.add_subparsers(dest="command", metavar="{merge,search,evaluate,demo}")
    helps = {
        "merge": "merge checkpoints (files or folders) into one output with any method",
        "search": "search lam (and k) on validation data, write the best model and the report",
        "evaluate": "per-task metrics of the base, the fine-tuned models and given checkpoints",
        "demo": "the offline digits demo: fine-tune, merge every way, print the table",
    }
    for name, text in helps.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            parents=[common],
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "demo":
            p.add_argument(
                "args",
                nargs="*",
                metavar="[CONFIG] key=value",
                help="optional config file (default: the embedded demo config), then overrides",
            )
            p.add_argument(
                "--fast", action="store_true", help="reduced mode (seconds): fewer samples, epochs, candidates"
            )
        else:
            p.add_argument("config", metavar="CONFIG", help=f"YAML config (see configs/{name}.yaml)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. method.k=0.3")
    return parser


def _split_demo_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one config file, then key=value overrides")
    return config, overrides


_FLAGS = ("--debug", "--quiet", "-q", "--fast", "--allow-env")
_COMMANDS = ("merge", "search", "evaluate", "demo")


def _flags_first(argv: list[str]) -> list[str]:
    """Move flags given among the ``key=value`` overrides to just after the subcommand.

    argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``demo tasks=[a,b] --quiet seed=1`` would otherwise reject ``seed=1``.
    """
    at = next((i for i, a in enumerate(argv) if a in _COMMANDS), None)
    if at is None:
        return argv
    head, rest = argv[: at + 1], argv[at + 1 :]
    flags = [a for a in rest if a in _FLAGS]
    return head + flags + [a for a in rest if a not in _FLAGS]


def dispatch(ns: argparse.Namespace) -> int:
    console = Console(quiet=getattr(ns, "quiet", False))
    allow_env = getattr(ns, "allow_env", False)
    if ns.command == "demo":
        config, overrides = _split_demo_args(ns.args)
        cfg = load_config(DemoConfig, config, overrides, allow_env=allow_env)
        if ns.fast or cfg.fast:  # the reduced mode's settings, under the command line's own overrides
            cfg = load_config(DemoConfig, config, overrides, presets=[("fast mode", DEMO_FAST)], allow_env=allow_env)
        return run_demo_command(cfg, console, config)
    schema = {"merge": MergeConfig, "search": SearchConfig, "evaluate": EvaluateConfig}[ns.command]
    cfg = load_config(schema, ns.config, ns.overrides, allow_env=allow_env)
    if ns.command == "merge":
        return run_merge(cfg, console)
    if ns.command == "search":
        return run_search(cfg, console, ns.config)
    return run_evaluate(cfg, console, ns.config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-ties`` console script; returns the exit code.

    Exit codes: 0 success, 2 bad config or arguments, 1 other errors (one line; ``--debug``
    shows the traceback).

    Example:
        >>> main(["merge", "no/such/config.yaml"])
        2
    """
    parser = build_parser()
    argv = _flags_first(list(sys.argv[1:] if argv is None else argv))
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    debug = getattr(ns, "debug", False)
    try:
        return dispatch(ns)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as err:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, FileNotFoundError, OSError, ImportError, re.error) as err:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def one_line(err: BaseException, max_items: int = 3) -> str:
    r"""An error message as one line that says what is wrong.

    Multi-line messages (``2 key(s) cannot be merged:`` followed by one line per key and a hint)
    are joined, so the line names the keys and what to do; long lists keep their first
    ``max_items`` entries and the closing hint.

    Example:
        >>> one_line(ValueError("2 key(s) cannot be merged:\n  a: missing\n  b: missing\nExclude them."))
        '2 key(s) cannot be merged: a: missing; b: missing. Exclude them.'
    """
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    raw = [line for line in text.strip().splitlines() if line.strip()]
    if not raw:
        return type(err).__name__
    head = raw[0].strip()
    # a list introduced by "...:" (indented lines), then (usually) a closing hint that is not indented
    items = [line.strip() for line in raw[1:] if line[:1] in (" ", "\t")]
    hint = [line.strip() for line in raw[1:] if line[:1] not in (" ", "\t")]
    if not items and not hint:
        return head
    if len(items) > max_items:
        items = [*items[:max_items], f"and {len(items) - max_items} more"]
    body = "; ".join(items)
    out = f"{head} {body}" if head.endswith(":") else f"{head}; {body}" if body else head
    if hint:
        out = f"{out.rstrip('.')}. {' '.join(hint)}"
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
