"""The streaming merge engine: models in, merged task vector out, one tensor at a time.

Data path (see ARCHITECTURE.md): for the paper's global trim, pass 1 finds each task's exact
top-k threshold (:mod:`.thresholds`); pass 2 walks the keys, and for each key reads base and
the N models, forms the task vectors chunk by chunk (:mod:`.reading`), trims, elects and
disjoint-merges them with the functions of :mod:`.steps` (its in-place kernel
``ties_chunk_`` for TIES's recipe), and yields tau_m for that key. Extra memory is
O(N x chunk) plus one output tensor, never O(N x model). The entries whose sign election
was an exact tie wait for the scope's majority sign (:mod:`.contested`).

Devices: the engine merges on one device, by default the base's (a module or state dict on
a GPU merges there; files are read to the CPU unless ``device=`` says otherwise); the
results are bit-identical across devices. On CUDA with Triton, TIES's select and merge
passes run as fused kernels (:mod:`.fused`, same bits; ``LIGHTNING_TIES_KERNELS=0`` keeps
the PyTorch path).

Ranks: with ``collectives`` (:mod:`.collectives`) and ``shards`` (each key's flat range on
this rank), W processes each merge their own ranges, and the pieces concatenated in flat
order are the one process's tau_m bit for bit: thresholds, threshold ties and the majority
sign are agreed by a few small collectives; nothing else crosses ranks.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .collectives import SINGLE_PROCESS, Collectives, ShardLayout
from .contested import Contested
from .fused import FusedPaths
from .options import MergeOptions
from .plan import MergePlan, Patterns, plan_merge
from .reading import DeviceLike, TaskReader
from .results import MergedTaskVector, MergeReport
from .select import MagnitudeThreshold, keep_count
from .sources import as_source
from .spec import MergeSpec
from .steps import ThresholdTrim, disjoint_components, disjoint_merge, divide_, sign_score
from .thresholds import ThresholdFinder
from .ties_pass import TiesPass

_NORM_SIGNS = ("normfrac", "normmass")


def _recipe(
    spec: MergeSpec | MergeOptions | None, include: Patterns, exclude: Patterns
) -> tuple[MergeSpec, Patterns, Patterns]:
    """The engine's spec and key patterns, from a spec or from checked options."""
    if not isinstance(spec, MergeOptions):
        return spec or MergeSpec(), include, exclude
    if include is not None or exclude is not None:
        raise ValueError("pass include/exclude inside MergeOptions, not beside it")
    return spec.spec, spec.include, spec.exclude


def model_list(models: Any) -> list[Any]:
    """``models`` (a list, tuple, ``dict.values()``, any iterable of fine-tuned models) as a list, refusing what is
    not a non-empty collection of models and naming what was given.

    One path, state dict or module in place of the list would be iterated into nonsense (a path's characters,
    a state dict's keys) and fail later with an error about something else.

    Example:
        >>> len(model_list({"a": {}, "b": {}}.values()))
        2
        >>> model_list("ft.safetensors")
        Traceback (most recent call last):
        ...
        ValueError: models must be a non-empty list of fine-tuned models (modules, state dicts or paths), got the single path 'ft.safetensors': pass ['ft.safetensors']
    """
    what = "models must be a non-empty list of fine-tuned models (modules, state dicts or paths)"
    if isinstance(models, (str, os.PathLike)):
        raise ValueError(f"{what}, got the single path {os.fspath(models)!r}: pass [{os.fspath(models)!r}]")
    if isinstance(models, (Mapping, nn.Module)):
        raise ValueError(f"{what}, got one {type(models).__name__}: pass it in a list, [model]")
    if not isinstance(models, Iterable):
        raise ValueError(f"{what}, got {type(models).__name__}")
    listed = list(models)
    if not listed:
        raise ValueError(f"no models to merge: {what}; pass at least one fine-tuned model")
    return listed


class TaskVectorMerger:
    """Stream tau_m out of a base and N models, key by key.

    Iterating yields ``(key, tau_m)`` for every merged key, float tensors of base's shape in
    ``compute_dtype`` on ``device`` (None: base's device; tensors read from the models are
    moved there). ``spec`` is a :class:`MergeSpec` or checked :class:`MergeOptions` (which
    then also bring include/exclude). With the global scope, a tensor whose merge had an
    exact tie in the sign election is held back until the whole model's majority sign is
    known; all others are yielded as soon as they are computed.

    On W ranks (``collectives``, see :mod:`.collectives`), ``shards[key] = (start, stop)`` is
    the flat range of the row-major flattened tensor that every source's ``get(key)`` returns
    on this rank (any shape with that many entries; ``(0, 0)``: none, read nothing); every
    merged key needs one. tau_m of a key is then this rank's range of it: the base's shape
    for a whole key, flat for a part, empty for none. Every rank must iterate the merger to
    the end (the collectives run inside).

    Example:
        >>> merger = TaskVectorMerger({"w": torch.zeros(4)}, [{"w": torch.arange(4.0)}], MergeSpec(k=0.5))
        >>> dict(merger)["w"]
        tensor([0., 0., 2., 3.])
    """

    def __init__(
        self,
        base: Any,
        models: Sequence[Any],
        spec: MergeSpec | MergeOptions | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        compute_dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        plan: MergePlan | None = None,
        device: DeviceLike = None,
        *,
        collectives: Collectives = SINGLE_PROCESS,
        shards: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        models = model_list(models)
        self.spec, include, exclude = _recipe(spec, include, exclude)
        self.base = as_source(base, "base")
        self.models = [as_source(m, f"model[{i}]", base=self.base) for i, m in enumerate(models)]
        self.plan = plan or plan_merge(self.base, self.models, include, exclude)
        self.reader = TaskReader(self.base, self.models, compute_dtype, device, chunk_size, shards)
        self.compute_dtype, self.device, self.chunk_size = compute_dtype, self.reader.device, self.reader.chunk_size
        self.collectives = collectives
        self.layout = self._layout(shards)
        self.fused = FusedPaths(self.reader)
        self.finder = ThresholdFinder(self.reader, collectives, self.layout, self.fused)
        self.thresholds: list[MagnitudeThreshold] | None = None
        self._norms: torch.Tensor | None = None
        self.ties_pass = TiesPass(self.reader, self.spec.sign or "mass", self.spec.merge,
                                  entries=self.plan.numel * len(self.models))

    def _layout(self, shards: Mapping[str, tuple[int, int]] | None) -> ShardLayout | None:
        """Every rank's ranges (one all_gather), checked; the refusals that need them."""
        if shards is None:
            if self.collectives.world_size > 1:
                raise ValueError(
                    f"merging on {self.collectives.world_size} ranks needs shards: each merged key's flat range "
                    "(start, stop) on this rank ((0, numel) for a key held whole, (0, 0) for one held elsewhere)"
                )
            return None
        keys = self.plan.merge_keys
        local = [self.reader.local_range(key) for key in keys]
        layout = ShardLayout(keys, [self.reader.numel(k) for k in keys], local, self.collectives)
        split = [k for j, k in enumerate(keys) if layout.split(j)]
        if self.spec.sign in _NORM_SIGNS and (split or (self.spec.scope == "global" and layout.world_size > 1)):
            raise ValueError(
                f"sign={self.spec.sign!r} cannot merge across ranks here ({'tensor ' + repr(split[0]) + ' is split' if split else 'the global scope spans ranks'}): "
                "its norms are float sums whose rounding depends on how the entries are split. Use sign='mass' or "
                "'count', or scope='per_tensor' with every tensor whole on one rank"
            )
        return layout

    def _split(self, index: int) -> bool:
        """Whether merged key number ``index`` lies on several ranks (its per-tensor steps need collectives)."""
        return self.layout is not None and self.layout.split(index)

    # ---- the main loop --------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return _positive_zeros(self._pooled(self._merge_keys(disjoint_merge)))

    def components(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, deltas)`` with ``deltas[t]`` task t's share of tau_m (``[N, *shape]``).

        ``deltas.sum(0)`` equals the merged tau_m up to float rounding; learned merging
        coefficients scale each share separately.
        """
        return _positive_zeros(self._pooled(self._merge_keys(disjoint_components)))

    def _pooled(self, merged: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``merged``, with the merge pass's threads (if any started) stopped when it ends or is dropped."""
        try:
            yield from merged
        finally:
            self.ties_pass.close()

    def _merge_keys(self, combine: Callable[..., torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        spec, keys = self.spec, self.plan.merge_keys
        if spec.tensor_fn is not None:
            yield from self._per_tensor_keys(combine is disjoint_components)
            return
        per_task = combine is disjoint_components
        global_trim = spec.trims and spec.scope == "global"
        budgets = None
        if global_trim:
            if self.thresholds is None:
                self.thresholds = self.finder.select(keys, keep_count(spec.k, self.plan.numel))
            budgets = self.finder.tie_budgets(keys, range(len(keys)), self.thresholds)
        if spec.sign in _NORM_SIGNS and spec.scope == "global":
            self._norms = self._trimmed_norms()
        # global scope: one trim (thresholds and tie budget) streamed over every key, in order
        trim_step = ThresholdTrim(self.thresholds, self.compute_dtype) if global_trim else None
        held: list[tuple[str, torch.Tensor, Contested]] = []  # resolved by the scope's majority sign
        split_totals: dict[str, torch.Tensor] = {}  # per-tensor scope: sign sums of split keys
        # Sums of elected signs stay on the merge device (exact int64): read on the host only
        # when a contested entry needs the majority sign, never per chunk.
        sign_total = torch.zeros((), dtype=torch.int64, device=self.device)
        for j, key in enumerate(keys):
            split = self._split(j)
            if spec.trims and not global_trim:
                trim_step = self._tensor_trim(key, j, split)
            if self.reader.local_numel(key) == 0:
                if split and spec.sign is not None and spec.scope == "per_tensor":
                    split_totals[key] = torch.zeros((), dtype=torch.int64, device=self.device)
                yield key, self._empty(per_task)
                continue
            if budgets is not None and budgets[j] is not None:  # None: the budget this rank's previous keys left
                trim_step.tie_budget = list(budgets[j])
            result, key_sign_total, contested = self._merge_key(key, trim_step, combine, per_task)
            if spec.sign is not None and spec.scope == "per_tensor" and split:
                split_totals[key] = key_sign_total
                if contested:
                    held.append((key, result, contested))
                    continue
            elif spec.sign is not None and spec.scope == "per_tensor" and contested:
                contested.resolve(result.view(*result.shape[: 1 if per_task else 0], -1), key_sign_total)
            elif spec.sign is not None and contested:
                sign_total += key_sign_total
                held.append((key, result, contested))
                continue
            else:
                sign_total += key_sign_total
            yield key, result
        yield from self._resolve_held(held, sign_total, split_totals, per_task)

    def _resolve_held(
        self,
        held: list[tuple[str, torch.Tensor, Contested]],
        sign_total: torch.Tensor,
        split_totals: dict[str, torch.Tensor],
        per_task: bool,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The held keys, their contested entries re-merged with -1 where the majority sign is negative.

        On W ranks the majority is the sum over ranks (one all_sum for the global scope, one
        for all the split tensors of the per-tensor scope), taken by every rank.
        """
        spec, distributed = self.spec, self.collectives.world_size > 1
        totals: dict[str, torch.Tensor] = {}
        if spec.sign is not None and distributed and spec.scope == "global":
            sign_total = self.collectives.all_sum(sign_total)
        if split_totals:  # same keys, same order on every rank (from the layout)
            summed = self.collectives.all_sum(torch.stack(list(split_totals.values())))
            totals = dict(zip(split_totals, summed))
        for key, result, contested in held:
            contested.resolve(result.view(*result.shape[: 1 if per_task else 0], -1), totals.get(key, sign_total))
            yield key, result

    def _empty(self, per_task: bool) -> torch.Tensor:
        shape = (len(self.models), 0) if per_task else (0,)
        return torch.empty(shape, dtype=self.compute_dtype, device=self.device)

    def _tensor_trim(self, key: str, index: int, split: bool) -> ThresholdTrim | None:
        """The per-tensor trim of ``key``; None where neither this rank nor the key's collectives need it."""
        if not split and self.reader.local_numel(key) == 0:
            return None
        thresholds = self.finder.tensor_thresholds(key, keep_count(self.spec.k, self.reader.numel(key)), split)
        trim_step = ThresholdTrim(thresholds, self.compute_dtype)
        if split:
            budgets = self.finder.tie_budgets([key], [index], thresholds)
            if budgets is not None and budgets[0] is not None:
                trim_step.tie_budget = list(budgets[0])
        return trim_step

    def _merge_key(
        self, key: str, trim_step: ThresholdTrim | None, combine: Callable[..., torch.Tensor], per_task: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Contested]:
        """tau_m of one key (this rank's range of it), the sum of its elected signs, its contested entries."""
        spec, n_tasks = self.spec, len(self.models)
        dare = self._dare_masks(key) if spec.sparsify == "dare" else None
        norms = self._norms
        if norms is None and spec.sign in _NORM_SIGNS:
            norms = self._trimmed_norms([key], trim_step)
            trim_step = trim_step.restart() if trim_step is not None else None
        numel = self.reader.local_numel(key)
        out = torch.empty((n_tasks, numel) if per_task else (numel,), dtype=self.compute_dtype, device=self.device)
        contested = Contested(combine, spec.merge)
        key_sign_total = torch.zeros((), dtype=torch.int64, device=self.device)
        fast = trim_step is not None and spec.sign in ("mass", "count") and not per_task
        fused = self.fused.merge(key, trim_step, out, spec.sign, spec.merge, contested) if fast and self.fused.active() else None
        if fused is not None:
            key_sign_total += fused
        elif fast:  # the in-place kernel of steps.py (same values as the three calls below)
            key_sign_total += self.ties_pass.run(key, trim_step, out, contested)  # type: ignore[arg-type]
        for start, taus in self.reader.chunks(key) if fused is None and not fast else ():
            end = start + taus.shape[1]
            trimmed = self._sparsify(key, start, taus, trim_step, dare)
            if spec.sign is None:
                out[..., start:end] = combine(trimmed, None, spec.merge)
                continue
            score = sign_score(trimmed, spec.sign, norms)
            gamma = torch.where(score >= 0, 1.0, -1.0).to(self.compute_dtype)  # zero -> +1 for now
            out[..., start:end] = combine(trimmed, gamma, spec.merge)
            key_sign_total += score.sign().sum(dtype=torch.int64)
            contested.collect(start, score, trimmed)
        shape = self.reader.local_shape(key)
        return out.view((n_tasks, *shape) if per_task else shape), key_sign_total, contested

    def _sparsify(
        self, key: str, start: int, taus: torch.Tensor, trim_step: ThresholdTrim | None, dare: torch.Tensor | None
    ) -> torch.Tensor:
        if trim_step is not None:  # the selector has already refused non-finite task vectors
            return trim_step(taus)
        self.reader.check_finite_sum(taus, key)
        if dare is not None:
            keep = dare[:, start : start + taus.shape[1]]
            return divide_(taus * keep, 1.0 - self.spec.p)  # the same bits on every device
        return taus

    def _dare_masks(self, key: str) -> torch.Tensor:
        """DARE's keep masks of ``key`` (this rank's range of it), ``[N, local numel]`` on the merge device.

        Drawn by a CPU generator and then moved, so that a seed gives the same masks (and
        the same merge) on every device: GPU generators draw other numbers. A rank holding
        part of a key draws the whole key's masks and keeps its range (the generator cannot
        skip ahead): W ranks sharing a key each pay its full draw.
        """
        n = self.reader.numel(key)
        start, stop = self.reader.local_range(key)
        masks = []
        for i in range(len(self.models)):
            g = torch.Generator().manual_seed((self.spec.seed * 1_000_003 + i * 7919 + zlib.crc32(key.encode())) % (2**63))
            masks.append((torch.rand(n, generator=g) >= self.spec.p)[start:stop])
        return torch.stack(masks).to(self.device)

    def _per_tensor_keys(self, per_task: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Per-tensor methods (SVD): the N task vectors of one key in, its tau_m (or shares) out.

        A key split over ranks is gathered whole (one all_gather of its padded pieces) on
        every rank; the ranks holding a piece factor it and keep their range.
        """
        fn = self.spec.components_fn if per_task else self.spec.tensor_fn
        if fn is None:
            raise ValueError(
                "this merge method does not decompose into per-task components (e.g. iso_c mixes the tasks' "
                "directions); use a method that does (ties, task_arithmetic, tsv) for per-task coefficients"
            )
        n_tasks = len(self.models)
        for j, key in enumerate(self.plan.merge_keys):
            start, stop = self.reader.local_range(key)
            if self._split(j):
                taus = self._gather_key(key, j)
            elif stop == start:
                yield key, self._empty(per_task)
                continue
            else:
                taus = self.reader.task_vectors(key)
            self.reader.check_finite(taus, key)
            if stop == start:  # gathered only to take part: nothing of it here
                yield key, self._empty(per_task)
                continue
            out = fn(taus.view(n_tasks, *self.base.spec(key).shape)).to(self.compute_dtype)
            if taus.shape[1] != stop - start:  # a piece of a gathered key: this rank's range, not a view of the whole
                out = (out.reshape(n_tasks, -1)[:, start:stop] if per_task else out.reshape(-1)[start:stop]).clone()
            yield key, out

    def _gather_key(self, key: str, index: int) -> torch.Tensor:
        """The whole ``[N, numel]`` task vectors of a key split over ranks, from every rank's piece."""
        assert self.layout is not None
        ranges = [self.layout.ranges[r][index] for r in range(self.layout.world_size)]
        longest = max(stop - start for start, stop in ranges)
        padded = torch.zeros(len(self.models), longest, dtype=self.compute_dtype, device=self.device)
        local = self.reader.task_vectors(key)
        padded[:, : local.shape[1]] = local
        pieces = self.collectives.all_gather(padded)
        whole = torch.empty(len(self.models), self.reader.numel(key), dtype=self.compute_dtype, device=self.device)
        for r, (start, stop) in enumerate(ranges):
            whole[:, start:stop] = pieces[r, :, : stop - start]
        return whole

    def _trimmed_norms(self, keys: Sequence[str] | None = None, trim_step: ThresholdTrim | None = None) -> torch.Tensor:
        """L2 norm of each task's trimmed vector over ``keys`` (normfrac/normmass need them)."""
        keys = self.plan.merge_keys if keys is None else keys
        if trim_step is None and self.thresholds is not None:
            trim_step = ThresholdTrim(self.thresholds, self.compute_dtype)
        sq = torch.zeros(len(self.models), dtype=torch.float64, device=self.device)
        for key in keys:
            for _, taus in self.reader.chunks(key):
                trimmed = trim_step(taus) if trim_step is not None else taus
                sq += trimmed.double().square().sum(1)
        return sq.sqrt()


def _positive_zeros(merged: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors with every zero made +0.0 (``x + 0.0``; other values unchanged).

    Devices disagree on the sign of some zeros (CUDA's ``clamp`` turns -0.0 into +0.0, the
    CPU's keeps it), which changes no value but does change bits; with one kind of zero the
    CPU and GPU results are bit-identical wherever their values are equal.
    """
    for key, tensor in merged:
        yield key, tensor.add_(0.0)


def merged_task_vector(
    base: Any,
    models: Sequence[Any],
    spec: MergeSpec | MergeOptions | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    compute_dtype: torch.dtype = torch.float32,
    method: str = "custom",
    params: dict[str, Any] | None = None,
    device: DeviceLike = None,
    *,
    collectives: Collectives = SINGLE_PROCESS,
    shards: Mapping[str, tuple[int, int]] | None = None,
) -> MergedTaskVector:
    """Compute tau_m once; apply it for many lam with :meth:`MergedTaskVector.apply`.

    ``spec``: a :class:`MergeSpec` (a custom recipe, reported as ``method``/``params``) or
    :class:`MergeOptions` (a registered method; its include/exclude, name and parameters are
    used). ``device``: where to merge and where tau_m lives (None: the base's device; CPU for
    files). ``collectives``/``shards``: this rank's part of a merge on W ranks (see
    :class:`TaskVectorMerger`); tau_m then holds this rank's ranges.

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> fts = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([3.0, 1.0])}]
        >>> merged_task_vector(base, fts, MergeSpec(k=1.0))["w"]
        tensor([2., 1.])
    """
    if isinstance(spec, MergeOptions):
        method, params = spec.method, spec.method_params
    merger = TaskVectorMerger(
        base, models, spec, include, exclude, compute_dtype, device=device, collectives=collectives, shards=shards
    )
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


__all__ = ["TaskVectorMerger", "merged_task_vector", "model_list"]
