"""One registry of merge methods: name -> parameters -> function.

Every method is TIES's pipeline with some steps switched (sparsify, elect, merge), so one
:class:`~lightning_ties.merging.engine.MergeSpec` describes each of them. The CLI, the configs
and the searches read this registry; adding a method here needs no change anywhere else.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import closed_form, subspace
from .engine import DeviceLike, MergedTaskVector, MergeResult, MergeSpec, merged_task_vector
from .plan import Patterns
from .steps import PAPER_K, PAPER_LAM, check_lam


def _grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    n = int(round((hi - lo) / step))
    return tuple(round(lo + i * step, 10) for i in range(n + 1))


#: lam grids of the paper's code: TIES 0.8..2.5, task arithmetic 0.1..1.0 (step 0.1).
TIES_LAM_GRID = _grid(0.8, 2.5, 0.1)
TA_LAM_GRID = _grid(0.1, 1.0, 0.1)
#: Scale (alpha) grid of TSV-M, Iso-C and Iso-CTS: their code searches 0.1..3.0 (step 0.1).
SUBSPACE_LAM_GRID = _grid(0.1, 3.0, 0.1)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry key (``method=`` in configs and the CLI).
        description: one line for ``--help`` and docs.
        spec: builds the :class:`MergeSpec` from the method's parameters.
        lam: the default lam (the paper's no-validation recipe where it has one).
        lam_grid: the ``lam="paper"`` search grid.
        searchable: whether the method has a lam to set or search (averaging has none).
        decomposes: whether tau_m splits into per-task shares (``TaskVectorMerger.components``),
            which learned coefficients and continual merging scale: TIES, task arithmetic,
            TSV-M and WUDI do; Iso-C, Iso-CTS and ACE mix the tasks' directions and do not.
        needs_data: whether the merge needs each task's data (RegMean's Gram matrices): the
            plain engine (:func:`merge`, :func:`method_task_vector`) refuses it, and the Lightning
            layer (``MultiTaskMergeModule`` with dataloaders) computes it instead.

    Callers ask the method instead of repeating numbers: :attr:`has_k` / :attr:`default_k`,
    :attr:`has_lam` / :attr:`default_lam` / :attr:`paper_lam_grid`; grids of k and lam are
    checked by :func:`~lightning_ties.merging.grids.check_k_grid` and
    :func:`~lightning_ties.merging.grids.check_lam_grid`.

    Example:
        >>> ties = get_method("ties")
        >>> ties.has_k, ties.default_k, ties.default_lam, ties.paper_lam_grid[:3]
        (True, 0.2, 1.0, (0.8, 0.9, 1.0))
        >>> get_method("average").has_lam, get_method("task_arithmetic").has_k
        (False, False)
    """

    name: str
    description: str
    spec: Callable[..., MergeSpec]
    lam: float
    lam_grid: tuple[float, ...]
    searchable: bool = True
    decomposes: bool = True
    needs_data: bool = False

    def parameters(self) -> dict[str, Any]:
        """The method's parameters (beyond lam) with their defaults."""
        return {
            p.name: p.default for p in inspect.signature(self.spec).parameters.values() if p.default is not p.empty
        }

    @property
    def has_k(self) -> bool:
        """Whether the method trims with a density ``k`` (and so whether a k search makes sense)."""
        return "k" in self.parameters()

    @property
    def default_k(self) -> float | None:
        """The method's default k (the paper's 0.2 for TIES), None for a method without k."""
        k = self.parameters().get("k")
        return float(k) if k is not None else None

    @property
    def has_lam(self) -> bool:
        """Whether lam may be set or searched (``searchable``; averaging has no lam)."""
        return self.searchable

    @property
    def default_lam(self) -> float:
        """The lam used when none is given (the paper's no-validation recipe where it has one)."""
        return self.lam

    @property
    def paper_lam_grid(self) -> tuple[float, ...]:
        """The grid ``lam="paper"`` (or ``"search"``) searches: the paper code's grid for this method."""
        return self.lam_grid

    def resolve_lam(self, lam: float | None) -> float:
        """The lam to use: the method's default when None; methods without a lam refuse another.

        Any other value must pass :func:`~lightning_ties.merging.steps.check_lam`.
        """
        if lam is None:
            return self.lam
        lam = check_lam(lam)
        if not self.has_lam and lam != self.lam:
            raise ValueError(f"method {self.name!r} has no lam to set (got lam={lam})")
        return lam

    def build_spec(self, **params: Any) -> MergeSpec:
        unknown = set(params) - set(self.parameters())
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {sorted(unknown)}; "
                f"its parameters are {sorted(self.parameters())} and lam"
            )
        return self.spec(**params)


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def _ties(k: float = PAPER_K, scope: str = "global", sign: str = "mass", merge: str = "mean") -> MergeSpec:
    return MergeSpec("magnitude", k=k, scope=scope, sign=sign, merge=merge)  # type: ignore[arg-type]


def _average() -> MergeSpec:
    return MergeSpec(None, sign=None, merge="task_mean")


def _task_arithmetic() -> MergeSpec:
    return MergeSpec(None, sign=None, merge="sum")


def _ties_no_trim(sign: str = "mass", merge: str = "mean") -> MergeSpec:
    return MergeSpec(None, sign=sign, merge=merge)


def _ties_no_elect(k: float = PAPER_K, scope: str = "global", merge: str = "mean") -> MergeSpec:
    return MergeSpec("magnitude", k=k, scope=scope, sign=None, merge=merge)  # type: ignore[arg-type]


def _ties_plain_mean(k: float = PAPER_K, scope: str = "global", sign: str = "mass") -> MergeSpec:
    return MergeSpec("magnitude", k=k, scope=scope, sign=sign, merge="task_mean")  # type: ignore[arg-type]


def _magnitude_prune(k: float = PAPER_K, scope: str = "per_tensor") -> MergeSpec:
    return MergeSpec("magnitude", k=k, scope=scope, sign=None, merge="sum")  # type: ignore[arg-type]


def _dare(p: float = 0.9, seed: int = 0) -> MergeSpec:
    return MergeSpec("dare", p=p, sign=None, merge="sum", seed=seed)


def _dare_ties(p: float = 0.8, seed: int = 0, sign: str = "mass", merge: str = "mean") -> MergeSpec:
    return MergeSpec("dare", p=p, sign=sign, merge=merge, seed=seed)


def _tsv() -> MergeSpec:
    return MergeSpec(None, sign=None, merge="sum", tensor_fn=subspace.tsv_m, components_fn=subspace.tsv_m_components)


def _iso_c() -> MergeSpec:
    return MergeSpec(None, sign=None, merge="sum", tensor_fn=subspace.iso_c)


def _iso_cts(common_fraction: float = 0.8) -> MergeSpec:
    subspace.iso_cts_ranks((1, 1), 1, common_fraction)  # refuses a fraction outside [0, 1] now, not mid-merge
    return MergeSpec(
        None, sign=None, merge="sum", tensor_fn=functools.partial(subspace.iso_cts, common_fraction=common_fraction)
    )


def _wudi(ridge: float = closed_form.WUDI_RIDGE) -> MergeSpec:
    closed_form.check_ridge(ridge)  # refuses a bad ridge now, not mid-merge
    return MergeSpec(
        None,
        sign=None,
        merge="sum",
        tensor_fn=functools.partial(closed_form.wudi, ridge=ridge),
        components_fn=functools.partial(closed_form.wudi_components, ridge=ridge),
    )


def _ace(
    eps: float = closed_form.ACE_EPS,
    rank_fraction: float = closed_form.ACE_RANK_FRACTION,
    heterogeneity_threshold: float = closed_form.ACE_HETEROGENEITY,
) -> MergeSpec:
    closed_form.check_ace_parameters(eps, rank_fraction, heterogeneity_threshold)  # now, not mid-merge
    fn = functools.partial(
        closed_form.ace, eps=eps, rank_fraction=rank_fraction, heterogeneity_threshold=heterogeneity_threshold
    )
    return MergeSpec(None, sign=None, merge="sum", tensor_fn=fn)


#: Why the engine alone cannot run RegMean, and where it runs instead.
REGMEAN_NEEDS_DATA = (
    "method 'regmean' needs each task's validation data (Gram matrices of every linear layer's inputs): "
    "use MultiTaskMergeModule.search/evaluate with dataloaders, TiesMerging with val_dataloaders, "
    "or lightning_ties.merging.regmean_state_dict"
)


def _regmean(alpha: float = 0.9, examples: int = 256) -> MergeSpec:
    # The registry declares RegMean's parameters (alpha: off-diagonal scale, examples: per task)
    # so configs and searches see them; the merge itself runs where the data is (lightning/regmean.py).
    raise ValueError(REGMEAN_NEEDS_DATA)


for _m in (
    MergeMethod("ties", "TIES-Merging: trim to top-k, elect sign, disjoint mean", _ties, PAPER_LAM, TIES_LAM_GRID),
    MergeMethod("task_arithmetic", "sum of task vectors scaled by lam", _task_arithmetic, 0.4, TA_LAM_GRID),
    MergeMethod("average", "plain mean of the fine-tuned weights", _average, 1.0, (1.0,), searchable=False),
    MergeMethod("ties_no_trim", "TIES ablation: keep every entry (k=1)", _ties_no_trim, PAPER_LAM, TIES_LAM_GRID),
    MergeMethod("ties_no_elect", "TIES ablation: mean of all non-zero trimmed values", _ties_no_elect, PAPER_LAM, TIES_LAM_GRID),
    MergeMethod(
        "ties_plain_mean", "TIES ablation: sign-agreeing values summed / N tasks", _ties_plain_mean, PAPER_LAM, TIES_LAM_GRID
    ),
    MergeMethod("magnitude_prune", "task arithmetic of top-k trimmed task vectors", _magnitude_prune, 0.4, TA_LAM_GRID),
    MergeMethod("dare", "DARE: random drop p, rescale by 1/(1-p), then sum", _dare, 0.4, TA_LAM_GRID),
    MergeMethod("dare_ties", "DARE drop and rescale, then TIES elect and disjoint mean", _dare_ties, PAPER_LAM, TIES_LAM_GRID),
    # scale defaults: TSV-M's data-free alpha = 1.0; Iso-C / Iso-CTS 1.3 (their code searches 0.1..3.0)
    MergeMethod("tsv", "TSV-M: per-task top singular vectors, orthogonalised", _tsv, 1.0, SUBSPACE_LAM_GRID),
    MergeMethod(
        "iso_c", "Iso-C: summed task matrices with a flat spectrum", _iso_c, 1.3, SUBSPACE_LAM_GRID, decomposes=False
    ),
    MergeMethod(
        "iso_cts",
        "Iso-CTS: common + task-specific subspaces, flat spectrum",
        _iso_cts,
        1.3,
        SUBSPACE_LAM_GRID,
        decomposes=False,
    ),
    # WUDI and ACE apply their closed form as it is (lam = 1, as the papers); lam may still be searched.
    # Measured (benchmarks/bench_methods.py): neither beats TSV-M without data (digits 89.1 / 90.5,
    # MiniLM 84.8 / 84.2 vs TSV-M's 90.6 / 86.3)
    MergeMethod("wudi", "WUDI: least interference along each task's own update, closed form", _wudi, 1.0, SUBSPACE_LAM_GRID),
    MergeMethod(
        "ace",
        "ACE: covariances estimated from the updates, shared prior, spectral refinement",
        _ace,
        1.0,
        SUBSPACE_LAM_GRID,
        decomposes=False,
    ),
    # RegMean's closed form has no scale: lam=1.0 applies its merged weights as they are (its
    # "paper" grid is that one value); a lam list given to a multi-method search scales its delta too.
    MergeMethod(
        "regmean",
        "RegMean: per-layer closed form from each task's input Gram matrices (needs data)",
        _regmean,
        1.0,
        (1.0,),
        decomposes=False,
        needs_data=True,
    ),
):
    register_method(_m)


#: What ``method="auto"`` means without validation data: the data-free method with the best
#: score on record, each method at its paper default (no data), mean test accuracy (%), from
#: ``python benchmarks/bench_methods.py`` (digits, 5 tasks) and ``HF_HUB_OFFLINE=1 python
#: benchmarks/bench_methods.py --suite minilm --cache-dir bench_cache/learned`` (MiniLM-L6, 4 text
#: tasks), 2026-12-05: TSV-M 90.6 / 86.3, ACE 90.5 / 84.2, WUDI 89.1 / 84.8, task arithmetic
#: 89.4 / 83.9, TIES 89.2 / 83.8, average 88.4 / 83.6, Iso-C 88.9 / 83.4 (Iso-C and Iso-CTS win
#: on MiniLM only with their scale chosen on validation data: that is the search's job).
AUTO_METHOD = "tsv"


def resolve_method(name: str) -> str:
    """The registry method ``name`` stands for: ``"auto"`` is :data:`AUTO_METHOD`, others themselves.

    For entry points without validation data (``merge``, ``ties_merge``-level APIs); a search
    with data chooses among candidates instead.

    Example:
        >>> resolve_method("auto"), resolve_method("ties")
        ('tsv', 'ties')
    """
    if name == "auto":
        return AUTO_METHOD
    return get_method(name).name


def method_task_vector(
    base: Any,
    models: Sequence[Any],
    method: str = "ties",
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    device: DeviceLike = None,
    **params: Any,
) -> MergedTaskVector:
    """tau_m of a registered method (without lam), to apply for many lam.

    ``device``: where to merge and where tau_m lives (None: the base's device; CPU for files).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> tau = method_task_vector(base, [{"w": torch.ones(2)}], "task_arithmetic")
        >>> tau.apply(base, lam=0.5)["w"]
        tensor([0.5000, 0.5000])
    """
    m = get_method(method)
    spec = m.build_spec(**params)  # a method that needs data (RegMean) refuses here, before any read
    merge_params = {**m.parameters(), **params}
    return merged_task_vector(
        base, models, spec, include, exclude, compute_dtype, method=method, params=merge_params, device=device
    )


def merge(
    base: Any,
    models: Sequence[Any],
    method: str = "ties",
    lam: float | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    device: DeviceLike = None,
    **params: Any,
) -> MergeResult:
    """Merge with any registered method: theta = base + lam * tau_m(method, params).

    Computes in ``compute_dtype`` whatever the stored dtypes (bf16/fp16 inputs merge in
    float32); the result has base's keys and dtypes, on base's device, or on ``device``
    when given (the merge then runs there: ``device="cuda"`` merges files on the GPU).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> merge(base, [{"w": torch.ones(2)}, {"w": -torch.ones(2)}], "average")["w"]
        tensor([0., 0.])
    """
    lam = get_method(method).resolve_lam(lam)
    tau = method_task_vector(base, models, method, include, exclude, compute_dtype, device, **params)
    return tau.apply(base, lam, device=device)


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
    return _merge_with(
        base, models, "ties", lam, include, exclude, compute_dtype, device, k=k, scope=scope, sign=sign, merge=merge
    )


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
    if not models:
        raise ValueError("no models to merge: pass at least one fine-tuned model")
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
    "AUTO_METHOD",
    "METHODS",
    "MergeMethod",
    "REGMEAN_NEEDS_DATA",
    "SUBSPACE_LAM_GRID",
    "TA_LAM_GRID",
    "TIES_LAM_GRID",
    "average_merge",
    "describe_methods",
    "get_method",
    "merge",
    "method_task_vector",
    "register_method",
    "resolve_method",
    "task_arithmetic",
    "ties_merge",
]
