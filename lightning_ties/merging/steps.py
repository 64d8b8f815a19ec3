"""The steps of TIES-Merging as small pure functions (Yadav et al., NeurIPS 2023): all the maths.

Each function works on task vectors stacked on dimension 0 (``[N, ...]`` for N tasks) and
reads like the paper: **trim** each task vector to its top-k magnitudes, **elect** a sign
per parameter, **disjoint-merge** the values that agree with it, **scale** by lam. The
engine (:mod:`lightning_ties.merging.engine`) only streams models through this file: chunk
by chunk through :func:`trim` with known thresholds (:class:`ThresholdTrim`),
:func:`sign_score` and :func:`disjoint_merge`, or, for TIES's own recipe, through the
in-place kernel :func:`ties_chunk_`, which the tests pin to the three plain functions by
exact equality. The functions are also usable on their own, e.g. to reuse one merged task
vector for many scaling factors::

    taus = torch.stack([task_vector(base, ft) for ft in fine_tuned])   # [N, ...]
    trimmed = trim(taus, k=0.2)
    gamma = elect_sign(trimmed)                                         # "mass"
    tau_m = disjoint_merge(trimmed, gamma)                              # "mean"
    theta = scale(base, tau_m, lam)                                     # base + lam * tau_m
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal

import torch

from .select import MagnitudeThreshold, top_magnitude_threshold

SignMethod = Literal["mass", "count", "normfrac", "normmass"]
MergeFn = Literal["mean", "sum", "max", "task_mean"]
SIGN_METHODS: tuple[str, ...] = ("mass", "count", "normfrac", "normmass")
MERGE_FNS: tuple[str, ...] = ("mean", "sum", "max", "task_mean")


def task_vector(base: torch.Tensor, fine_tuned: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """tau = theta_t - theta_base, computed in ``dtype`` whatever the stored dtypes are.

    Example:
        >>> task_vector(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]))
        tensor([ 0.5000, -1.0000])
    """
    return fine_tuned.to(dtype) - base.to(dtype)


def sum_tasks(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over dim 0 (the tasks), adding the rows one by one in task order: ``((x0 + x1) + x2) + ...``.

    Every cross-task sum of the merge goes through here, so that a merge gives the same bits
    on every device: ``x.sum(0)`` adds rows in an order that depends on the device and the
    shape (CPU cascade, CUDA's vectorised multi-accumulator reduce), while IEEE addition of
    two floats is exactly rounded everywhere. ``out`` (shape ``x.shape[1:]``) receives the sum.

    Example:
        >>> sum_tasks(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]]))
        tensor([4.5000, 6.5000])
    """
    n = x.shape[0]
    if n < 2:
        total = x[0].clone() if n == 1 else torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
        return total if out is None else out.copy_(total)
    total = torch.add(x[0], x[1], out=out) if out is not None else torch.add(x[0], x[1])
    for row in x[2:]:
        total.add_(row)
    return total


def divide_(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x /= divisor`` in place, correctly rounded on every device.

    CUDA divides by a Python number by multiplying with its reciprocal (fast, but not the
    correctly rounded quotient the CPU computes); dividing by a 0-d tensor on ``x``'s device
    is a true division there too, so a merge gives the same bits on the CPU and the GPU.

    Example:
        >>> divide_(torch.tensor([1.0, 3.0]), 3.0)
        tensor([0.3333, 1.0000])
    """
    return x.div_(torch.full((), divisor, dtype=x.dtype, device=x.device))


def trim_mask(magnitudes: torch.Tensor, threshold: MagnitudeThreshold) -> torch.Tensor:
    """Boolean mask of the entries a threshold keeps, ties resolved in flat order.

    ``magnitudes`` is ``|tau|`` of one task (any shape). All entries above the threshold are
    kept; of those equal to it, the first ``threshold.ties_to_keep`` in flat order.
    """
    keep = magnitudes >= threshold.effective_bound(magnitudes.dtype)
    if threshold.ties_to_keep > 0 and not threshold.keeps_all_ties:
        ties = torch.nonzero((magnitudes == threshold.value).reshape(-1)).squeeze(1)
        keep.view(-1)[ties[: threshold.ties_to_keep]] = True
    return keep


def trim(taus: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the top-``k`` fraction of magnitudes of each task vector (row), zero the rest.

    ``taus`` is ``[N, ...]``; each row keeps exactly ``int(k * row.numel())`` entries (ties at
    the threshold broken by flat position). ``k=1`` keeps everything.

    Example:
        >>> trim(torch.tensor([[0.1, -0.5, 0.3, 0.0, 0.2]]), k=0.4)
        tensor([[ 0.0000, -0.5000,  0.3000,  0.0000,  0.0000]])
    """
    check_density(k)
    out = torch.zeros_like(taus)
    for i, row in enumerate(taus):
        threshold = top_magnitude_threshold(row, k)
        keep = trim_mask(row.abs(), threshold)
        out[i] = torch.where(keep, row, torch.zeros((), dtype=row.dtype, device=row.device))
    return out


#: The paper's recipe without validation data: keep the top 20% of each task vector, lam = 1.
#: Read them through the registry (``get_method("ties").default_k`` / ``.default_lam``); these
#: constants exist so that :class:`~lightning_ties.merging.engine.MergeSpec` and the registry
#: share one number.
PAPER_K = 0.2
PAPER_LAM = 1.0

#: Largest |lam| accepted. The paper searches 0.8..2.5 and task arithmetic 0.1..1.0; a scale of
#: 100 on a task vector already leaves the fine-tuned basin, and larger values are typos
#: (``1e39`` turns float32 weights into Inf).
MAX_LAM = 100.0


def check_lam(value: object, name: str = "lam") -> float:
    """``value`` as a float when it is a usable lam: a finite real number with |lam| <= :data:`MAX_LAM`.

    The one check every layer uses (engine, registry, searches, configs), so that ``nan``,
    ``inf``, ``1e39``, ``True`` or the string ``"1.0"`` are refused up front with a message
    naming the value, instead of producing non-finite weights or failing deep inside torch.

    Example:
        >>> check_lam(0.5)
        0.5
        >>> check_lam("1.0")
        Traceback (most recent call last):
        ...
        ValueError: lam must be a real number (a float such as 1.0), got '1.0' of type str
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        value = value.item()  # a 0-d tensor (e.g. a learned or searched coefficient)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number (a float such as 1.0), got {value!r} of type {type(value).__name__}")
    lam = float(value)
    if not math.isfinite(lam):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if abs(lam) > MAX_LAM:
        raise ValueError(f"{name}={value!r} is out of range: |{name}| must be at most {MAX_LAM:g} (the paper uses 0.1-2.5)")
    return lam


def check_density(k: float, name: str = "k") -> None:
    if not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of each task vector kept), got {k!r}")


def sign_score(trimmed: torch.Tensor, method: SignMethod = "mass", norms: torch.Tensor | None = None) -> torch.Tensor:
    """The quantity whose sign is elected, per parameter (the reference code's ``resolve_sign``).

    - ``"mass"``: sum of trimmed values (the paper's default);
    - ``"count"``: sum of signs (PEFT's "frequency");
    - ``"normfrac"``: the value of the task whose entry holds the largest share of its own
      squared norm; ``"normmass"``: the sum of signs weighted by those shares.
      ``norms`` are the tasks' trimmed-vector L2 norms over the whole scope (shape ``[N]``).
    """
    if method == "mass":
        return sum_tasks(trimmed)
    if method == "count":
        return sum_tasks(trimmed.sign())
    if method in ("normfrac", "normmass"):
        if norms is None:
            norms = trimmed.reshape(trimmed.shape[0], -1).norm(dim=1)
        shape = (-1,) + (1,) * (trimmed.dim() - 1)
        fracs = trimmed.square() / norms.to(trimmed.dtype).square().clamp(min=torch.finfo(trimmed.dtype).tiny).reshape(shape)
        if method == "normfrac":
            return trimmed.gather(0, fracs.argmax(0, keepdim=True)).squeeze(0)
        return sum_tasks(trimmed.sign() * fracs)
    raise ValueError(f"unknown sign method {method!r}; choose one of {', '.join(SIGN_METHODS)}")


def majority_sign(gamma: torch.Tensor) -> float:
    """Sign of the sum of elected signs over the whole vector; +1 when that sum is zero.

    Counted in int64: a float32 sum of more than 2**24 signs is inexact, and device-dependent.
    """
    return -1.0 if int(gamma.sum(dtype=torch.int64)) < 0 else 1.0


def elect_sign(trimmed: torch.Tensor, method: SignMethod = "mass", norms: torch.Tensor | None = None) -> torch.Tensor:
    """Elect one sign per parameter: ``gamma = sign(sign_score)``, in {-1, +1}.

    A zero score falls back to the majority sign of the whole input (the reference code's
    ``resolve_zero_signs(..., "majority")``); a zero majority falls back to +1.

    Example:
        >>> elect_sign(torch.tensor([[1.0, -2.0], [-0.5, 1.0]]))
        tensor([ 1., -1.])
    """
    gamma = sign_score(trimmed, method, norms).sign()
    return torch.where(gamma == 0, torch.full_like(gamma, majority_sign(gamma)), gamma)


def disjoint_merge(trimmed: torch.Tensor, gamma: torch.Tensor | None, merge: MergeFn = "mean") -> torch.Tensor:
    """Merge, per parameter, the non-zero trimmed values that agree with the elected sign.

    - ``"mean"``: their mean (divide by their count, clamped to 1): the paper's disjoint mean;
    - ``"sum"``: their sum; ``"max"``: the largest magnitude, with sign ``gamma``;
    - ``"task_mean"``: their sum divided by the number of tasks (the "plain mean" ablation).

    ``gamma=None`` skips the election: every non-zero value takes part (with ``"max"`` the
    value of largest magnitude is taken with its own sign).

    Example:
        >>> trimmed = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
        >>> disjoint_merge(trimmed, torch.tensor([1.0, -1.0]))
        tensor([ 2., -2.])
    """
    if merge not in MERGE_FNS:
        raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGE_FNS)}")
    n_tasks = trimmed.shape[0]
    if gamma is None:
        if merge == "max":
            return trimmed.gather(0, trimmed.abs().argmax(0, keepdim=True)).squeeze(0)
        total = sum_tasks(trimmed)
        if merge == "mean":
            return total / torch.count_nonzero(trimmed, dim=0).clamp(min=1)
        return divide_(total, n_tasks) if merge == "task_mean" else total
    # |value| where the value agrees with gamma, 0 elsewhere
    agreeing = (trimmed * gamma).clamp_(min=0)
    if merge == "max":
        magnitude = agreeing.amax(0)
    elif merge == "mean":
        magnitude = sum_tasks(agreeing) / torch.count_nonzero(agreeing, dim=0).clamp(min=1)
    elif merge == "task_mean":
        magnitude = divide_(sum_tasks(agreeing), n_tasks)
    else:
        magnitude = sum_tasks(agreeing)
    return magnitude * gamma


def disjoint_components(trimmed: torch.Tensor, gamma: torch.Tensor | None, merge: MergeFn = "mean") -> torch.Tensor:
    """Each task's share of the disjoint merge: ``[N, ...]`` summing over dim 0 to tau_m.

    delta_t keeps task t's trimmed values that agree with ``gamma`` (all non-zero values when
    ``gamma`` is None), divided by the agreeing count (``"mean"``) or by N (``"task_mean"``).
    Learned merging coefficients scale these components one by one. ``"max"`` is not a sum of
    per-task parts and is refused.

    Example:
        >>> disjoint_components(torch.tensor([[1.0, -2.0], [3.0, 1.0]]), torch.tensor([1.0, -1.0]))
        tensor([[ 0.5000, -2.0000],
                [ 1.5000,  0.0000]])
    """
    if merge not in ("mean", "sum", "task_mean"):
        raise ValueError(f"merge {merge!r} has no per-task components; use 'mean', 'sum' or 'task_mean'")
    agree = trimmed != 0 if gamma is None else trimmed * gamma > 0
    selected = torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype, device=trimmed.device))
    if merge == "mean":
        return selected / agree.sum(0).clamp(min=1)
    return divide_(selected, trimmed.shape[0]) if merge == "task_mean" else selected


def scale(base: torch.Tensor, tau_m: torch.Tensor, lam: float) -> torch.Tensor:
    """The last step: theta = theta_base + lam * tau_m (tau_m moved to base's device, result in float).

    Example:
        >>> scale(torch.ones(2), torch.tensor([1.0, -1.0]), lam=0.5)
        tensor([1.5000, 0.5000])
    """
    return base + lam * tau_m.to(base.device)


# ---- the same steps, in place, on chunks of a stream ----------------------------------------
# The engine cannot hold a whole model: it sees each task vector as [N, chunk] slices, knows
# each task's trim threshold in advance (pass 1), and must not allocate per chunk (on CPU each
# avoided [N, chunk] temporary saves a full pass over memory). The two functions below are the
# kernel it runs; ``tests/test_merging_steps.py`` pins them to ``trim`` / ``elect_sign`` /
# ``disjoint_merge`` above by direct equality.


class ThresholdTrim:
    """The trim step with known per-task thresholds, applied to ``[N, c]`` chunks in stream order.

    Task i keeps every entry with ``|tau| > thresholds[i].value`` and, of the entries equal to
    it, the first ``thresholds[i].ties_to_keep`` it meets: :attr:`tie_budget` is what each task
    may still keep, spent across calls, so that chunk by chunk exactly as many entries survive
    as :func:`trim` keeps on the whole vector (same ones: ties go in flat order).

    Example:
        >>> taus = torch.tensor([[0.1, -0.5, 0.3, 0.0, 0.2]])
        >>> trim_step = ThresholdTrim([top_magnitude_threshold(taus[0], 0.4)], torch.float32)
        >>> trim_step(taus)
        tensor([[ 0.0000, -0.5000,  0.3000,  0.0000,  0.0000]])
    """

    def __init__(self, thresholds: list[MagnitudeThreshold], dtype: torch.dtype) -> None:
        self.thresholds = list(thresholds)
        self.dtype = dtype
        self.tie_budget = [t.ties_to_keep if not t.keeps_all_ties else 0 for t in self.thresholds]
        # |tau| >= bound  <=>  |tau| > the float just below bound (torch.threshold keeps x > cut)
        self.cuts = [
            torch.nextafter(torch.tensor(t.effective_bound(dtype), dtype=dtype), torch.tensor(-1.0, dtype=dtype)).item()
            for t in self.thresholds
        ]
        # each threshold's bit pattern: |tau| == value <=> the bits of |tau| xor these are all 0
        self._bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32
        self._value_bits = [int(torch.tensor(t.value, dtype=dtype).view(self._bits_dtype)) for t in self.thresholds]
        #: task -> how many more of its threshold ties to look for without keeping them (a caller
        #: keeping its own pick afterwards: no more than its budget can be kept from here on);
        #: each call lists in :attr:`seen` the ``(task, positions)`` it found
        self.watch: dict[int, int] = {}
        self.seen: list[tuple[int, torch.Tensor]] = []

    def restart(self) -> ThresholdTrim:
        """The same thresholds with a full tie budget (to stream the same entries again)."""
        return ThresholdTrim(self.thresholds, self.dtype)

    def ties_in(self, row: torch.Tensor, task: int, in_place: bool = False) -> torch.Tensor | None:
        """Flat positions (ascending) of the entries of ``row`` with ``|x| ==`` task ``task``'s threshold; None if none.

        ``in_place``: ``row`` (a scratch buffer) is overwritten. One ``abs``, ``xor`` and
        ``amin`` on the integer view: a fifth of the time of ``abs() == value`` and ``any()``
        (boolean outputs and reductions are slow on the CPU); ties are rare, so the positions
        are only looked up in the rows that hold one.
        """
        magnitudes = row.abs_() if in_place else row.abs()
        bits = magnitudes.view(self._bits_dtype).bitwise_xor_(self._value_bits[task])
        if not bits.numel() or int(bits.amin()) != 0:
            return None
        return torch.nonzero(bits == 0).squeeze(1)

    def __call__(self, taus: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The trimmed task vectors (zeros where not kept), written to ``out`` when given.

        One ``hardshrink`` per task (keeps ``|x| > cut``): a third of the time of ``abs``,
        ``threshold_`` and ``copysign``, the same values (a dropped negative entry becomes
        +0.0 rather than -0.0; the merge's outputs make every zero +0.0 anyway).
        """
        out = torch.empty_like(taus) if out is None else out
        self.seen = []
        for i, (row, cut) in enumerate(zip(taus, self.cuts)):
            left = self.tie_budget[i]
            # rare: more entries at the threshold than it keeps; keep the first ones seen
            ties = self.ties_in(row, i) if left > 0 or i in self.watch else None
            torch.hardshrink(row, cut, out=out[i])
            if ties is not None and left > 0:
                idx = ties[:left]
                out[i, idx] = row[idx]
                self.tie_budget[i] -= idx.numel()
            elif ties is not None:
                found = ties[: self.watch[i]]
                self.seen.append((i, found))
                self.watch[i] -= found.numel()
                if not self.watch[i]:
                    del self.watch[i]
        return out


def ties_chunk_(
    taus: torch.Tensor,
    trim_step: ThresholdTrim,
    out: torch.Tensor,
    trimmed: torch.Tensor,
    sign: SignMethod = "mass",
    merge: MergeFn = "mean",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trim, elect and disjoint-merge one ``[N, c]`` chunk in place; tau_m's chunk goes to ``out`` (``[c]``).

    The values of ``disjoint_merge(trim, elect_sign(trim, sign), merge)`` with two scratch
    buffers: ``trimmed`` (``[N, c]``, holds the trimmed task vectors on return) and ``taus``
    itself (overwritten). Float arithmetic instead of boolean masks: several times faster on CPU.

    The election's fallback needs the whole scope: an entry whose sign score is exactly 0
    although some candidate is not ("contested") is merged here with +1, and its column
    returned, so the caller can re-merge it with -1 if the scope's majority sign
    (the sign of the summed elected signs) turns out negative.

    Returns:
        ``(sum of the chunk's elected signs, contested columns or None)``; the sum is a 0-d
        int64 tensor on the chunk's device (exact, and no host sync: the engine reads the
        total once per scope). Finding the contested columns costs one host sync per chunk.
    """
    if sign not in ("mass", "count"):
        raise ValueError(f"the in-place kernel elects with 'mass' or 'count', got sign={sign!r}")
    # 1. trim: top-k magnitudes of each task vector
    trimmed = trim_step(taus, out=trimmed)
    # 2. elect: gamma = sign of the summed mass (or of the summed signs); zero -> +1 for now
    # (sums of signs are small integers, exact in any order: one ``sum(0)`` rather than N - 1 adds)
    score = sum_tasks(trimmed) if sign == "mass" else torch.sign(trimmed, out=taus).sum(0)
    signs = score.sign()
    zero_score = 1 - signs.abs()
    gamma = signs + zero_score
    # 3. disjoint merge: combine only the values that agree with gamma
    agreeing = torch.mul(trimmed, gamma, out=taus).clamp_(min=0)  # |value| where it agrees, else 0
    magnitude = agreeing.amax(0) if merge == "max" else sum_tasks(agreeing)
    # a zero score with a positive candidate has a negative one too: an exact tie, rare
    contested = torch.nonzero(zero_score * magnitude).squeeze(1) if float(torch.dot(zero_score, magnitude)) > 0 else None
    if merge == "mean":
        magnitude /= agreeing.sign_().sum(0).clamp_(min=1)  # the count of agreeing values: exact
    elif merge == "task_mean":
        divide_(magnitude, trimmed.shape[0])
    elif merge not in ("sum", "max"):
        raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGE_FNS)}")
    torch.mul(magnitude, gamma, out=out)
    # The sum of the elected signs is an exact integer: summed in their float dtype while every
    # partial sum is representable (a seventh of the time of a cast to int64 first).
    exact = signs.numel() <= 1 << 24 or signs.dtype == torch.float64
    return (signs.sum() if exact else signs.sum(dtype=torch.int64)).to(torch.int64), contested
