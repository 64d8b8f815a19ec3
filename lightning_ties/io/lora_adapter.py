"""LoRA adapters in, one LoRA adapter out: the merged task vector re-factored to a low rank.

When every task is a PEFT LoRA adapter of one base, :func:`merge_lora_adapters` writes a
merged *adapter* (``adapter_model.safetensors`` + ``adapter_config.json``) that
``PeftModel.from_pretrained(base_model, folder)`` loads, instead of a full model.

Two ways to get its factors:

- ``"svd"`` (any method): the engine merges the adapters' full updates ``scaling * B @ A`` of
  the target modules into tau_m, as ``merge_to(..., include=<the target weights>)`` would
  (TIES' trim and sign election act entry by entry, so they cannot run on the factors; ``k``
  is a fraction of the target weights' entries, where a LoRA update lives, not of the whole
  model's; and tau is ``scaling * B @ A`` itself, without the rounding of ``(W + BA) - W``),
  and each ``lam * tau_m`` is cut back to rank ``r`` by a truncated SVD, ``B = U_r sqrt(S_r)``,
  ``A = sqrt(S_r) V_r^T``. The rank default is the sum of the adapters' ranks for that module
  (enough to hold their sum exactly), capped by the matrix size. Where ``r`` is small next to
  the matrix (``4 * (r + 10) <= min(m, n)``, e.g. r=24 on 4096 x 4096) the top ``r`` triplets
  come from a seeded randomized range finder with 4 subspace iterations (Halko et al., 2011):
  on one CPU core, 0.5-0.8 s instead of ~60 s for a TIES-merged 4096 x 4096 update at r=24,
  with the same error to 4 digits (0.2% higher at r=64; ``benchmarks/bench_lora_adapter.py``).
  ``"exact_svd"`` always runs the full SVD.
- ``"concat"`` (linear methods: ``task_arithmetic``, ``average``): ``lam * sum_i w_i s_i B_i A_i``
  is the product of the stacked factors ``[w_1 s_1 B_1 | ... ] @ [A_1; ...]``, so the merged
  adapter is exact, of rank ``sum r_i``, without an SVD. It is the default for those methods.

Either way the scalings are folded into ``B`` and the adapter is written with
``lora_alpha == r`` (PEFT's scaling 1), and the report gives the rank and the relative error
``||lam * tau_m - B A||_F / ||lam * tau_m||_F`` of every module, measured on the factors as
written (in the adapters' dtype).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import ModelCard
from tqdm.auto import tqdm

from ..merging import MergeReport, MergeSpec, TaskVectorMerger, get_method
from ..merging.sources import TensorSpec, as_source
from ..merging.subspace import svd
from .atomic import atomic_dir, check_output, owner_metadata
from .card import build_model_card
from .digests import sha256_file
from .errors import CheckpointError
from .formats import open_source
from .hf_folder import ADAPTER_CONFIG
from .lora import LoraSource
from .safetensors_file import SafetensorsWriter

Factorization = Literal["svd", "exact_svd", "concat"]
_OVERSAMPLE, _POWER_ITERATIONS = 10, 4  # the randomized SVD's extra columns and subspace iterations
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# PEFT saves a copy of a targeted embedding's own weight (save_embedding_layers); it is base's,
# and the merged adapter is loaded onto that same base, so it is not carried.
_BASE_LAYER_COPY = ".base_layer.weight"


@dataclass
class LoraMergeReport:
    """What :func:`merge_lora_adapters` wrote: the rank and reconstruction error of every module.

    Attributes:
        output: the adapter folder.
        method, params, lam: the merge recipe.
        factorization: ``"svd"`` / ``"exact_svd"`` (truncated SVD of ``lam * tau_m``) or ``"concat"``
            (stacked factors, exact).
        rank: the adapter's ``r`` (the most common module rank); ``ranks``: every module's rank.
        errors: per module, ``||lam * tau_m - B A||_F / ||lam * tau_m||_F`` of the factors as written.
        error: the same over all modules together.
        merge: the engine's report (keys merged, trim thresholds); None for ``"concat"``.
    """

    output: Path
    method: str
    params: dict[str, Any]
    lam: float
    factorization: Factorization
    rank: int
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    error: float = 0.0
    merge: MergeReport | None = None

    def __str__(self) -> str:
        worst = max(self.errors, key=self.errors.__getitem__) if self.errors else None
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        lines = [
            f"merged LoRA adapter {self.output} ({self.method}{params}, lam={self.lam}): "
            f"{len(self.ranks)} module(s), {self.factorization}, r={self.rank}"
            + (f" (ranks {min(self.ranks.values())}-{max(self.ranks.values())})" if len(set(self.ranks.values())) > 1 else ""),
            f"relative error ||lam*tau_m - B A||_F / ||lam*tau_m||_F: {self.error:.3g} overall"
            + (f", worst {self.errors[worst]:.3g} ({worst})" if worst else ""),
        ]
        return "\n".join(lines)


@dataclass
class _Target:
    """One target module as the adapters store it (names from the first adapter)."""

    base_key: str  # the weight in base's state dict
    module: str  # PEFT's module name (what rank_pattern matches)
    a_key: str
    b_key: str
    transpose: bool  # update is (B @ A).T in base's layout (embeddings, fan_in_fan_out)


class _DeltaSource:
    """One adapter's updates ``scaling * B @ A`` of the target weights, as a source of task vectors."""

    def __init__(self, lora: LoraSource, targets: Sequence[str]) -> None:
        self.lora, self.label, self._keys = lora, lora.label, list(targets)

    def keys(self) -> Sequence[str]:
        return self._keys

    def spec(self, key: str) -> TensorSpec:
        return TensorSpec(self.lora.base.spec(key).shape, torch.float32)

    def get(self, key: str) -> torch.Tensor:
        return self.lora.delta(key)


class _Zeros:
    """The origin the updates are measured from: tau = delta - 0, with no rounding through base's weights."""

    label = "zero"

    def __init__(self, deltas: _DeltaSource) -> None:
        self._deltas = deltas

    def keys(self) -> Sequence[str]:
        return self._deltas.keys()

    def spec(self, key: str) -> TensorSpec:
        return self._deltas.spec(key)

    def get(self, key: str) -> torch.Tensor:
        return torch.zeros(self.spec(key).shape)


def merge_lora_adapters(
    output: str | os.PathLike[str],
    base: Any,
    adapters: Sequence[str | os.PathLike[str]],
    method: str = "ties",
    lam: float | None = None,
    *,
    rank: int | None = None,
    factorization: Factorization | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    device: str | torch.device | None = None,
    **params: Any,
) -> LoraMergeReport:
    """Merge PEFT LoRA adapters of one base into one LoRA adapter that PEFT loads.

    Args:
        output: the adapter folder to write (atomically; ``adapter_model.safetensors``,
            ``adapter_config.json``, ``README.md``).
        base: the base model the adapters were trained on (a path, module or state dict):
            used to check that every adapter fits it and to read the target weights' shapes.
        adapters: the adapter folders (``save_pretrained`` of a LoRA ``PeftModel``), all
            with the same target modules and the same ``base_model_name_or_path``.
        method, lam, params: any registered method and its parameters, as for
            :func:`~lightning_ties.io.merge_to`; the merge covers the target weights only
            (``k`` is a fraction of their entries, not of the whole model's).
        rank: the output's rank per module for ``"svd"`` (default: the sum of the adapters'
            ranks of that module); always capped by the matrix's smaller side.
        factorization: ``"svd"`` (randomized where ``r`` is small next to the matrix),
            ``"exact_svd"`` (always the full SVD) or ``"concat"`` (exact, rank = sum of ranks;
            linear methods only). Default: ``"concat"`` for a linear method without ``rank``,
            else ``"svd"``.
        overwrite: replace an earlier lightning-ties output at ``output``.
        progress: a bar over modules; None shows it only on a terminal.
        device: where to merge and run the SVDs (``"cuda"``); None: the CPU.

    Adapters that save full modules besides their LoRA factors (``modules_to_save``, such as
    a classification head) are refused: a merged adapter carries LoRA factors only; merge
    them into a full model with ``merge_to``.

    Returns:
        A :class:`LoraMergeReport` (``print`` it for the rank and errors).

    Example:
        >>> import tempfile, torch
        >>> from peft import LoraConfig, PeftModel, get_peft_model
        >>> folder = tempfile.mkdtemp()
        >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> for i in range(2):
        ...     _ = torch.manual_seed(i)
        ...     config = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
        ...     get_peft_model(net(), config).save_pretrained(f"{folder}/task{i}")
        >>> _ = torch.manual_seed(0)
        >>> base = net()
        >>> report = merge_lora_adapters(f"{folder}/merged", base.state_dict(),
        ...     [f"{folder}/task0", f"{folder}/task1"], "task_arithmetic", lam=0.5)
        >>> report.factorization, report.rank, report.error < 1e-6
        ('concat', 4, True)
        >>> model = PeftModel.from_pretrained(base, f"{folder}/merged")
    """
    merge_method = get_method(method)
    spec = merge_method.build_spec(**params)
    lam = merge_method.resolve_lam(lam)
    how = _factorization(spec, method, rank, factorization)
    folders = _adapter_folders(adapters)
    output = check_output(output, overwrite, inputs=[base, *folders], kind="folder")

    base_src = open_source(base) if isinstance(base, (str, os.PathLike)) else as_source(base, "base")
    loras = [LoraSource(folder, base_src) for folder in folders]
    configs = [json.loads((folder / ADAPTER_CONFIG).read_text()) for folder in folders]
    targets = _check_adapters(loras, configs)
    files = [Path(f) for lora in loras for f in lora.files] + [Path(f) for f in getattr(base_src, "files", [])]
    check_output(output, overwrite, inputs=files, kind="folder")

    report = LoraMergeReport(output, method, {**merge_method.parameters(), **params}, lam, how, rank=0)
    if how == "concat":
        produced = _concat_factors(loras, targets, lam, 1.0 / len(loras) if spec.merge == "task_mean" else 1.0)
    else:
        produced = _svd_factors(loras, targets, spec, lam, rank, device, report, exact=how == "exact_svd")
    with tqdm(produced, total=len(targets), desc=f"{how} factors", unit="module", disable=_disabled(progress)) as bar:
        factors = _measured(report, bar, _factor_dtype(loras[0], targets[0]))
    with atomic_dir(output) as tmp:
        _write_weights(tmp / ADAPTER_WEIGHTS, factors, targets)
        config = _adapter_config(configs, report, targets)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _card(report, folders, config.get("base_model_name_or_path"), output).save(tmp / "README.md")
    return report


# ---- checks, before any tensor is read -----------------------------------------------------------
def _factorization(spec: MergeSpec, method: str, rank: int | None, asked: Factorization | None) -> Factorization:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer (or None for the sum of the adapters' ranks), got {rank!r}")
    linear = spec.sparsify is None and spec.sign is None and spec.tensor_fn is None and spec.merge in ("sum", "task_mean")
    if asked is None:
        return "concat" if linear and rank is None else "svd"
    if asked not in ("svd", "exact_svd", "concat"):
        raise ValueError(f"factorization must be 'svd', 'exact_svd' or 'concat', got {asked!r}")
    if asked == "concat" and not linear:
        raise ValueError(
            f"factorization='concat' merges the adapters' factors directly, which is exact only for linear methods "
            f"(task_arithmetic, average); {method!r} trims, elects signs or re-factors entry by entry: use 'svd'"
        )
    if asked == "concat" and rank is not None:
        raise ValueError(f"factorization='concat' gives rank = the sum of the adapters' ranks; rank={rank} needs 'svd'")
    return asked


def _adapter_folders(adapters: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError("adapters must be a non-empty list of PEFT LoRA adapter folders")
    folders = []
    for adapter in adapters:
        if not isinstance(adapter, (str, os.PathLike)):
            raise ValueError(
                f"adapters: expected adapter folder paths, got a {type(adapter).__name__}; save it with save_pretrained first"
            )
        folder = Path(adapter)
        if not (folder / ADAPTER_CONFIG).is_file():
            raise CheckpointError(
                f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); merge_lora_adapters takes LoRA adapters "
                "saved with save_pretrained. Merge full models with merge_to"
            )
        folders.append(folder)
    return folders


def _check_adapters(loras: Sequence[LoraSource], configs: Sequence[dict[str, Any]]) -> list[_Target]:
    """The shared target modules; one error for adapters of different bases, targets or extra modules."""
    problems = []
    names = {str(c.get("base_model_name_or_path")) for c in configs if c.get("base_model_name_or_path")}
    if len(names) > 1:
        listed = ", ".join(f"{lora.label}: {c.get('base_model_name_or_path')!r}" for lora, c in zip(loras, configs))
        problems.append(f"the adapters were trained on different bases (base_model_name_or_path {listed})")
    for lora, config in zip(loras, configs):
        extra = sorted(set(config.get("modules_to_save") or []))
        extra += [key for key in lora._replaced.values() if not key.endswith(_BASE_LAYER_COPY)]
        if extra:
            problems.append(
                f"{lora.label} saves full modules besides its LoRA factors ({', '.join(extra[:5])}); a merged "
                "adapter carries LoRA factors only: merge into a full model with merge_to, or train the adapters "
                "without modules_to_save"
            )
    first = set(loras[0].targets)
    for lora in loras[1:]:
        if set(lora.targets) != first:
            only_first, only_this = sorted(first - set(lora.targets)), sorted(set(lora.targets) - first)
            problems.append(
                f"{lora.label} targets other modules than {loras[0].label} (only in the first: {only_first[:5]}; "
                f"only in this one: {only_this[:5]}); merge adapters trained with the same target_modules"
            )
    if problems:
        raise CheckpointError("cannot merge these LoRA adapters into one adapter:\n  " + "\n  ".join(problems))
    return [_target(loras[0], key) for key in loras[0].targets]


def _target(lora: LoraSource, base_key: str) -> _Target:
    update = lora._updates[base_key]  # LoraSource's index of the factors (same package)
    module = re.sub(r"\.lora_(embedding_)?A(\.weight)?$", "", update.a_key)
    module = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
    return _Target(base_key, module, update.a_key, update.b_key, update.transpose)


# ---- the factors ---------------------------------------------------------------------------------
def _oriented(matrix: torch.Tensor, target: _Target) -> torch.Tensor:
    """A weight's update in PEFT's factor layout, ``B @ A`` (embeddings and Conv1D store it transposed)."""
    return matrix.T if target.transpose else matrix


def _factors_of(lora: LoraSource, target: _Target) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One adapter's ``A``, ``B`` (float32) and scaling for a target."""
    update = lora._updates[target.base_key]
    a = lora._adapter.get(update.a_key).to(torch.float32)
    b = lora._adapter.get(update.b_key).to(torch.float32)
    return a, b, update.scaling


def _rank_of(lora: LoraSource, target: _Target) -> int:
    return lora._adapter.spec(lora._updates[target.base_key].a_key).shape[0]


def _factor_dtype(lora: LoraSource, target: _Target) -> torch.dtype:
    """The adapters' own dtype (float32, or bf16/fp16 for adapters saved so), for the written factors."""
    dtype = lora._adapter.spec(target.a_key).dtype
    return dtype if dtype.is_floating_point else torch.float32


# What the producers yield, one module at a time: (key, B, A, lam * tau_m in B @ A's layout).
ModuleFactors = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]


def _concat_factors(loras: Sequence[LoraSource], targets: Sequence[_Target], lam: float, weight: float) -> Iterator[ModuleFactors]:
    """``lam * sum_i weight * s_i B_i A_i`` as one product of stacked factors: exact, rank ``sum r_i``."""
    for target in targets:
        parts = [_factors_of(lora, target) for lora in loras]
        a = torch.cat([p[0] for p in parts], dim=0)
        b = torch.cat([p[1] * (lam * weight * p[2]) for p in parts], dim=1)
        wanted = sum(p[1] @ p[0] * (lam * weight * p[2]) for p in parts)
        yield target.base_key, b, a, wanted


def _svd_factors(
    loras: Sequence[LoraSource], targets: Sequence[_Target], spec: MergeSpec, lam: float, rank: int | None,
    device: str | torch.device | None, report: LoraMergeReport, exact: bool,
) -> Iterator[ModuleFactors]:
    """The engine's tau_m of the target weights; ``lam * tau_m`` cut to rank r by a truncated SVD.

    ``r`` is ``rank``, or the sum of the adapters' ranks of the module (a sum of rank-r_i
    updates fits in it exactly; trim and sign election make tau_m's rank higher), capped by
    the matrix's smaller side. ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``: the best rank-r
    approximation (Eckart-Young), balanced between the two factors.
    """
    keys = [t.base_key for t in targets]
    deltas = [_DeltaSource(lora, keys) for lora in loras]
    merger = TaskVectorMerger(_Zeros(deltas[0]), deltas, spec, device=device)
    report.merge = MergeReport.from_plan(merger.plan, report.method, report.params, [d.label for d in deltas], lam=lam)
    by_key = {t.base_key: t for t in targets}
    for key, tau in merger:
        wanted = _oriented(tau * lam, by_key[key])
        r = min(rank or sum(_rank_of(lora, by_key[key]) for lora in loras), *wanted.shape)
        u, s, vh = _truncated_svd(wanted, r, exact)
        root = s.sqrt()
        yield key, u * root, root[:, None] * vh, wanted
    report.merge.thresholds = [t.value for t in merger.thresholds] if merger.thresholds else None


def _truncated_svd(matrix: torch.Tensor, r: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``r`` singular triplets: a full SVD, or a randomized one where ``r`` is small next to the matrix.

    The randomized one (Halko, Martinsson and Tropp, 2011) finds the range of ``matrix`` from
    ``r + 10`` random directions refined by 4 subspace iterations, then takes the exact SVD of
    the small projected matrix. Seeded with its own generator: the same input gives the same
    adapter, and the caller's random state is left alone.
    """
    m, n = matrix.shape
    columns = r + _OVERSAMPLE
    if exact or 4 * columns > min(m, n):
        u, s, vh = svd(matrix)
        return u[:, :r], s[:r], vh[:r]
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    sketch = torch.randn(n, columns, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(_POWER_ITERATIONS):  # re-orthonormalised each time: plain powers lose the small directions
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = svd(basis.T @ matrix)
    return (basis @ u)[:, :r], s[:r], vh[:r]


def _measured(report: LoraMergeReport, produced: Iterable[ModuleFactors], dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors in the written dtype, on the CPU; rank and relative error of each module measured on them.

    Each module's ``lam * tau_m`` is dropped once measured: only the factors (the adapter's size) are kept.
    """
    factors = {}
    lost = total = 0.0
    for key, b, a, wanted in produced:
        b, a = b.to(dtype), a.to(dtype)
        miss = torch.linalg.matrix_norm(wanted - b.to(wanted.dtype) @ a.to(wanted.dtype)).item()
        norm = torch.linalg.matrix_norm(wanted).item()
        report.ranks[key] = a.shape[0]
        report.errors[key] = miss / norm if norm > 0 else float(miss > 0)
        lost, total = lost + miss**2, total + norm**2
        factors[key] = (b.cpu(), a.cpu())
    report.error = math.sqrt(lost / total) if total > 0 else 0.0
    report.rank = Counter(report.ranks.values()).most_common(1)[0][0]
    return factors


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


# ---- writing -------------------------------------------------------------------------------------
def _write_weights(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], targets: Sequence[_Target]) -> None:
    tensors = {}
    for target in targets:
        b, a = factors[target.base_key]
        tensors[target.a_key], tensors[target.b_key] = a.contiguous(), b.contiguous()
    specs = {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with SafetensorsWriter(path, specs, owner_metadata()) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)


def _adapter_config(configs: Sequence[dict[str, Any]], report: LoraMergeReport, targets: Sequence[_Target]) -> dict[str, Any]:
    """The first adapter's config with the merged rank, and lora_alpha == r so that PEFT's scaling is 1."""
    config = dict(configs[0])
    names = [c.get("base_model_name_or_path") for c in configs if c.get("base_model_name_or_path")]
    pattern = {re.escape(t.module): report.ranks[t.base_key] for t in targets if report.ranks[t.base_key] != report.rank}
    config.update(
        r=report.rank, lora_alpha=report.rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
        use_rslora=False, use_dora=False, init_lora_weights=True, modules_to_save=None,
        base_model_name_or_path=names[0] if names else None, inference_mode=True,
    )
    return config


def _card(report: LoraMergeReport, folders: Sequence[Path], base_name: str | None, output: Path) -> ModelCard:
    """The card: sources with their sha256, and the modules with the largest reconstruction errors."""
    weights = [f / ADAPTER_WEIGHTS for f in folders]
    models = [{"source": str(w.parent), "files": {str(w): sha256_file(w)}} for w in weights if w.is_file()]
    worst = sorted(report.errors.items(), key=lambda kv: -kv[1])[:10]
    rows = [f"| `{key}` | {report.ranks[key]} | {error:.3g} |" for key, error in worst]
    table = "\n".join(["| module | rank | relative error |", "|---|---|---|", *rows])
    card = build_model_card(
        title=f"Merged LoRA adapter ({report.method})",
        method=report.method,
        summary=(
            f"A LoRA adapter merging {len(folders)} adapters with `{report.method}` (lam={report.lam}), "
            f"factored by {report.factorization} to r={report.rank}. Load it with "
            "`PeftModel.from_pretrained(base_model, folder)`."
        ),
        models=models,
        sections=[("Reconstruction error", f"Overall relative error {report.error:.3g}; the largest:\n\n{table}")],
        tags=["lora", "peft"],
        relative_to=output.parent,
    )
    card.data.base_model = base_name
    return card
