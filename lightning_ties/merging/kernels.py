"""Optional fused Triton kernels for the engine's two passes over a GPU (TIES's global trim).

The eager engine reads every input several times per pass and launches ~10 kernels per
tensor; these kernels read base and the N fine-tuned tensors once per pass, straight from the
tensors the engine already holds (no ``[N, c]`` task-vector buffer):

- :func:`bracket_counts`: the select pass with a sampled bracket. Per task, counts the
  entries whose ``|tau|`` bit pattern lies above the bracket (per-block partials, summed by
  torch), histograms those inside it (atomic adds: ~1% of the entries land there) and flags
  NaN/Inf, without a host sync.
- :func:`fused_ties_merge`: trim by per-task cut values (keep ``|tau| > cut``), elect the sign
  (``mass`` or ``count``), disjoint-merge (``mean``, ``sum``, ``max``, ``task_mean``), write
  tau_m, the per-block sums of elected signs and a per-block "contested" flag (a zero score
  with a non-zero candidate somewhere in the block), so that the engine recomputes only those
  blocks' columns eagerly and records their contested entries for the majority fallback.

Both give the bits of the eager path (``steps.ties_chunk_`` and ``MagnitudeSelector``):
sums over tasks in task order (unrolled), true division (``tl.div_rn``), no FMA contraction.
``tests/test_merging_kernels.py`` pins them by exact equality in Triton's interpreter.

Triton is optional: the engine calls :func:`available` and uses the kernels only when
Triton imports, the merge device is CUDA and the compute dtype float32. Setting the
environment variable ``LIGHTNING_TIES_KERNELS=0`` turns them off (the eager path, same bits).
A kernel that fails to compile or launch is reported once (a warning) and turned off for
the process; the engine then redoes the work on the eager path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

ENV_VAR = "LIGHTNING_TIES_KERNELS"
#: Input dtypes the kernels read (upcast to float32 in registers, as the engine's ``.to``).
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MERGE_CODES = {"mean": 0, "sum": 1, "max": 2, "task_mean": 3}
_MERGE_BLOCK = 1024
#: Columns per block of :func:`fused_ties_merge`: block ``j`` of its contested flags covers entries
#: ``[j * MERGE_BLOCK, (j + 1) * MERGE_BLOCK)``.
MERGE_BLOCK = _MERGE_BLOCK
_SELECT_BLOCK = 2048

_failed: str | None = None  # why the kernels were turned off at runtime


def _load() -> bool:
    """Whether Triton imported (at this module's import) and the kernels exist."""
    return triton is not None


def enabled() -> bool:
    """False when ``LIGHTNING_TIES_KERNELS=0`` (or ``false``/``off``/``no``) or a kernel failed earlier."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no") and _failed is None


def available(device: torch.device | str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the engine should run the fused kernels for a merge on ``device`` in ``dtype``.

    True only on a CUDA device, in float32, with Triton importable and the kernels not
    disabled by :data:`ENV_VAR` (or by an earlier failure).
    """
    return torch.device(device).type == "cuda" and dtype == torch.float32 and enabled() and _load()


def disable(reason: str) -> None:
    """Turn the kernels off for this process with one warning naming ``reason``."""
    global _failed
    if _failed is None:
        _failed = reason
        warnings.warn(
            f"lightning_ties: the fused Triton kernels failed ({reason}); merging on the eager PyTorch path "
            f"instead (same results, slower). Set {ENV_VAR}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


def readable(t: torch.Tensor) -> bool:
    """Whether a kernel can read ``t`` directly: contiguous, of a dtype in :data:`INPUT_DTYPES`."""
    return t.dtype in INPUT_DTYPES and t.is_contiguous()


try:  # optional: without Triton (or with a broken install) the engine runs its eager path
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

if triton is not None:
    @triton.jit
    def _trimmed(ft_ptr, b, offs, mask, cut):
        # tau = ft - base in float32; kept when |tau| > cut, else +0.0 (torch's hardshrink in ThresholdTrim)
        tau = tl.load(ft_ptr + offs, mask=mask, other=0.0).to(tl.float32) - b
        return tl.where(tl.abs(tau) > cut, tau, 0.0)

    @triton.jit
    def _sign(x):
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))

    @triton.jit
    def ties_merge_kernel(
        base_ptr, ft_ptrs, cuts_ptr, out_ptr, signs_ptr, contested_ptr, n,
        N: tl.constexpr, COUNT: tl.constexpr, MERGE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # 1.+2. trim and elect: score = ((t0 + t1) + t2) + ..., as steps.sum_tasks
        t = _trimmed(ft_ptrs[0], b, offs, mask, tl.load(cuts_ptr))
        score = _sign(t) if COUNT else t
        for i in tl.static_range(1, N):
            t = _trimmed(ft_ptrs[i], b, offs, mask, tl.load(cuts_ptr + i))
            score = score + (_sign(t) if COUNT else t)
        signs = _sign(score)
        gamma = tl.where(score < 0, -1.0, 1.0)  # signs + (1 - |signs|): a zero score -> +1 for now
        # 3. disjoint merge of the values agreeing with gamma (re-read: the block is in L2)
        for i in tl.static_range(0, N):
            t = _trimmed(ft_ptrs[i], b, offs, mask, tl.load(cuts_ptr + i))
            prod = t * gamma
            a = tl.where(prod < 0, 0.0, prod)  # clamp(min=0), keeping -0.0 as torch's CPU clamp
            if i == 0:
                magnitude = a
                count = tl.where(a > 0, 1.0, 0.0)
            else:
                if MERGE == 2:
                    magnitude = tl.where(a > magnitude, a, magnitude)
                else:
                    magnitude = magnitude + a
                count = count + tl.where(a > 0, 1.0, 0.0)
        contested = tl.max(tl.where(mask & (signs == 0) & (magnitude > 0), 1, 0), axis=0)
        if MERGE == 0:
            magnitude = tl.div_rn(magnitude, tl.where(count < 1.0, 1.0, count))
        elif MERGE == 3:
            magnitude = tl.div_rn(magnitude, tl.full(magnitude.shape, N, tl.float32))
        tl.store(out_ptr + offs, magnitude * gamma, mask=mask)
        tl.store(signs_ptr + pid, tl.sum(tl.where(mask, signs, 0.0).to(tl.int64), axis=0))
        tl.store(contested_ptr + pid, contested.to(tl.int32))

    @triton.jit
    def bracket_kernel(
        base_ptr, ft_ptrs, lo_ptr, hi_ptr, hist_ptr, hist_stride, above_ptr, bad_ptr, blocks, n,
        N: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # ``above`` and ``bad`` are per-block partials ([N, blocks] int32, reduced by torch
        # afterwards): one scalar atomic per block and task on a single address serialised
        # the whole grid (100K blocks x 8 tasks x 2 atomics for 8 x 200M entries).
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(0, N):
            tau = tl.load(ft_ptrs[i] + offs, mask=mask, other=0.0).to(tl.float32) - b
            bits = tau.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |tau|'s bits: ordered like |tau|
            lo = tl.load(lo_ptr + i)
            hi = tl.load(hi_ptr + i)
            tl.store(above_ptr + i * blocks + pid, tl.sum(tl.where(mask & (bits > hi), 1, 0), axis=0))
            inside = mask & (bits >= lo) & (bits <= hi)
            ones = tl.full(bits.shape, 1, tl.int64)
            tl.atomic_add(hist_ptr + i * hist_stride + (bits - lo).to(tl.int64), ones, mask=inside)
            tl.store(bad_ptr + i * blocks + pid, tl.max(tl.where(mask & (bits >= 0x7F800000), 1, 0), axis=0))


def fused_ties_merge(
    base: torch.Tensor,
    fine_tuned: Sequence[torch.Tensor],
    cuts: torch.Tensor,
    out: torch.Tensor,
    sign: str = "mass",
    merge: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim, elect and disjoint-merge one flat tensor: tau_m goes to ``out`` (float32, ``[n]``).

    ``base`` and each of ``fine_tuned`` are flat ``[n]`` tensors on one device (float32,
    bfloat16 or float16, contiguous); ``cuts`` (float32 ``[N]``, same device) holds each
    task's :attr:`~lightning_ties.merging.steps.ThresholdTrim.cuts`: task i keeps
    ``|tau| > cuts[i]``. The values are those of ``steps.ties_chunk_`` with no tie budget
    (the engine patches the columns of the threshold ties a task still keeps afterwards).

    Returns:
        ``(sum of elected signs, contested blocks)``: a 0-d int64 tensor and an int32
        ``[ceil(n / MERGE_BLOCK)]`` tensor (at least one element) whose entry ``j`` is 1 when
        some entry of columns ``[j * MERGE_BLOCK, (j + 1) * MERGE_BLOCK)`` had a zero score
        with a non-zero candidate (the caller recomputes those columns eagerly, which records
        the contested entries), both on the device, no host sync.
    """
    if sign not in ("mass", "count") or merge not in _MERGE_CODES:
        raise ValueError(f"the fused merge runs sign 'mass'/'count' and merge {sorted(_MERGE_CODES)}, got {sign!r}/{merge!r}")
    if not _load():
        raise RuntimeError("triton is not importable")
    n = base.numel()
    blocks = max(1, -(-n // _MERGE_BLOCK))
    signs = torch.zeros(blocks, dtype=torch.int64, device=base.device)
    contested = torch.zeros(blocks, dtype=torch.int32, device=base.device)
    if n:
        ties_merge_kernel[(blocks,)](
            base, tuple(fine_tuned), cuts, out, signs, contested, n,
            N=len(fine_tuned), COUNT=sign == "count", MERGE=_MERGE_CODES[merge], BLOCK=_MERGE_BLOCK,
            enable_fp_fusion=False,
        )  # fmt: skip
    return signs.sum(), contested


def bracket_counts(
    base: torch.Tensor,
    fine_tuned: Sequence[torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    hist: torch.Tensor,
    above: torch.Tensor,
    flags: torch.Tensor,
    flag_index: int,
) -> None:
    """Add one tensor's task vectors to a bracketed select pass, in one read of the inputs.

    For each task i: ``above[i]`` (int64) counts the entries whose ``|tau|`` bit pattern
    (int32) is greater than ``hi[i]``, ``hist[i, b - lo[i]]`` (int64) those with pattern
    ``b`` in ``[lo[i], hi[i]]``, and ``flags[i, flag_index]`` (int32) becomes 1 when a NaN
    or Inf is seen. ``lo``/``hi`` are int32 ``[N]`` tensors; all live on base's device.
    """
    if not _load():
        raise RuntimeError("triton is not importable")
    n = base.numel()
    if not n:
        return
    blocks = -(-n // _SELECT_BLOCK)
    partial = torch.empty(2, len(fine_tuned), blocks, dtype=torch.int32, device=base.device)
    bracket_kernel[(blocks,)](
        base, tuple(fine_tuned), lo, hi, hist, hist.stride(0), partial[0], partial[1], blocks, n,
        N=len(fine_tuned), BLOCK=_SELECT_BLOCK,
    )  # fmt: skip
    above += partial[0].sum(1, dtype=torch.int64)  # exact integer sums: order does not matter
    flags[:, flag_index] = torch.maximum(flags[:, flag_index], partial[1].amax(1))
