"""Merging with a registered method: the public entry points (``merge``, ``ties_merge``...).

Each entry point takes the keywords users write, checks them once as a
:class:`~lightning_ties.merging.options.MergeOptions` and passes that object inward; the
registry itself (names, parameters, grids) is :mod:`.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import merged_task_vector, model_list
from .options import MergeOptions
from .plan import Patterns
from .reading import DeviceLike
from .registry import (  # noqa: F401  (re-exported: the registry's names, importable from here as before)
    AUTO_METHOD,
    METHODS,
    REGMEAN_NEEDS_DATA,
    SUBSPACE_LAM_GRID,
    TA_LAM_GRID,
    TIES_LAM_GRID,
    MergeMethod,
    get_method,
    register_method,
    resolve_method,
)
from .results import MergedTaskVector, MergeResult
from .steps import PAPER_K, PAPER_LAM


def method_task_vector(
    base: Any,
    models: Sequence[Any],
    method: str | MergeOptions = "ties",
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    device: DeviceLike = None,
    **params: Any,
) -> MergedTaskVector:
    """tau_m of a registered method (without lam), to apply for many lam.

    ``method``: a registered name (its parameters as keywords) or checked :class:`MergeOptions`.
    ``device``: where to merge and where tau_m lives (None: the base's device; CPU for files).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> tau = method_task_vector(base, [{"w": torch.ones(2)}], "task_arithmetic")
        >>> tau.apply(base, lam=0.5)["w"]
        tensor([0.5000, 0.5000])
    """
    options = _options(method, None, include, exclude, params)
    options.spec  # a method that needs data (RegMean) refuses here, before any read  # noqa: B018
    return merged_task_vector(base, models, options, compute_dtype=compute_dtype, device=device)


def _options(
    method: str | MergeOptions, lam: float | None, include: Patterns, exclude: Patterns, params: dict[str, Any]
) -> MergeOptions:
    """``method`` and the keywords as checked options; options given whole must come alone."""
    if not isinstance(method, MergeOptions):
        return MergeOptions.from_keywords(method, lam, include, exclude, **params)
    if lam is not None or include is not None or exclude is not None or params:
        raise ValueError("pass lam, include, exclude and the method's parameters inside MergeOptions, not beside it")
    return method


def merge(
    base: Any,
    models: Sequence[Any],
    method: str | MergeOptions = "ties",
    lam: float | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    device: DeviceLike = None,
    **params: Any,
) -> MergeResult:
    """Merge with any registered method: theta = base + lam * tau_m(method, params).

    ``method``: a registered name with ``lam`` and its parameters as keywords, or checked
    :class:`MergeOptions`. Computes in ``compute_dtype`` whatever the stored dtypes (bf16/fp16 inputs merge in
    float32); the result has base's keys and dtypes, on base's device, or on ``device``
    when given (the merge then runs there: ``device="cuda"`` merges files on the GPU).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> merge(base, [{"w": torch.ones(2)}, {"w": -torch.ones(2)}], "average")["w"]
        tensor([0., 0.])
    """
    options = _options(method, lam, include, exclude, params)
    tau = method_task_vector(base, models, options, compute_dtype=compute_dtype, device=device)
    return tau.apply(base, options.lam, device=device)


_merge_with = merge  # ties_merge's ``merge`` argument shadows the function's name


def ties_merge(
    base: Any,
    models: Sequence[Any],
    k: float = PAPER_K,
    lam: float = PAPER_LAM,
    scope: str = "global",
    sign: str = "mass",
    merge: str = "mean",
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    device: DeviceLike = None,
) -> MergeResult:
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge, scale by lam.

    Args:
        base: the pretrained model (module, state dict, path or source).
        models: the fine-tuned models, all from ``base``.
        k: fraction of each task vector kept by the trim (paper: 0.2).
        lam: scale of the merged task vector (paper's no-validation recipe: 1.0).
        scope: ``"global"`` (one threshold per task over the whole model, as the paper's
            code) or ``"per_tensor"`` (as PEFT and mergekit).
        sign: ``"mass"`` (paper), ``"count"``, ``"normfrac"`` or ``"normmass"``.
        merge: ``"mean"`` (disjoint mean, paper), ``"sum"``, ``"max"`` or ``"task_mean"``.
        include, exclude: regexes choosing the keys to merge; others come from base.
        compute_dtype: ``torch.float32`` (default) or ``torch.float64``, whatever the stored
            dtypes (bf16/fp16 weights are merged in float32 and written back in their dtype).
        device: where to merge (``"cuda"``, ``"cpu"``, a ``torch.device``); None: the base's
            device (CUDA tensors in, CUDA tensors out). Tensors read from files are moved there.

    Returns:
        A state dict with base's keys and dtypes, on base's device (on ``device`` when given);
        ``.report`` says what was merged and skipped.

    Example:
        >>> base = {"w": torch.zeros(5)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5])}]
        >>> ties_merge(base, fts, k=0.4)["w"].tolist()
        [0.0, -2.0, 0.0, 3.0, 0.0]
    """
    options = MergeOptions(
        "ties", k=k, lam=lam, scope=scope, params={"sign": sign, "merge": merge}, include=include, exclude=exclude
    )
    return _merge_with(base, models, options, compute_dtype=compute_dtype, device=device)


def task_arithmetic(
    base: Any,
    models: Sequence[Any],
    lam: float = 0.4,
    include: Patterns = None,
    exclude: Patterns = None,
    device: DeviceLike = None,
) -> MergeResult:
    """Task arithmetic (Ilharco et al., 2023): theta = base + lam * sum_t tau_t.

    ``device`` as in :func:`ties_merge`.

    Example:
        >>> task_arithmetic({"w": torch.zeros(1)}, [{"w": torch.ones(1)}] * 2, lam=0.5)["w"]
        tensor([1.])
    """
    return merge(base, models, "task_arithmetic", lam, include, exclude, device=device)


def average_merge(
    models: Sequence[Any], include: Patterns = None, exclude: Patterns = None, device: DeviceLike = None
) -> MergeResult:
    """Plain average of the fine-tuned weights (unmerged entries come from the first model).

    ``device`` as in :func:`ties_merge`.

    Example:
        >>> average_merge([{"w": torch.ones(2)}, {"w": torch.zeros(2)}])["w"]
        tensor([0.5000, 0.5000])
    """
    models = model_list(models)
    return merge(models[0], models, "average", None, include, exclude, device=device)


def describe_methods() -> str:
    """A table of registered methods and their parameters (for ``--help`` and docs)."""
    rows = []
    for m in METHODS.values():
        params = ", ".join(f"{k}={v!r}" for k, v in m.parameters().items())
        lam = f"lam={m.lam}" if m.has_lam else "no lam"
        rows.append(f"  {m.name:<16} {m.description} ({', '.join(filter(None, [params, lam]))})")
    return "\n".join(rows)


__all__ = [
    "average_merge",
    "describe_methods",
    "merge",
    "method_task_vector",
    "task_arithmetic",
    "ties_merge",
]
