"""The engine's recipe: how task vectors become tau_m (:class:`MergeSpec`), every knob but lam.

The registry (:mod:`.registry`) builds one per method from the method's parameters; the
engine (:mod:`.engine`) reads nothing else. Users rarely build one by hand: they pass a
method name and its parameters, checked once as a :class:`~lightning_ties.merging.options.MergeOptions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .steps import MERGE_FNS, PAPER_K, SIGN_METHODS, check_density

Scope = Literal["global", "per_tensor"]
SCOPES: tuple[str, ...] = ("global", "per_tensor")
Sparsify = Literal["magnitude", "dare"] | None


@dataclass(frozen=True)
class MergeSpec:
    """How task vectors are combined into tau_m (everything except lam).

    Attributes:
        sparsify: ``"magnitude"`` (TIES trim: keep the top-``k`` magnitudes), ``"dare"``
            (drop each entry with probability ``p``, rescale survivors by 1/(1-p)), or None.
        k: fraction kept by the magnitude trim, in (0, 1].
        p: DARE drop probability, in [0, 1).
        scope: ``"global"`` (one trim threshold per task over all merged entries, as the
            paper's code) or ``"per_tensor"`` (one per tensor, as PEFT and mergekit).
        sign: sign election method (``"mass"``, ``"count"``, ``"normfrac"``, ``"normmass"``) or
            None for no election.
        merge: ``"mean"`` (disjoint mean), ``"sum"``, ``"max"`` or ``"task_mean"``.
        seed: DARE's random seed (masks depend on seed, the task's position in the list and the key,
            not on chunking or devices).
        tensor_fn: a per-tensor method (TSV-M, Iso-C: :mod:`~lightning_ties.merging.subspace`)
            that replaces trim, elect and merge: ``tensor_fn(deltas)`` gets the N task vectors
            of one tensor, ``[N, *shape]``, and returns its tau_m (``shape``). The engine streams
            it key by key, like the TIES steps.
        components_fn: its per-task shares, ``[N, *shape]`` summing to tau_m (None: the method
            does not decompose into per-task components).

    Example:
        >>> MergeSpec(k=0.5).trims, MergeSpec(k=1.0).trims
        (True, False)
    """

    sparsify: Sparsify = "magnitude"
    k: float = PAPER_K
    p: float = 0.0
    scope: Scope = "global"
    sign: str | None = "mass"
    merge: str = "mean"
    seed: int = 0
    tensor_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    components_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.tensor_fn is not None and (self.sparsify is not None or self.sign is not None):
            raise ValueError("a per-tensor method (tensor_fn) replaces trim, elect and merge: set sparsify=None, sign=None")
        if self.sparsify not in (None, "magnitude", "dare"):
            raise ValueError(f"unknown sparsify {self.sparsify!r}; choose 'magnitude', 'dare' or None")
        if self.sparsify == "magnitude":
            check_density(self.k)
        if self.sparsify == "dare" and not (isinstance(self.p, (int, float)) and 0.0 <= self.p < 1.0):
            raise ValueError(f"p (DARE drop probability) must be in [0, 1), got {self.p!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose 'global' or 'per_tensor'")
        if self.sign is not None and self.sign not in SIGN_METHODS:
            raise ValueError(f"unknown sign method {self.sign!r}; choose one of {', '.join(SIGN_METHODS)} or None")
        if self.merge not in MERGE_FNS:
            raise ValueError(f"unknown merge {self.merge!r}; choose one of {', '.join(MERGE_FNS)}")

    @property
    def trims(self) -> bool:
        """Whether the magnitude trim drops anything (k < 1)."""
        return self.sparsify == "magnitude" and self.k < 1.0
