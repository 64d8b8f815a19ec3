"""Pure-torch TIES-Merging engine: task vectors, trim, elect sign, disjoint merge, baselines.

Nothing here imports Lightning or reads files; see :mod:`lightning_ties.io` for file sources.
"""

from .collectives import SINGLE_PROCESS, Collectives
from .engine import TaskVectorMerger, merged_task_vector
# DEFAULT_K_GRID is importable from here but left out of __all__: ``lightning_ties`` re-exports
# __all__, and its top-level DEFAULT_K_GRID is the Lightning search's name for the same grid.
from .grids import DEFAULT_K_GRID, GRID_WORDS, check_k_grid, check_lam_grid  # noqa: F401
from .methods import average_merge, describe_methods, merge, method_task_vector, task_arithmetic, ties_merge
from .options import MergeOptions
from .plan import MergePlan, plan_merge
from .registry import (
    AUTO_METHOD,
    METHODS,
    SUBSPACE_LAM_GRID,
    TA_LAM_GRID,
    TIES_LAM_GRID,
    MergeMethod,
    get_method,
    register_method,
    resolve_method,
)
from .regmean import GramCollector, collect_grams, regmean, regmean_state_dict
from .results import MergedTaskVector, MergeReport, MergeResult, apply_task_vector
from .select import MagnitudeSelector, MagnitudeThreshold, keep_count, top_magnitude_threshold
from .spec import MergeSpec
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
from .closed_form import ace, wudi
from .subspace import iso_c, iso_cts, tsv_m

__all__ = [
    "AUTO_METHOD",
    "SINGLE_PROCESS",
    "ace",
    "resolve_method",
    "wudi",
    "Collectives",
    "MergeOptions",
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

