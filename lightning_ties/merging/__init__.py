"""Pure-torch TIES-Merging engine: task vectors, trim, elect sign, disjoint merge, baselines.

Nothing here imports Lightning or reads files; see :mod:`lightning_ties.io` for file sources.
"""

from typing import Any

from . import engine
from .engine import (
    MergeReport,
    MergeResult,
    MergedTaskVector,
    MergeSpec,
    TaskVectorMerger,
    apply_task_vector,
    merged_task_vector,
)
# DEFAULT_K_GRID is importable from here but left out of __all__: ``lightning_ties`` re-exports
# __all__, and its top-level DEFAULT_K_GRID is the Lightning search's name for the same grid.
from .grids import DEFAULT_K_GRID, GRID_WORDS, check_k_grid, check_lam_grid  # noqa: F401
from .methods import (
    METHODS,
    SUBSPACE_LAM_GRID,
    TA_LAM_GRID,
    TIES_LAM_GRID,
    MergeMethod,
    average_merge,
    describe_methods,
    get_method,
    merge,
    method_task_vector,
    register_method,
    task_arithmetic,
    ties_merge,
)
from .plan import MergePlan, plan_merge
from .regmean import GramCollector, collect_grams, regmean, regmean_state_dict
from .select import MagnitudeSelector, MagnitudeThreshold, keep_count, top_magnitude_threshold
from .sources import StateDictSource, TensorSource, TensorSpec, as_source, register_path_opener
from .steps import (
    MAX_LAM,
    check_lam,
    disjoint_components,
    disjoint_merge,
    elect_sign,
    sign_score,
    task_vector,
    trim,
    trim_mask,
)
from .subspace import iso_c, iso_cts, tsv_m

__all__ = [
    "regmean_state_dict",
    "GramCollector",
    "SUBSPACE_LAM_GRID",
    "collect_grams",
    "iso_c",
    "iso_cts",
    "regmean",
    "tsv_m",
    "MAX_LAM",
    "METHODS",
    "TA_LAM_GRID",
    "TIES_LAM_GRID",
    "MagnitudeSelector",
    "MagnitudeThreshold",
    "MergeMethod",
    "MergePlan",
    "MergeReport",
    "MergeResult",
    "MergeSpec",
    "MergedTaskVector",
    "StateDictSource",
    "TaskVectorMerger",
    "TensorSource",
    "TensorSpec",
    "apply_task_vector",
    "as_source",
    "average_merge",
    "check_k_grid",
    "check_lam",
    "check_lam_grid",
    "describe_methods",
    "disjoint_components",
    "disjoint_merge",
    "elect_sign",
    "get_method",
    "keep_count",
    "merge",
    "merged_task_vector",
    "method_task_vector",
    "plan_merge",
    "register_method",
    "register_path_opener",
    "sign_score",
    "task_arithmetic",
    "task_vector",
    "ties_merge",
    "top_magnitude_threshold",
    "trim",
    "trim_mask",
]


#: Old public names -> new ones; looking an old name up warns (``lightning_ties`` forwards these too).
DEPRECATED_NAMES: dict[str, str] = dict(engine._DEPRECATED)


def __getattr__(name: str) -> Any:
    """Deprecated names (``TaskVector`` -> ``MergedTaskVector``), with a DeprecationWarning."""
    if name in DEPRECATED_NAMES:
        return engine._renamed(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
