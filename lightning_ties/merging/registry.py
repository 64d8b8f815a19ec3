"""One registry of merge methods: name -> parameters -> function.

Every method is TIES's pipeline with some steps switched (sparsify, elect, merge), so one
:class:`~lightning_ties.merging.spec.MergeSpec` describes each of them. The CLI, the configs,
the searches and :class:`~lightning_ties.merging.options.MergeOptions` read this registry;
adding a method here needs no change anywhere else. The functions that merge with a method
(:func:`~lightning_ties.merging.methods.merge`, ``ties_merge``...) live in :mod:`.methods`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from . import closed_form, subspace
from .spec import SCOPES, MergeSpec
from .steps import MERGE_FNS, PAPER_K, PAPER_LAM, SIGN_METHODS, check_lam


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

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` checked against the method's declared parameters: names, then values.

        A name the method does not declare, or a value outside what it accepts (see
        :data:`PARAMETER_CHECKS`), is a ValueError naming the key and the allowed names or
        values. Returns the checked values (numbers as float/int).

        Example:
            >>> get_method("ties").check_params({"k": 0.5, "sign": "count"})
            {'k': 0.5, 'sign': 'count'}
            >>> get_method("ties").check_params({"sign": "bogus"})
            Traceback (most recent call last):
            ...
            ValueError: method 'ties': unknown sign 'bogus'; choose one of 'mass', 'count', 'normfrac', 'normmass'
        """
        declared = self.parameters()
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {unknown}; "
                f"its parameters are {sorted(declared)} and lam"
            )
        checked = {}
        for name, value in params.items():
            check = PARAMETER_CHECKS.get(name)
            checked[name] = check(self.name, name, value) if check is not None else value
        return checked

    def build_spec(self, **params: Any) -> MergeSpec:
        """The engine's :class:`MergeSpec` for ``params`` (checked by :meth:`check_params`)."""
        return self.spec(**self.check_params(params))


def _one_of(choices: tuple[str, ...]) -> Callable[[str, str, Any], Any]:
    def check(method: str, name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(
                f"method {method!r}: unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}"
            )
        return value

    return check


def _fraction(interval: str, meaning: str) -> Callable[[str, str, Any], Any]:
    """A number in ``interval`` (``"(0, 1]"``, ``"[0, 1)"`` or ``"[0, 1]"``; NaN never is)."""
    low_open, high_open = interval[0] == "(", interval[-1] == ")"

    def check(method: str, name: str, value: Any) -> Any:
        ok = isinstance(value, Real) and not isinstance(value, bool)
        v = float(value) if ok else float("nan")
        if not ((0.0 < v if low_open else 0.0 <= v) and (v < 1.0 if high_open else v <= 1.0)):
            raise ValueError(f"method {method!r}: {name} must be in {interval} ({meaning}), got {value!r}")
        return v

    return check


def _integer(minimum: int, meaning: str) -> Callable[[str, str, Any], Any]:
    def check(method: str, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            raise ValueError(f"method {method!r}: {name} must be an integer >= {minimum} ({meaning}), got {value!r}")
        return int(value)

    return check


#: How each parameter name of the built-in methods is checked, whatever method declares it:
#: ``check(method, name, value)`` returns the value or raises a ValueError naming both.
#: Parameters of methods registered elsewhere that are not listed are checked by their spec.
PARAMETER_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "k": _fraction("(0, 1]", "the fraction of each task vector kept"),
    "scope": _one_of(SCOPES),
    "sign": _one_of(SIGN_METHODS),
    "merge": _one_of(MERGE_FNS),
    "p": _fraction("[0, 1)", "DARE's drop probability"),
    "seed": _integer(0, "the random seed"),
    "common_fraction": _fraction("[0, 1]", "Iso-CTS's share of the common subspace"),
    "alpha": _fraction("[0, 1]", "RegMean's off-diagonal scale"),
    "examples": _integer(1, "examples per task"),
}


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; a ValueError listing the registered names otherwise.

    Example:
        >>> get_method("ties").name
        'ties'
    """
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

    For entry points without validation data (``merge``, ``ties_merge``-level APIs, ``merge_to``);
    a search with data chooses among candidates instead.

    Example:
        >>> resolve_method("auto"), resolve_method("ties")
        ('tsv', 'ties')
    """
    if name == "auto":
        return AUTO_METHOD
    return get_method(name).name




__all__ = [
    "AUTO_METHOD",
    "METHODS",
    "PARAMETER_CHECKS",
    "REGMEAN_NEEDS_DATA",
    "SUBSPACE_LAM_GRID",
    "TA_LAM_GRID",
    "TIES_LAM_GRID",
    "MergeMethod",
    "get_method",
    "register_method",
    "resolve_method",
]
