"""The streaming merge engine: models in, merged task vector out, one tensor at a time.

Data path (see ARCHITECTURE.md): for the paper's global trim, pass 1 streams each task's
|tau| to find its exact top-k threshold (:class:`~lightning_ties.merging.select.MagnitudeSelector`);
pass 2 walks the keys, and for each key reads base and the N models, forms the task vectors
chunk by chunk, trims, elects and disjoint-merges them with the functions of
:mod:`lightning_ties.merging.steps` (its in-place kernel ``ties_chunk_`` for TIES's recipe),
and yields tau_m for that key. Extra memory is O(N x chunk) plus one output tensor, never
O(N x model). This module holds the streaming only: reading, thresholds, chunking, devices,
and the contested entries held back until the scope's majority sign is known; the maths is
all in ``steps.py``.

Devices: the engine merges on one device, by default the base's (a module or state dict on
a GPU merges there; files are read to the CPU unless ``device=`` says otherwise). Every
tensor read is moved there once per read, every buffer, histogram and mask lives there, and
tau_m comes out there; the results are bit-identical across devices. On a GPU the per-chunk
Python overhead dominates, so chunks are whole tensors up to a memory bound. On CUDA, with
Triton installed, TIES's bracketed select pass and its merge pass (when no sign is contested;
threshold ties a task still keeps are patched in on their few columns) run as fused kernels
(:mod:`.kernels`, same bits);
``LIGHTNING_TIES_KERNELS=0`` keeps every merge on the PyTorch path.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .plan import MergePlan, Patterns, plan_merge
from .select import MagnitudeSelector, MagnitudeThreshold, keep_count
from .sources import TensorSource, as_source
from .steps import (
    MERGE_FNS,
    PAPER_K,
    SIGN_METHODS,
    ThresholdTrim,
    check_density,
    check_lam,
    divide_,
    disjoint_components,
    disjoint_merge,
    scale,
    sign_score,
    ties_chunk_,
)

Scope = Literal["global", "per_tensor"]
Sparsify = Literal["magnitude", "dare"] | None
DEFAULT_CHUNK = 1 << 16
# The select passes do ~3 cheap ops per entry, where the per-chunk Python overhead shows: they
# read chunks this many times larger (measured on 8 x 20M float32: 64K for the merge, 256K here).
_SELECT_CHUNK_FACTOR = 4
# Global thresholds over at least this many entries start from a sample of this many entries
# per task: its quantiles bracket the threshold, so one exact pass usually replaces two.
_MIN_BRACKETED = 1 << 22
_SAMPLE = 1 << 17
# The bracket's histogram has up to MAX_BRACKET_BINS bins, a cost per observed tensor: larger chunks.
_BRACKET_CHUNK_FACTOR = 16
_SMALL_TENSOR = 1 << 16  # per-tensor thresholds below this size use one batched kthvalue
# Off the CPU each chunk costs a few kernel launches and host syncs whatever its size, so the
# chunk is as large as this many entries over all tasks allow ([N, chunk] scratch buffers of
# 1 GiB each in float32): whole tensors in practice.
_DEVICE_CHUNK_ENTRIES = 1 << 28

DeviceLike = str | torch.device | None


def _resolve_device(device: DeviceLike, base: TensorSource) -> torch.device:
    """``device`` as a torch.device; None: where base's tensors live (CPU for file sources)."""
    if device is not None:
        return torch.device(device)
    found = getattr(base, "device", None)
    return torch.device(found) if found is not None else torch.device("cpu")


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
        seed: DARE's random seed (masks depend on seed, task index and key, not on chunking).
        tensor_fn: a per-tensor method (TSV-M, Iso-C: :mod:`~lightning_ties.merging.subspace`)
            that replaces trim, elect and merge: ``tensor_fn(deltas)`` gets the N task vectors
            of one tensor, ``[N, *shape]``, and returns its tau_m (``shape``). The engine streams
            it key by key, like the TIES steps.
        components_fn: its per-task shares, ``[N, *shape]`` summing to tau_m (None: the method
            does not decompose into per-task components).
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
        if self.scope not in ("global", "per_tensor"):
            raise ValueError(f"unknown scope {self.scope!r}; choose 'global' or 'per_tensor'")
        if self.sign is not None and self.sign not in SIGN_METHODS:
            raise ValueError(f"unknown sign method {self.sign!r}; choose one of {', '.join(SIGN_METHODS)} or None")
        if self.merge not in MERGE_FNS:
            raise ValueError(f"unknown merge {self.merge!r}; choose one of {', '.join(MERGE_FNS)}")

    @property
    def trims(self) -> bool:
        return self.sparsify == "magnitude" and self.k < 1.0


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
            >>> from lightning_ties.merging.sources import StateDictSource
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
    of trim, elect and disjoint merge over all tasks. Formerly ``TaskVector`` (deprecated alias).

    Example:
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


class TaskVectorMerger:
    """Stream tau_m out of a base and N models, key by key.

    Iterating yields ``(key, tau_m)`` for every merged key, float tensors of base's shape in
    ``compute_dtype`` on ``device`` (None: base's device, see :func:`_resolve_device`; tensors
    read from the models are moved there). With the global scope, a tensor whose merge had an exact tie in the
    sign election (score exactly 0 with non-zero candidates) is held back until the whole
    model's majority sign is known; all others are yielded as soon as they are computed.

    Example:
        >>> merger = TaskVectorMerger({"w": torch.zeros(4)}, [{"w": torch.arange(4.0)}], MergeSpec(k=0.5))
        >>> dict(merger)["w"]
        tensor([0., 0., 2., 3.])
    """

    def __init__(
        self,
        base: Any,
        models: Sequence[Any],
        spec: MergeSpec | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        compute_dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        plan: MergePlan | None = None,
        device: DeviceLike = None,
    ) -> None:
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        if isinstance(models, (Mapping, nn.Module, str)) or not isinstance(models, Sequence) or not models:
            raise ValueError("models must be a non-empty list of fine-tuned models (modules, state dicts or paths)")
        self.spec = spec or MergeSpec()
        self.base = as_source(base, "base")
        self.models = [as_source(m, f"model[{i}]", base=self.base) for i, m in enumerate(models)]
        self.plan = plan or plan_merge(self.base, self.models, include, exclude)
        self.compute_dtype = compute_dtype
        self.device = _resolve_device(device, self.base)
        self.on_cpu = self.device.type == "cpu"
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK if self.on_cpu else max(DEFAULT_CHUNK, _DEVICE_CHUNK_ENTRIES // len(self.models))
        self.chunk_size = chunk_size
        self.thresholds: list[MagnitudeThreshold] | None = None
        self._norms: torch.Tensor | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._cuts_of: ThresholdTrim | None = None  # the trim whose cuts the fused merge holds

    def _buffer(self, name: str, columns: int) -> torch.Tensor:
        """A reusable ``[N, columns]`` scratch tensor: fresh large tensors per chunk cost page faults."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] < columns:
            buf = torch.empty(
                len(self.models), max(columns, min(self.chunk_size, 1 << 16)), dtype=self.compute_dtype, device=self.device
            )
            self._buffers[name] = buf
        return buf[:, :columns]

    # ---- reading task vectors -------------------------------------------------------------
    def _get(self, source: TensorSource, key: str) -> torch.Tensor:
        """One tensor of a source, flat, on the merge device (no copy when already there)."""
        return source.get(key).reshape(-1).to(self.device)

    def _chunks(self, key: str, chunk_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, taus)``: the N task vectors of ``key`` over one flat chunk, [N, c].

        The buffer is reused between chunks: consumers must not keep it.
        """
        cd = self.compute_dtype
        base = self._get(self.base, key)
        fts = [self._get(m, key) for m in self.models]
        n = base.numel()
        size = chunk_size or self.chunk_size
        for start in range(0, n, size):
            end = min(n, start + size)
            b = base[start:end].to(cd)
            taus = self._buffer("taus", end - start)
            for i, ft in enumerate(fts):
                if ft.dtype == cd:
                    torch.sub(ft[start:end], b, out=taus[i])
                else:  # subtract in compute precision, not in the stored (e.g. bf16) one
                    taus[i].copy_(ft[start:end]).sub_(b)
            yield start, taus

    def _task_vectors(self, key: str) -> torch.Tensor:
        """The N task vectors of ``key`` as one fresh ``[N, numel]`` tensor (for small tensors)."""
        base = self._get(self.base, key).to(self.compute_dtype)
        return torch.stack([self._get(m, key).to(self.compute_dtype) - base for m in self.models])

    def _select(self, keys: Sequence[str], m: int) -> list[MagnitudeThreshold]:
        """Exact threshold of every task over ``keys`` taken together.

        One pass over a sampled bracket when it holds the threshold (the usual case on large
        models), else the radix select passes.
        """
        brackets = self._sample_brackets(keys, m)
        scratch: dict[str, torch.Tensor] = {}
        selectors = [MagnitudeSelector(m, self.compute_dtype, bracket, scratch) for bracket in brackets]
        all_bracketed = all(s.bracket_bits is not None for s in selectors)
        if all_bracketed and self._use_kernels() and self._fused_bracket_pass(keys, selectors):
            for sel in selectors:
                sel.next_pass()  # a miss falls through to the radix passes below
        while not all(s.done for s in selectors):
            bracketed = any(s.bracketed for s in selectors)
            size = self.chunk_size
            if self.on_cpu:  # off the CPU chunks are already whole tensors
                size *= _BRACKET_CHUNK_FACTOR if bracketed else _SELECT_CHUNK_FACTOR
            for key in keys:
                for _, taus in self._chunks(key, size):
                    for sel, model, tau in zip(selectors, self.models, taus):
                        sel.observe(tau, name=f"task vector of {model.label} at {key!r}")
            for sel in selectors:
                sel.next_pass()
        return [s.result() for s in selectors]

    # ---- the fused kernels (optional, CUDA + Triton: see kernels.py) ------------------------
    def _use_kernels(self) -> bool:
        """Whether this merge runs the fused Triton kernels (same bits as the eager path)."""
        if self.on_cpu:
            return False
        from . import kernels  # imported here: Triton is only loaded for merges off the CPU

        return kernels.available(self.device, self.compute_dtype)

    def _kernel_inputs(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Base's and the models' flat tensors of ``key`` on the device, in a dtype the kernels read."""
        from . import kernels

        tensors = [self._get(self.base, key)] + [self._get(m, key) for m in self.models]
        # other dtypes (float64 inputs) are rounded to float32 first, as the eager path's ``.to``
        tensors = [t if kernels.readable(t) else t.to(self.compute_dtype).contiguous() for t in tensors]
        return tensors[0], tensors[1:]

    def _fused_bracket_pass(self, keys: Sequence[str], selectors: list[MagnitudeSelector]) -> bool:
        """The bracketed select pass in one fused kernel per key; False (nothing counted) if it failed.

        Raises the selector's ``ValueError`` (first task, then first key) for a NaN or an Inf.
        """
        from . import kernels

        bits = [s.bracket_bits for s in selectors]
        n_tasks = len(self.models)
        lo = torch.tensor([b[0] for b in bits], dtype=torch.int32, device=self.device)
        hi = torch.tensor([b[1] for b in bits], dtype=torch.int32, device=self.device)
        hist = torch.zeros(n_tasks, max(h - l + 1 for l, h in bits), dtype=torch.int64, device=self.device)
        above = torch.zeros(n_tasks, dtype=torch.int64, device=self.device)
        flags = torch.zeros(n_tasks, len(keys), dtype=torch.int32, device=self.device)
        observed = 0
        try:
            for j, key in enumerate(keys):
                base, fts = self._kernel_inputs(key)
                kernels.bracket_counts(base, fts, lo, hi, hist, above, flags, j)
                observed += base.numel()
            bad = flags.nonzero().tolist()  # the pass's one host sync
        except Exception as err:  # a compile or launch failure: count on the eager path
            kernels.disable(f"select pass: {type(err).__name__}: {err}")
            return False
        if bad:
            task, j = min(bad)
            raise ValueError(
                f"task vector of {self.models[task].label} at {keys[j]!r} holds NaN or Inf values; "
                "fix or exclude it before merging"
            )
        for sel, (l, h), inside, count in zip(selectors, bits, hist, above):
            sel.add_bracket_counts(inside[: h - l + 1], count, observed)
        return True

    def _fused_merge(
        self, key: str, trim_step: ThresholdTrim, out: torch.Tensor, sign: str, merge: str, contested: _Contested
    ) -> torch.Tensor | None:
        """tau_m of ``key`` into ``out`` by the fused kernel; the sum of its elected signs.

        The kernel keeps ``|tau| > cut`` only and flags the blocks holding a contested entry
        (zero score, non-zero candidate). The columns of those blocks and of the threshold
        ties a task's budget still keeps are recomputed eagerly (:meth:`_patch_ties`), so
        ``out``, the sign sum and the contested entries recorded into ``contested`` are the
        eager path's, and ``trim_step``'s budget is spent as the eager path spends it.

        None (``out`` to be redone on the eager path; budget and ``contested`` untouched)
        when the kernel failed.
        """
        from . import kernels

        cached = self._buffers.get("cuts")
        if cached is None or self._cuts_of is not trim_step:
            cached = torch.tensor(trim_step.cuts, dtype=torch.float32, device=self.device)
            self._buffers["cuts"], self._cuts_of = cached, trim_step
        try:
            base, fts = self._kernel_inputs(key)
            signs, blocks = kernels.ties_merge(base, fts, cached, out, sign, merge)
            flagged = torch.nonzero(blocks).squeeze(1)  # one host sync per key (the eager path: one per chunk)
            if flagged.numel() or any(trim_step.tie_budget):
                return self._patch_ties(base, fts, trim_step, out, signs, sign, merge, flagged, contested)
        except Exception as err:
            kernels.disable(f"merge: {type(err).__name__}: {err}")
            return None
        return signs

    def _patch_ties(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        trim_step: ThresholdTrim,
        out: torch.Tensor,
        signs: torch.Tensor,
        sign: str,
        merge: str,
        flagged: torch.Tensor,
        contested: _Contested,
    ) -> torch.Tensor:
        """Correct a strict fused merge of one key: threshold ties kept, contested blocks recorded.

        Per task with a tie budget, the ties it keeps here are the first ``tie_budget[i]``
        entries with ``|tau| == value`` in flat order (as :class:`ThresholdTrim` picks them).
        Those columns and the columns of the kernel's ``flagged`` blocks (a contested entry in
        its strict view) are gathered (``[N, c']`` per engine chunk), trimmed without (the
        kernel's view) and with those ties, merged by ``ties_chunk_`` (the eager bits), the
        latter written into ``out``, and the sign sum corrected by the difference. The
        contested entries of the with-ties merge go into ``contested`` at their flat offsets,
        for the majority fallback. Returns the corrected sign sum; state (budget,
        ``contested``) changes only once every column is done.
        """
        from . import kernels

        cd = self.compute_dtype
        n = base.numel()
        kept: dict[int, torch.Tensor] = {}
        spent: dict[int, int] = {}
        for i, left in enumerate(trim_step.tie_budget):
            if left <= 0:
                continue
            value = trim_step.thresholds[i].value
            at_threshold = (fts[i].to(cd) - base.to(cd)).abs_() == value
            if value == 0.0:  # a kept zero is still a zero: spend the budget, change nothing
                spent[i] = min(left, int(at_threshold.sum()))
                continue
            idx = torch.nonzero(at_threshold).squeeze(1)[:left]
            spent[i] = idx.numel()
            if idx.numel():
                kept[i] = idx
        parts = list(kept.values())
        if flagged.numel():
            block = kernels.MERGE_BLOCK
            in_blocks = (flagged[:, None] * block + torch.arange(block, device=flagged.device)).reshape(-1)
            parts.append(in_blocks[in_blocks < n])
        found = _Contested(disjoint_merge, merge)
        if parts:
            cols = torch.unique(torch.cat(parts))  # sorted
            positions = {i: torch.searchsorted(cols, idx) for i, idx in kept.items()}
            for start in range(0, cols.numel(), self.chunk_size):
                end = min(cols.numel(), start + self.chunk_size)
                part = cols[start:end]
                ties_here = {i: p[(p >= start) & (p < end)] - start for i, p in positions.items()}

                def trim_sub(with_ties: bool, ties_here: dict[int, torch.Tensor] = ties_here) -> Callable[..., torch.Tensor]:
                    def apply(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                        # ThresholdTrim's arithmetic on the gathered columns, ties given
                        mags = torch.abs(t, out=out)
                        for i, (row, cut) in enumerate(zip(mags, trim_step.cuts)):
                            torch.nn.functional.threshold_(row, cut, 0.0)
                            if with_ties and i in ties_here:
                                row[ties_here[i]] = trim_step.thresholds[i].value
                        return torch.copysign(mags, t, out=mags)

                    return apply

                b = base[part].to(cd)
                taus = torch.stack([ft[part].to(cd) - b for ft in fts])
                strict_out = torch.empty(part.numel(), dtype=cd, device=out.device)
                strict_signs, _ = ties_chunk_(taus.clone(), trim_sub(False), strict_out, torch.empty_like(taus), sign, merge)
                sub_out = torch.empty_like(strict_out)
                trimmed = torch.empty_like(taus)
                sub_signs, sub_contested = ties_chunk_(taus, trim_sub(True), sub_out, trimmed, sign, merge)
                if sub_contested is not None:  # as the eager path records them, at their flat offsets
                    found.collect_columns(0, sub_contested, trimmed, index=part)
                out[part] = sub_out
                signs = signs - strict_signs + sub_signs
        contested.index.extend(found.index)
        contested.negative.extend(found.negative)
        for i, count in spent.items():
            trim_step.tie_budget[i] -= count
        return signs

    def _sample_brackets(self, keys: Sequence[str], m: int) -> list[tuple[float, float] | None]:
        """Per task, a magnitude range that holds the m-th largest |tau| with near certainty.

        From an evenly strided sample of the task vector over ``keys``: the sample's ranks
        around the expected one, +-5 binomial standard deviations. A miss costs time only
        (the selector verifies the bracket by counting).
        """
        n = sum(self.base.spec(key).numel for key in keys)
        if n < _MIN_BRACKETED:
            return [None] * len(self.models)
        stride = (n // _SAMPLE) | 1  # odd, so it does not alias with power-of-two row lengths
        parts: list[list[torch.Tensor]] = [[] for _ in self.models]
        offset = 0
        for key in keys:
            first = (-offset) % stride
            # strided on the source's device, then moved: only the sample travels
            base = self.base.get(key).reshape(-1)[first::stride].to(self.device, self.compute_dtype)
            for part, model in zip(parts, self.models):
                sample = model.get(key).reshape(-1)[first::stride].to(self.device, self.compute_dtype)
                part.append((sample - base).abs_())
            offset += self.base.spec(key).numel
        # Every task's sample has the same size and the same ranks around the threshold: one
        # batched sort for all tasks and one host transfer (not two kthvalue syncs per task).
        samples = torch.stack([torch.cat(part) for part in parts])
        size = samples.shape[1]
        expected = m * size / n  # rank of the threshold in the sample, counted from the top
        margin = 5 * math.sqrt(expected * (1 - m / n)) + 8
        top, bottom = math.floor(expected - margin), math.ceil(expected + margin)
        if top < 1 or bottom > size:
            return [None] * len(self.models)
        ordered = samples.sort(dim=1).values  # the k-th smallest is ordered[:, k - 1], as kthvalue(k)
        ends = ordered[:, [size - bottom, size - top]].tolist()
        return [(lo, hi) if math.isfinite(hi) else None for lo, hi in ends]

    def _tensor_thresholds(self, key: str) -> list[MagnitudeThreshold]:
        n = self.base.spec(key).numel
        m = keep_count(self.spec.k, n)
        if m == 0:
            return [MagnitudeThreshold.keep_none() for _ in self.models]
        if n > _SMALL_TENSOR:
            return self._select([key], m)
        taus = self._task_vectors(key)
        _check_finite(taus, key, self.models)
        mags = taus.abs()
        values = mags.kthvalue(n - m + 1, dim=1, keepdim=True).values
        # three host syncs per tensor, not three per task (they dominate off the CPU)
        greater = (mags > values).sum(1).tolist()
        equal = (mags == values).sum(1).tolist()
        return [
            MagnitudeThreshold(v, kept=m, n_greater=g, n_equal=e)
            for v, g, e in zip(values.squeeze(1).tolist(), greater, equal)
        ]

    # ---- the steps on one chunk -----------------------------------------------------------
    def _sparsify(
        self, key: str, start: int, taus: torch.Tensor, trim_step: ThresholdTrim | None, dare: torch.Tensor | None
    ) -> torch.Tensor:
        if trim_step is not None:  # the selector has already refused non-finite task vectors
            return trim_step(taus)
        _check_finite_sum(taus, key, self.models)
        if dare is not None:
            keep = dare[:, start : start + taus.shape[1]]
            return divide_(taus * keep, 1.0 - self.spec.p)  # the same bits on every device
        return taus

    def _dare_masks(self, key: str) -> torch.Tensor:
        """DARE's keep masks of ``key``, ``[N, numel]`` on the merge device.

        Drawn by a CPU generator and then moved, so that a seed gives the same masks (and
        the same merge) on every device: GPU generators draw other numbers.
        """
        n = self.base.spec(key).numel
        masks = []
        for i in range(len(self.models)):
            g = torch.Generator().manual_seed((self.spec.seed * 1_000_003 + i * 7919 + zlib.crc32(key.encode())) % (2**63))
            masks.append(torch.rand(n, generator=g) >= self.spec.p)
        return torch.stack(masks).to(self.device)

    # ---- the main loop --------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return _positive_zeros(self._merge_keys(disjoint_merge))

    def components(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, deltas)`` with ``deltas[t]`` task t's share of tau_m (``[N, *shape]``).

        ``deltas.sum(0)`` equals the merged tau_m up to float rounding; learned merging
        coefficients scale each share separately.
        """
        return _positive_zeros(self._merge_keys(disjoint_components))

    def _merge_keys(self, combine: Callable[..., torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        spec = self.spec
        if spec.tensor_fn is not None:
            yield from self._per_tensor_keys(combine is disjoint_components)
            return
        n_tasks = len(self.models)
        per_task = combine is disjoint_components
        global_trim = spec.trims and spec.scope == "global"
        if global_trim and self.thresholds is None:
            self.thresholds = self._select(self.plan.merge_keys, keep_count(spec.k, self.plan.numel))
        if spec.sign in ("normfrac", "normmass") and spec.scope == "global":
            self._norms = self._trimmed_norms()
        # global scope: one trim (thresholds and tie budget) streamed over every key, in order
        trim_step = ThresholdTrim(self.thresholds, self.compute_dtype) if global_trim else None
        held: list[tuple[str, torch.Tensor, _Contested]] = []
        # Sums of elected signs stay on the merge device (exact int64): read on the host only
        # when a contested entry needs the majority sign, never per chunk.
        sign_total = torch.zeros((), dtype=torch.int64, device=self.device)
        use_kernels = spec.sign in ("mass", "count") and not per_task and self._use_kernels()
        for key in self.plan.merge_keys:
            if spec.trims and not global_trim:
                trim_step = ThresholdTrim(self._tensor_thresholds(key), self.compute_dtype)
            dare = self._dare_masks(key) if spec.sparsify == "dare" else None
            norms = self._norms
            if norms is None and spec.sign in ("normfrac", "normmass"):
                norms = self._trimmed_norms([key], trim_step)
                trim_step = trim_step.restart() if trim_step is not None else None
            shape = self.base.spec(key).shape
            numel = self.base.spec(key).numel
            out = torch.empty((n_tasks, numel) if per_task else (numel,), dtype=self.compute_dtype, device=self.device)
            contested = _Contested(combine, spec.merge)
            key_sign_total = torch.zeros((), dtype=torch.int64, device=self.device)
            fast = trim_step is not None and spec.sign in ("mass", "count") and not per_task
            fused = None
            if fast and use_kernels:
                fused = self._fused_merge(key, trim_step, out, spec.sign, spec.merge, contested)
            if fused is not None:
                key_sign_total += fused
            for start, taus in self._chunks(key) if fused is None else ():
                end = start + taus.shape[1]
                if fast:  # the in-place kernel of steps.py (same values as the three calls below)
                    trimmed = self._buffer("trimmed", taus.shape[1])
                    chunk_signs, cols = ties_chunk_(taus, trim_step, out[start:end], trimmed, spec.sign, spec.merge)
                    key_sign_total += chunk_signs
                    if cols is not None:
                        contested.collect_columns(start, cols, trimmed)
                    continue
                trimmed = self._sparsify(key, start, taus, trim_step, dare)
                if spec.sign is None:
                    out[..., start:end] = combine(trimmed, None, spec.merge)
                    continue
                score = sign_score(trimmed, spec.sign, norms)
                gamma = torch.where(score >= 0, 1.0, -1.0).to(self.compute_dtype)  # zero -> +1 for now
                out[..., start:end] = combine(trimmed, gamma, spec.merge)
                key_sign_total += score.sign().sum(dtype=torch.int64)
                contested.collect(start, score, trimmed)
            result = out.view((n_tasks, *shape) if per_task else shape)
            if spec.sign is None or not contested:
                sign_total += key_sign_total
                yield key, result
            elif spec.scope == "per_tensor":
                contested.resolve(out, key_sign_total)
                yield key, result
            else:
                sign_total += key_sign_total
                held.append((key, result, contested))
        for key, result, contested in held:
            contested.resolve(result.view(*result.shape[: 1 if per_task else 0], -1), sign_total)
            yield key, result

    def _per_tensor_keys(self, per_task: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Per-tensor methods: the N task vectors of one key in, its tau_m (or shares) out."""
        fn = self.spec.components_fn if per_task else self.spec.tensor_fn
        if fn is None:
            raise ValueError(
                "this merge method does not decompose into per-task components (e.g. iso_c mixes the tasks' "
                "directions); use a method that does (ties, task_arithmetic, tsv) for per-task coefficients"
            )
        n_tasks = len(self.models)
        for key in self.plan.merge_keys:
            taus = self._task_vectors(key)
            _check_finite(taus, key, self.models)
            out = fn(taus.view(n_tasks, *self.base.spec(key).shape))
            yield key, out.to(self.compute_dtype)

    def _trimmed_norms(self, keys: Sequence[str] | None = None, trim_step: ThresholdTrim | None = None) -> torch.Tensor:
        """L2 norm of each task's trimmed vector over ``keys`` (normfrac/normmass need them)."""
        keys = self.plan.merge_keys if keys is None else keys
        if trim_step is None and self.thresholds is not None:
            trim_step = ThresholdTrim(self.thresholds, self.compute_dtype)
        sq = torch.zeros(len(self.models), dtype=torch.float64, device=self.device)
        for key in keys:
            for _, taus in self._chunks(key):
                trimmed = trim_step(taus) if trim_step is not None else taus
                sq += trimmed.double().square().sum(1)
        return sq.sqrt()


class _Contested:
    """Entries whose sign score is exactly 0 although some candidate is non-zero.

    They were merged with +1; if the scope's majority sign turns out negative, they are
    re-merged with -1 (the reference code's majority fallback).
    """

    def __init__(self, combine: Callable[..., torch.Tensor], merge: str) -> None:
        self.combine = combine
        self.merge = merge
        self.index: list[torch.Tensor] = []
        self.negative: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.index)

    def collect(self, start: int, score: torch.Tensor, trimmed: torch.Tensor) -> None:
        zero = score == 0
        if not bool(zero.any()):
            return
        self.collect_columns(start, torch.nonzero(zero & (torch.count_nonzero(trimmed, dim=0) > 0)).squeeze(1), trimmed)

    def collect_columns(
        self, start: int, cols: torch.Tensor, trimmed: torch.Tensor, index: torch.Tensor | None = None
    ) -> None:
        """Remember the -1 merge of the contested columns ``cols`` of a chunk starting at ``start``.

        ``index`` (gathered columns, e.g. the fused merge's patch): the flat offset of each
        column of ``trimmed``, used instead of ``start + cols``.
        """
        if cols.numel():
            sub = trimmed[:, cols]
            self.index.append(cols + start if index is None else index[cols])
            minus = torch.full((cols.numel(),), -1.0, dtype=sub.dtype, device=sub.device)
            self.negative.append(self.combine(sub, minus, self.merge))

    def resolve(self, flat_out: torch.Tensor, sign_total: torch.Tensor | float) -> None:
        """Re-merge the contested entries of ``flat_out`` (``[numel]`` or ``[N, numel]``) with -1 if needed."""
        if float(sign_total) < 0:
            for idx, values in zip(self.index, self.negative):
                flat_out[..., idx] = values


def _positive_zeros(merged: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors with every zero made +0.0 (``x + 0.0``; other values unchanged).

    Devices disagree on the sign of some zeros (CUDA's ``clamp`` turns -0.0 into +0.0, the
    CPU's keeps it), which changes no value but does change bits; with one kind of zero the
    CPU and GPU results are bit-identical wherever their values are equal.
    """
    for key, tensor in merged:
        yield key, tensor.add_(0.0)


def _check_finite(taus: torch.Tensor, key: str, models: Sequence[TensorSource]) -> None:
    bad = [m.label for m, row in zip(models, taus) if not bool(torch.isfinite(row).all())]
    if bad:
        raise ValueError(f"task vector of {', '.join(bad)} at {key!r} holds NaN or Inf values; fix or exclude it")


def _check_finite_sum(taus: torch.Tensor, key: str, models: Sequence[TensorSource]) -> None:
    # One reduction catches NaN/Inf (and overflow); the exact culprit is found only then.
    if not bool(torch.isfinite(taus.sum())):
        _check_finite(taus, key, models)


def merged_task_vector(
    base: Any,
    models: Sequence[Any],
    spec: MergeSpec | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    method: str = "custom",
    params: dict[str, Any] | None = None,
    device: DeviceLike = None,
) -> MergedTaskVector:
    """Compute tau_m once; apply it for many lam with :meth:`MergedTaskVector.apply`.

    ``device``: where to merge and where tau_m lives (None: the base's device; CPU for files).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> fts = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([3.0, 1.0])}]
        >>> merged_task_vector(base, fts, MergeSpec(k=1.0))["w"]
        tensor([2., 1.])
    """
    merger = TaskVectorMerger(base, models, spec, include, exclude, compute_dtype, device=device)
    tau = MergedTaskVector()
    for key, t in merger:
        tau[key] = t
    tau.report = MergeReport.from_plan(
        merger.plan,
        method,
        params if params is not None else asdict(merger.spec),
        [m.label for m in merger.models],
        thresholds=[t.value for t in merger.thresholds] if merger.thresholds else None,
    )
    return tau


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


_DEPRECATED = {"TaskVector": "MergedTaskVector"}


def _renamed(name: str) -> Any:
    """The object an old name now stands for, with a DeprecationWarning naming its new name."""
    import warnings

    new = _DEPRECATED[name]
    warnings.warn(
        f"lightning_ties.merging.{name} is deprecated: use {new} (the merged task vector tau_m, "
        f"not one task's task_vector())",
        DeprecationWarning,
        stacklevel=3,  # the line that looked the old name up, through the module's __getattr__
    )
    return globals()[new]


def __getattr__(name: str) -> Any:
    """Old names, still importable with a DeprecationWarning that names the new one."""
    if name in _DEPRECATED:
        return _renamed(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
