"""The Lightning layer for ``lightning.pytorch``: thin shells over the merge core.

Only what must subclass the package's ``Callback`` / ``LightningModule`` lives here; the work is
in the Lightning-free :mod:`lightning_ties.core`, so result and error types (``SearchResult``,
``TaskMetrics``, ``KeyMatchError``, ...) are one class under both Lightning packages. The layer
for the unified ``lightning`` package is the source (``lightning_ties/pytorch/``); the one for
``pytorch_lightning`` (``lightning_ties/pytorch_lightning/``) is generated from it by
``tools/mirror.py`` (``make mirror``).

- :class:`TiesMerging`: a Trainer callback that merges this run with other tasks at fit end.
- :class:`ContinualTiesMerging`: the same over a task store that grows by one task per run.
- :class:`MultiTaskMergeModule`: merge checkpoints, evaluate and search k/lam without training.
- :class:`SearchResult`: every candidate's per-task scores, the chosen one, ``.table``, ``.to_csv/.to_json``.
- :class:`LearnedMergeModule`, :func:`learn_coefficients`: per-task (per-layer) merging coefficients
  trained by ``Trainer.fit`` on validation data (AdaMerging-style, on top of TIES components).
- :class:`TaskMetrics`, :class:`ArgmaxAccuracy`, :func:`summarize`: per-task metrics and their summaries.

Example:
    >>> import lightning as L
    >>> from lightning_ties.pytorch import TiesMerging
    >>> isinstance(TiesMerging(tasks={"a": "a.ckpt"}, task="b"), L.Callback)
    True
"""

from ..core.keys import KeyMatchError
from ..core.metrics import ArgmaxAccuracy, TaskMetrics, normalized, summarize
from ..core.options import SearchOptions
from ..core.search import DEFAULT_K_GRID, Candidate, SearchResult, k_grid, lam_grid, run_search
from .callback import TiesMerging
from .continual import ContinualTiesMerging
from .learned import LearnedMergeModule, LearnedMergeResult, learn_coefficients, plot_coefficients
from .module import MultiTaskMergeModule

__all__: list[str] = [
    "ArgmaxAccuracy",
    "Candidate",
    "ContinualTiesMerging",
    "DEFAULT_K_GRID",
    "KeyMatchError",
    "LearnedMergeModule",
    "LearnedMergeResult",
    "MultiTaskMergeModule",
    "SearchOptions",
    "SearchResult",
    "TaskMetrics",
    "TiesMerging",
    "k_grid",
    "lam_grid",
    "learn_coefficients",
    "normalized",
    "plot_coefficients",
    "run_search",
    "summarize",
]
