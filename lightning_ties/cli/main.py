"""The command line: the parser, dispatch to one workflow module, and one-line errors.

Exit codes: 0 success, 2 bad config or arguments, 1 other errors (one line; ``--debug`` shows
the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from ..config import LEARNED, ConfigError, EvaluateConfig, MergeConfig, SearchConfig, load_config, load_demo_config
from ..merging import describe_methods
from .common import Console

PROG = "lightning-ties"

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



# ---- argument parsing ------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
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
    """Load the subcommand's config (checked before any work) and run its workflow; returns the exit code."""
    console = Console(quiet=getattr(ns, "quiet", False))
    allow_env = getattr(ns, "allow_env", False)
    # search, evaluate and demo import Lightning (seconds): loaded only when one of them runs,
    # so ``merge`` and ``--help`` start without it
    if ns.command == "demo":
        from . import demo

        config, overrides = _split_demo_args(ns.args)
        cfg = load_demo_config(config, overrides, fast=ns.fast, allow_env=allow_env)
        return demo.run_demo_command(cfg, console, config)
    if ns.command == "merge":
        cfg = load_config(MergeConfig, ns.config, ns.overrides, allow_env=allow_env)
        from .merge import run_merge  # io (safetensors, huggingface_hub): once the config is checked

        return run_merge(cfg, console)
    if ns.command == "search":
        cfg = load_config(SearchConfig, ns.config, ns.overrides, allow_env=allow_env)
        from . import search

        return search.run_search_command(cfg, console, ns.config)
    cfg = load_config(EvaluateConfig, ns.config, ns.overrides, allow_env=allow_env)
    from . import evaluate

    return evaluate.run_evaluate(cfg, console, ns.config)


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
    except _failures() as err:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(err)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _failures() -> tuple[type[BaseException], ...]:
    """The errors reported as one line (evaluated only when one is raised: io loads then, not for --help)."""
    from ..io.locks import OutputBusyError

    return (ValueError, TypeError, KeyError, OSError, ImportError, re.error, OverflowError, OutputBusyError)


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


__all__ = ["PROG", "build_parser", "dispatch", "main", "one_line"]
