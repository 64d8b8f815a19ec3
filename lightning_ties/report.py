"""Reports people can look at: ``report.json`` (everything), ``report.md``, CSV and PNG plots.

A :class:`RunReport` holds one table (a row per model or merge method, a column per task, the
mean and the normalized score) and the lam/k search curves behind the searched rows. It
round-trips through JSON (``RunReport.from_json(report.to_json()) == report``) and
:func:`write_report` writes every file atomically into the run's output folder:

- ``report.json``: the table, every search candidate, the resolved config, timings;
- ``report.md``: the table as Markdown; ``results.csv``: one line per row and task;
- ``search.png``: mean validation score vs lam for each k, the chosen point marked;
- ``per_task.png``: per-task bars for each row;
- ``coefficients.png``: the learned method's coefficients (task x parameter group), when it ran.

Example:
    >>> row = ResultRow("ties", "ties", "paper recipe", {"a": 0.9, "b": 0.7}, k=0.2, lam=1.0)
    >>> report = RunReport("demo", tasks=["a", "b"], rows=[row])
    >>> RunReport.from_json(report.to_json()) == report
    True
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import LEARNED

# io and the plots (matplotlib, torchmetrics) load on first use: the command's --help and its
# config errors import neither (see lightning_ties.cli)


@dataclass
class ResultRow:
    """One line of the table: a model (base, fine-tuned, a merge) and its per-task scores.

    Attributes:
        name: label shown in the table (e.g. ``"ties (searched)"``).
        method: registry method name, or ``"base"`` / ``"finetuned"`` / ``"learned"``.
        recipe: how its parameters were chosen (``"paper recipe"``, ``"searched on val"``, ``"reference"``).
        scores: task -> score (the report's metric, on the report's split).
        k, lam: the merge's parameters, when it has them.
        normalized: mean over tasks of score / the task's fine-tuned score (None without reference).
    """

    name: str
    method: str
    recipe: str
    scores: dict[str, float]
    k: float | None = None
    lam: float | None = None
    normalized: float | None = None

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else float("nan")


@dataclass
class SearchCurve:
    """The candidates of one method's search: ``points`` are ``{"k", "lam", "objective"}``."""

    method: str
    points: list[dict[str, float | None]]
    chosen_k: float | None
    chosen_lam: float | None
    objective: str = "mean"

    @classmethod
    def from_search(cls, method: str, result: Any, objective: str) -> SearchCurve:
        """The curve of a :class:`~lightning_ties.lightning.SearchResult` (its candidates and chosen k, lam).

        Example:
            >>> from types import SimpleNamespace as NS
            >>> result = NS(candidates=[NS(k=0.2, lam=1.0, objective=0.5)], k=0.2, lam=1.0)
            >>> SearchCurve.from_search("ties", result, "mean").points
            [{'k': 0.2, 'lam': 1.0, 'objective': 0.5}]
        """
        return cls(
            method=method,
            points=[{"k": c.k, "lam": c.lam, "objective": c.objective} for c in result.candidates],
            chosen_k=result.k,
            chosen_lam=result.lam,
            objective=objective,
        )


@dataclass
class RunReport:
    """Everything a ``search`` / ``evaluate`` / ``demo`` run found, ready to print and save."""

    title: str
    tasks: list[str]
    rows: list[ResultRow] = field(default_factory=list)
    searches: list[SearchCurve] = field(default_factory=list)
    metric: str = "accuracy"
    split: str = "test"
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_row(self, row: ResultRow) -> ResultRow:
        """Append ``row`` after checking it scores only the report's tasks (continual rows score a prefix)."""
        unknown = sorted(set(row.scores) - set(self.tasks))
        if unknown or not row.scores:
            raise ValueError(f"row {row.name!r} scores tasks {sorted(row.scores)}, the report's tasks are {self.tasks}")
        self.rows.append(row)
        return row

    def reference(self) -> dict[str, float] | None:
        """The fine-tuned models' scores (the row with method ``"finetuned"``), if present."""
        return next((r.scores for r in self.rows if r.method == "finetuned"), None)

    def fill_normalized(self) -> None:
        """Set each row's normalized score from the fine-tuned reference row (merged / fine-tuned, per task)."""
        ref = self.reference()
        if ref is None:
            return
        for row in self.rows:
            ratios = [row.scores[t] / ref[t] for t in row.scores if ref.get(t, 0) > 0]
            row.normalized = sum(ratios) / len(ratios) if ratios else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["mean"] = row.mean  # derived, written for readers of the JSON; ignored on load
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        data = dict(data)
        data["rows"] = [ResultRow(**{k: v for k, v in r.items() if k != "mean"}) for r in data.get("rows", [])]
        data["searches"] = [SearchCurve(**s) for s in data.get("searches", [])]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunReport:
        """Read a report written by :meth:`to_json` (or a ``report.json`` file's text)."""
        from .io.jsonsafe import loads as load_json

        return cls.from_dict(load_json(text, "report.json"))

    # ---- text renderings -----------------------------------------------------------------------
    def table_cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the table as formatted strings (scores in percent)."""
        header = ["model", "k", "lam", *self.tasks, "mean", "normalized"]
        rows = []
        for r in self.rows:
            rows.append(
                [
                    r.name,
                    _num(r.k, 2),
                    _num(r.lam, 2),
                    *(_pct(r.scores.get(t)) for t in self.tasks),
                    _pct(r.mean),
                    _pct(r.normalized),
                ]
            )
        return header, rows

    def markdown(self) -> str:
        header, rows = self.table_cells()
        lines = [
            f"# {self.title}",
            "",
            f"{self.metric} (%) on the {self.split} split; normalized = score / the task's fine-tuned score, "
            "averaged over tasks.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        for curve in self.searches:
            lines.append("")
            k = "" if curve.chosen_k is None else f"k={curve.chosen_k}, "
            lines.append(
                f"- {curve.method}: chose {k}lam={curve.chosen_lam} on validation "
                f"({len(curve.points)} candidates, objective {curve.objective})"
            )
        return "\n".join(lines) + "\n"

    def plain_table(self) -> str:
        header, rows = self.table_cells()
        widths = [max(len(c) for c in col) for col in zip(header, *rows)]

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["model", "method", "recipe", "k", "lam", "task", self.metric])
        for r in self.rows:
            for t in [*(t for t in self.tasks if t in r.scores), "mean"]:
                score = r.mean if t == "mean" else r.scores[t]
                writer.writerow([r.name, r.method, r.recipe, _blank(r.k), _blank(r.lam), t, f"{score:.6f}"])
            if r.normalized is not None:
                writer.writerow(
                    [r.name, r.method, r.recipe, _blank(r.k), _blank(r.lam), "normalized", f"{r.normalized:.6f}"]
                )
        return buf.getvalue()


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _blank(v: float | None) -> str:
    return "" if v is None else repr(v)


def _json_safe(value: Any) -> Any:
    """NaN/inf become None so the file is strict JSON that any reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def learned_row(result: Any, scores: dict[str, float]) -> ResultRow:
    """The table row of a learned merge (a ``LearnedMergeResult``); its k is the trim density its components used."""
    params = result.report.params
    on = params.get("base_method")
    label = f"learned on {on} ({params.get('granularity')})" if on not in (None, "ties") else f"learned ({params.get('granularity')})"
    return ResultRow(label, LEARNED, "trained on val", scores, k=params.get("k"))


# ---- files ----------------------------------------------------------------------------------------
#: The files :func:`write_report` may write into a run's folder (checked before a run starts).
REPORT_FILES = ("report.json", "report.md", "results.csv", "search.png", "per_task.png", "coefficients.png")


def write_text_atomic(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    """Write ``text`` to ``path`` via a temporary sibling, fsync and rename.

    An existing ``path`` is replaced only when lightning-ties wrote it and nobody changed it
    since (see :mod:`lightning_ties.io.ownership`), and only with ``overwrite``.
    """
    from .io.atomic import atomic_open

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, overwrite) as f:
        f.write(text.encode())
    return path


def write_report(
    report: RunReport, out_dir: str | os.PathLike[str], plots: bool = True, overwrite: bool = True
) -> list[Path]:
    """Write report.json, report.md, results.csv and the PNG plots into ``out_dir``; return the paths.

    ``overwrite=False`` refuses any of them that exists (checked again just before each rename: a run that
    wrote it meanwhile is never replaced); ``True`` replaces only files lightning-ties wrote, unchanged since.

    Example:
        >>> import tempfile
        >>> r = RunReport("t", ["a"], [ResultRow("base", "base", "reference", {"a": 0.5})])
        >>> sorted(p.name for p in write_report(r, tempfile.mkdtemp(), plots=False))
        ['report.json', 'report.md', 'results.csv']
    """
    out = Path(out_dir)
    paths = [
        write_text_atomic(out / "report.json", report.to_json(), overwrite),
        write_text_atomic(out / "report.md", report.markdown(), overwrite),
        write_text_atomic(out / "results.csv", report.csv(), overwrite),
    ]
    if plots:
        if report.searches:
            paths.append(plot_search(report, out / "search.png", overwrite))
        if report.rows:
            paths.append(plot_per_task(report, out / "per_task.png", overwrite))
        if learned_coefficients(report):
            from .evaluation.plots import plot_coefficients

            paths.append(plot_coefficients(learned_coefficients(report), out / "coefficients.png", overwrite))
    return paths


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path, overwrite: bool = True) -> Path:
    from .io.atomic import atomic_file

    with atomic_file(path, overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_search(report: RunReport, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Mean validation score vs lam, one line per k, one panel per searched method; chosen point starred."""
    plt = _pyplot()
    curves = report.searches
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], curves):
        ks = sorted({p["k"] for p in curve.points}, key=lambda k: -1.0 if k is None else k)
        for k in ks:
            pts = sorted((p["lam"], p["objective"]) for p in curve.points if p["k"] == k)
            label = "no k" if k is None else f"k={k}"
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", markersize=3, label=label)
        chosen = next((p for p in curve.points if p["k"] == curve.chosen_k and p["lam"] == curve.chosen_lam), None)
        if chosen is not None:
            ax.plot(
                [chosen["lam"]],
                [100 * chosen["objective"]],
                marker="*",
                markersize=14,
                color="crimson",
                linestyle="none",
                label="chosen",
            )
        ax.set_title(curve.method)
        ax.set_xlabel("lam")
        ax.set_ylabel(f"validation {curve.objective} {report.metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _save_figure(fig, Path(path), overwrite)
    finally:
        plt.close(fig)


def plot_per_task(report: RunReport, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Grouped bars: one group per task (and the mean), one bar per row of the table."""
    plt = _pyplot()
    groups = [*report.tasks, "mean"]
    n = len(report.rows)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 0.25 * n) + 2.0, 3.8))
    for i, row in enumerate(report.rows):
        values = [100 * row.scores.get(t, float("nan")) for t in report.tasks] + [100 * row.mean]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=row.name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{report.split} {report.metric} (%)")
    lows = [min(r.scores.values()) for r in report.rows if r.scores]
    ax.set_ylim(max(0.0, 100 * min(lows) - 10) if lows else 0.0, 100.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars stay visible
    ax.set_title(report.title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        return _save_figure(fig, Path(path), overwrite)
    finally:
        plt.close(fig)


def learned_coefficients(report: RunReport) -> dict[str, dict[str, float]]:
    """The learned method's coefficients ``{task: {group: lam}}`` recorded in ``extra``, or empty."""
    learned = report.extra.get("learned") or {}
    table = learned.get("coefficients") if isinstance(learned, Mapping) else None
    return dict(table) if isinstance(table, Mapping) else {}


# ---- terminal and loggers -------------------------------------------------------------------------
def print_table(report: RunReport, file: Any = None) -> None:
    """Print the table with rich when it is installed, else as aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(report.title, file=file)
        print(report.plain_table(), file=file)
        return
    header, rows = report.table_cells()
    table = Table(title=f"{report.title}: {report.metric} (%) on {report.split}")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    best_merge = _best_merged_row(report)
    for row, cells in zip(report.rows, rows):
        style = "bold" if row is best_merge else ("dim" if row.method in ("base", "finetuned") else None)
        table.add_row(*cells, style=style)
    needed = sum(max([len(h), *(len(r[i]) for r in rows)]) + 3 for i, h in enumerate(header)) + 1
    Console(file=file, width=max(needed, 80)).print(table)


def _best_merged_row(report: RunReport) -> ResultRow | None:
    merged = [r for r in report.rows if r.method not in ("base", "finetuned")]
    return max(merged, key=lambda r: r.mean) if merged else None


def log_report(report: RunReport, logger: Any) -> None:
    """Send the table to a Lightning logger: ``table/<row>/<task>``, ``table/<row>/mean`` (and normalized)."""
    if logger is None:
        return
    metrics: dict[str, float] = {}
    for row in report.rows:
        name = row.name.replace(" ", "_").replace("(", "").replace(")", "")
        for task, v in row.scores.items():
            metrics[f"table/{name}/{task}"] = v
        metrics[f"table/{name}/mean"] = row.mean
        if row.normalized is not None:
            metrics[f"table/{name}/normalized"] = row.normalized
    logger.log_metrics(metrics, step=0)
    logger.save()


def summary_lines(report: RunReport, paths: Sequence[Path]) -> list[str]:
    """The lines printed under the table: where the files are."""
    if not paths:
        return []
    folder = paths[0].parent
    return [f"reports written to {folder}/: " + ", ".join(p.name for p in paths)]


__all__ = [
    "ResultRow",
    "RunReport",
    "SearchCurve",
    "learned_row",
    "log_report",
    "plot_coefficients",
    "plot_per_task",
    "plot_search",
    "print_table",
    "summary_lines",
    "REPORT_FILES",
    "write_report",
    "write_text_atomic",
]


def __getattr__(name: str) -> Any:
    if name == "plot_coefficients":  # re-exported; loads the plots (matplotlib) only when asked for
        from .evaluation.plots import plot_coefficients

        return plot_coefficients
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
