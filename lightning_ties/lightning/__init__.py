"""Lightning integration: the only subpackage that imports lightning.

- :class:`TiesMerging`: a Trainer callback that merges this run with other tasks at fit end.
- :class:`ContinualTiesMerging`: the same over a task store that grows by one task per run.
- :class:`MultiTaskMergeModule`: merge checkpoints, evaluate and search k/lam without training.
- :class:`SearchResult`: every candidate's per-task scores, the chosen one, ``.table``, ``.to_csv/.to_json``.
- :class:`LearnedMergeModule`, :func:`learn_coefficients`: per-task (per-layer) merging coefficients
  trained by ``Trainer.fit`` on validation data (AdaMerging-style, on top of TIES components).
- :class:`TaskMetrics`, :class:`ArgmaxAccuracy`, :func:`summarize`: per-task metrics and their summaries.
"""

from .callback import TiesMerging
from .continual import ContinualTiesMerging
from .learned import LearnedMergeModule, LearnedMergeResult, learn_coefficients, plot_coefficients
from .metrics import ArgmaxAccuracy, TaskMetrics, normalized, summarize
from .module import MultiTaskMergeModule
from .search import DEFAULT_K_GRID, Candidate, SearchResult, k_grid, lam_grid, run_search

__all__: list[str] = [
    "ArgmaxAccuracy",
    "Candidate",
    "ContinualTiesMerging",
    "DEFAULT_K_GRID",
    "LearnedMergeModule",
    "LearnedMergeResult",
    "MultiTaskMergeModule",
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
