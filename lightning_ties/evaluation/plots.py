"""Plots shared by the layers above: the one drawing of learned merging coefficients.

matplotlib is an optional dependency (the ``demo`` and ``test`` extras): it is imported when a
plot is drawn, never at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..io.atomic import atomic_file


def plot_coefficients(
    table: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str], overwrite: bool = True
) -> Path:
    """Draw the coefficients ``{task: {group: lam}}`` as a heat map, groups down and tasks across, atomically.

    The package's one coefficient plot (the learned-coefficients result and the run report's ``coefficients.png``):
    PNG/SVG/PDF by the path's suffix; a group a task lacks is left blank (NaN).

    Example:
        >>> import tempfile
        >>> plot_coefficients({"a": {"l.0.": 1.0, "l.1.": 0.5}}, tempfile.mkdtemp() + "/lam.png").suffix
        '.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    if not tasks:
        raise ValueError("plot_coefficients: the table is empty; pass {task: {group: lam}}")
    groups = list(dict.fromkeys(g for row in table.values() for g in row))
    labels = [g.rstrip(".") for g in groups]
    # groups as rows: there may be hundreds (granularity "tensor") with long names
    values = [[float(table[t].get(g, float("nan"))) for t in tasks] for g in groups]
    width = 3.0 + 0.8 * len(tasks) + 0.07 * max(len(label) for label in labels)
    fig, ax = plt.subplots(figsize=(width, 1.5 + 0.22 * len(groups)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(groups)), labels, fontsize=7)
    fig.colorbar(image, ax=ax, label="lam")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


__all__ = ["plot_coefficients"]
