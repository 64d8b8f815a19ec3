"""Up-front checks from headers only, and the opt-in that merges the rows two vocabularies share.

A merge of several large files should fail in the first second, with every problem listed
at once, rather than after minutes on the first bad key. Everything here reads shapes and
dtypes only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..merging.plan import Patterns, prefix_hint
from ..merging.sources import TensorSource, TensorSpec
from .errors import CheckpointError


class MergeInputError(ValueError):
    """The models cannot be merged as given; the message lists every offending key."""


#: The floating-point dtypes a merge computes with (float8 has no arithmetic in torch's promotion rules).
MERGEABLE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(source: TensorSource) -> TensorSource:
    """Refuse, at open time, a checkpoint whose weights cannot be merged; returns ``source``.

    float8 and complex tensors have no merge arithmetic here, and a checkpoint holding integer
    tensors only (a quantized model) has nothing to merge: either is one error naming the
    checkpoint, a few keys and what to do. Reads headers only.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> check_dtypes(StateDictSource({"w": torch.zeros(2).to(torch.float8_e4m3fn)}, "fp8.safetensors"))
        Traceback (most recent call last):
        ...
        lightning_ties.io.errors.CheckpointError: fp8.safetensors: tensors of a dtype lightning-ties cannot merge: w (torch.float8_e4m3fn); it merges float64, float32, float16 and bfloat16 weights: convert the checkpoint (e.g. to bfloat16) first
    """
    specs = {k: source.spec(k) for k in source.keys()}
    bad = [f"{k} ({s.dtype})" for k, s in specs.items() if s.dtype.is_complex or (s.is_floating and s.dtype not in MERGEABLE_DTYPES)]
    if bad:
        raise CheckpointError(
            f"{source.label}: tensors of a dtype lightning-ties cannot merge: {', '.join(bad[:5])}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; it merges float64, float32, float16 and bfloat16 weights: convert the checkpoint (e.g. to bfloat16) first"
        )
    if specs and not any(s.is_floating for s in specs.values()):
        dtypes = sorted({str(s.dtype) for s in specs.values()})
        raise CheckpointError(
            f"{source.label}: holds no floating-point tensor (only {', '.join(dtypes)}), so there is nothing to merge; "
            "a quantized checkpoint? Dequantize it to float16, bfloat16 or float32 first"
        )
    return source


def _patterns(patterns: Patterns) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    return [re.compile(p) for p in ([patterns] if isinstance(patterns, str) else patterns)]


def _rows_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 1 and a[0] != b[0] and a[1:] == b[1:]


def coverage_problem(label: str, matched: int, source_keys: int, module_keys: int, minimum: float = 0.5) -> str | None:
    """Why a source matched to a module looks mostly foreign (None: it covers enough of both sides).

    ``matched`` source keys land on module keys (after any renaming), out of ``source_keys``
    float keys in the source and ``module_keys`` in the module. Measuring the source side only
    accepts a checkpoint of another model whose few keys happen to match; both fractions must
    reach ``minimum``.

    Example:
        >>> coverage_problem("task a", matched=10, source_keys=12, module_keys=100)
        "task a: only 10 of the module's 100 float keys (10%) are in it (10 of its 12 keys match); at least 50% of both are needed. Is it a checkpoint of this model? If only part of the model was fine-tuned, merge that part with include=[...]"
        >>> coverage_problem("task a", matched=90, source_keys=100, module_keys=100) is None
        True
    """
    of_source = matched / source_keys if source_keys else 0.0
    of_module = matched / module_keys if module_keys else 0.0
    if of_source >= minimum and of_module >= minimum:
        return None
    return (
        f"{label}: only {matched} of the module's {module_keys} float keys ({of_module:.0%}) are in it "
        f"({matched} of its {source_keys} keys match); at least {minimum:.0%} of both are needed. Is it a checkpoint "
        "of this model? If only part of the model was fine-tuned, merge that part with include=[...]"
    )


def check_compatible(
    base: TensorSource, models: Sequence[TensorSource], include: Patterns = None, exclude: Patterns = None
) -> None:
    """Raise one :class:`MergeInputError` listing every selected key the models cannot merge.

    A key is checked when ``include``/``exclude`` select it and it is floating point in base;
    every model must then have it, with base's shape, as a floating-point tensor. Reads
    headers only.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> base = StateDictSource({"emb": torch.zeros(4, 2)}, "base")
        >>> check_compatible(base, [StateDictSource({"emb": torch.zeros(5, 2)}, "ft.safetensors")])
        Traceback (most recent call last):
        ...
        lightning_ties.io.validate.MergeInputError: 1 key(s) cannot be merged:
          emb: base (4, 2) vs ft.safetensors (5, 2): row counts differ (vocabulary size?); pass common_rows=True to merge the rows they share
        Fix the inputs, exclude these keys (exclude=[...]), or pass on_mismatch='base' to take them from base.
    """
    inc, exc = _patterns(include), _patterns(exclude)
    model_keys = [set(m.keys()) for m in models]
    problems: list[str] = []
    for key in base.keys():
        if (inc and not any(p.search(key) for p in inc)) or any(p.search(key) for p in exc):
            continue
        want = base.spec(key)
        if not want.is_floating:
            continue
        for model, keys in zip(models, model_keys):
            problem = _problem(key, want, model, keys)
            if problem:
                problems.append(f"{key}: {problem}")
    if problems:
        hint = prefix_hint(set(base.keys()), models)  # keys that differ only by a prefix: say which, and the fix
        raise MergeInputError(
            f"{len(problems)} key(s) cannot be merged:\n  "
            + "\n  ".join(problems)
            + (f"\nThe keys differ by a prefix: {hint}." if hint else
               "\nFix the inputs, exclude these keys (exclude=[...]), or pass on_mismatch='base' to take them from base.")
        )


def _problem(key: str, want: TensorSpec, model: TensorSource, keys: set[str]) -> str | None:
    if key not in keys:
        return f"missing from {model.label}"
    got = model.spec(key)
    if got.shape != want.shape:
        hint = (
            ": row counts differ (vocabulary size?); pass common_rows=True to merge the rows they share"
            if _rows_only(got.shape, want.shape)
            else ""
        )
        return f"base {want.shape} vs {model.label} {got.shape}{hint}"
    if not got.is_floating:
        return f"{model.label} stores it as {got.dtype}, not floating point"
    return None


class CommonRowsSource:
    """A model seen with base's row count wherever the two differ only in rows (vocabulary size).

    Extra rows of the model are dropped; rows it lacks are filled with base's, so its task
    vector there is zero and the merge keeps base's values (the paper's code merges the
    shared rows of T5 vocabularies the same way). ``aligned`` lists the adjusted keys.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> base = StateDictSource({"emb": torch.zeros(3, 2)})
        >>> ft = CommonRowsSource(StateDictSource({"emb": torch.ones(4, 2)}, "ft"), base)
        >>> ft.get("emb").shape, ft.aligned
        (torch.Size([3, 2]), ['emb'])
    """

    def __init__(self, model: TensorSource, base: TensorSource) -> None:
        self.model = model
        self.base = base
        self.label = model.label
        base_keys = set(base.keys())
        self.aligned = [
            k for k in model.keys() if k in base_keys and _rows_only(model.spec(k).shape, base.spec(k).shape)
        ]
        self._aligned = set(self.aligned)

    def __getattr__(self, name: str) -> object:  # files, prefix, folder... of the wrapped source
        try:
            wrapped = self.__dict__["model"]
        except KeyError:  # not initialised yet (copy, pickle)
            raise AttributeError(name) from None
        return getattr(wrapped, name)

    def keys(self) -> Sequence[str]:
        return self.model.keys()

    def spec(self, key: str) -> TensorSpec:
        spec = self.model.spec(key)
        if key in self._aligned:
            return TensorSpec(self.base.spec(key).shape, spec.dtype)
        return spec

    def get(self, key: str) -> torch.Tensor:
        value = self.model.get(key)
        if key not in self._aligned:
            return value
        rows = self.base.spec(key).shape[0]
        if value.shape[0] >= rows:
            return value[:rows]
        return torch.cat([value, self.base.get(key)[value.shape[0]:].to(value.dtype)])
