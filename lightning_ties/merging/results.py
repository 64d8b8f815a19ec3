"""What a merge returns: tau_m (:class:`MergedTaskVector`), merged weights (:class:`MergeResult`)
and what was done (:class:`MergeReport`), and the last step theta = base + lam * tau_m.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .plan import MergePlan
from .reading import DeviceLike
from .sources import as_source
from .steps import check_lam, scale


@dataclass
class MergeReport:
    """What a merge did: recipe, keys merged and skipped (with reasons), trim thresholds."""

    method: str
    params: dict[str, Any]
    sources: list[str]
    merged_keys: list[str]
    skipped: dict[str, str]
    thresholds: list[float] | None = None
    lam: float | None = None
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_plan(
        cls,
        plan: MergePlan,
        method: str,
        params: Mapping[str, Any],
        sources: Sequence[str],
        thresholds: Sequence[float] | None = None,
        lam: float | None = None,
    ) -> MergeReport:
        """The report of a merge of ``sources`` planned by ``plan``: the one way every layer builds one.

        Merged and skipped keys and tied-weight aliases come from the plan (copied, so the
        report does not change with it).

        Example:
            >>> from lightning_ties.merging import StateDictSource, plan_merge
            >>> src = StateDictSource({"w": torch.zeros(2)})
            >>> report = MergeReport.from_plan(plan_merge(src, [src]), "ties", {"k": 0.2}, ["a"], lam=1.0)
            >>> report.merged_keys, report.lam
            (['w'], 1.0)
        """
        return cls(
            method=method,
            params=dict(params),
            sources=list(sources),
            merged_keys=list(plan.merge_keys),
            skipped=dict(plan.skipped),
            thresholds=list(thresholds) if thresholds is not None else None,
            lam=lam,
            aliases=dict(plan.aliases),
        )

    def with_lam(self, lam: float | None) -> MergeReport:
        """A copy of this report for the merge applied with ``lam``."""
        return MergeReport(**{**self.to_dict(), "lam": lam})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MergedTaskVector(dict):
    """The merged task vector tau_m (name -> float tensor), to apply for any lam.

    Not one task's tau (that is :func:`~lightning_ties.merging.steps.task_vector`): the result
    of trim, elect and disjoint merge over all tasks.

    Example:
        >>> from lightning_ties.merging import MergeSpec, merged_task_vector
        >>> base = {"w": torch.zeros(3)}
        >>> tau = merged_task_vector(base, [{"w": torch.tensor([1.0, -2.0, 0.5])}], MergeSpec(k=1.0))
        >>> tau.apply(base, lam=0.5)["w"]
        tensor([ 0.5000, -1.0000,  0.2500])
    """

    report: MergeReport

    def apply(self, base: Any, lam: float, out: nn.Module | None = None, device: DeviceLike = None) -> MergeResult:
        """theta = base + lam * tau_m (see :func:`apply_task_vector`)."""
        return apply_task_vector(base, self, lam, out=out, report=self.report, device=device)


class MergeResult(dict):
    """A merged state dict (base's keys and dtypes) with the :class:`MergeReport` in ``.report``."""

    report: MergeReport



def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors one (tied weights): same memory, same layout."""
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def apply_task_vector(
    base: Any,
    tau_m: Mapping[str, torch.Tensor],
    lam: float,
    out: nn.Module | None = None,
    report: MergeReport | None = None,
    device: DeviceLike = None,
) -> MergeResult:
    """theta = theta_base + lam * tau_m, in base's dtypes; every other entry is a copy of base's.

    ``lam`` must pass :func:`~lightning_ties.merging.steps.check_lam` (finite, |lam| <= 100).
    Results live on base's device, or on ``device`` when given (tau_m is moved to them).
    Tied weights of base (two names, one tensor) stay tied: the second name gets the very
    tensor of the first.

    With ``out`` (a module whose state dict has base's keys), the merged values are written
    into its parameters in place (across devices if need be: base on the CPU, ``out`` on a
    GPU, or the reverse), so a lam search reuses one module and allocates nothing per
    candidate; a tensor that ``out`` holds under several names is written once. The returned
    dict then holds views of ``out``'s tensors.

    Example:
        >>> apply_task_vector({"w": torch.ones(2)}, {"w": torch.tensor([1.0, -1.0])}, lam=2.0)["w"]
        tensor([ 3., -1.])
    """
    lam = check_lam(lam)
    src = as_source(base, "base")
    aliases: dict[str, str] = dict(getattr(src, "aliases", None) or {})
    target_device = torch.device(device) if device is not None else None
    result = MergeResult()
    targets = out.state_dict(keep_vars=True) if out is not None else None
    written: set[tuple[Any, ...]] = set()
    for key in src.keys():
        first = aliases.get(key)
        if targets is None and first is not None and first in result:
            result[key] = result[first]  # one tensor under both names, as in base
            continue
        raw = src.get(key)
        b = raw.to(target_device) if target_device is not None else raw  # ``raw`` itself when already there
        source_key = first if first is not None and first in tau_m else key
        merged = source_key in tau_m
        value = scale(b, tau_m[source_key], lam) if merged else b
        if targets is None:
            result[key] = value.to(b.dtype) if merged else (b.clone() if b is raw else b)
            continue
        if key not in targets:
            raise KeyError(f"module has no entry {key!r} to write the merged value into")
        target = targets[key].data
        if _identity(target) not in written:  # a tied tensor of ``out`` is written once
            with torch.no_grad():
                target.copy_(value)
            written.add(_identity(target))
        result[key] = target
    if report is not None:
        result.report = report.with_lam(lam)
    return result


__all__ = ["MergeReport", "MergeResult", "MergedTaskVector", "apply_task_vector"]
