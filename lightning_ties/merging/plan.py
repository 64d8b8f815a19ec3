"""Which keys get merged, which come from base, and why: decided from shapes and dtypes only."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from .sources import TensorSource

Patterns = str | re.Pattern[str] | Sequence[str | re.Pattern[str]] | None


@dataclass
class MergePlan:
    """The outcome of matching a base against N models, before any tensor is read.

    Attributes:
        keys: the output's keys, in base order.
        merge_keys: keys merged from the task vectors (floating, present everywhere, same shape).
        skipped: every key that is *not* merged, with the reason (taken from base, or dropped
            when base lacks it).
        numel: number of merged entries (the size of the "whole vector" of the global trim).
        aliases: tied weights of base, second name -> first name (one tensor under two
            names): only the first is merged, and the second gets the same merged tensor.
    """

    keys: list[str]
    merge_keys: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    numel: int = 0
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def mismatched(self) -> dict[str, str]:
        """Skipped keys that differ across models (task heads, missing entries): worth a warning."""
        return {k: r for k, r in self.skipped.items() if r.startswith(("missing", "shape", "not in base"))}


def compile_patterns(patterns: Patterns, what: str) -> list[re.Pattern[str]]:
    """Compile one regex or a list of them: the one pattern compiler of the package.

    Compiled patterns pass through unchanged (options compile theirs once).

    A bad one is a ValueError naming the argument ``what``, the pattern (with its index in a
    list) and how to fix it, so callers (include/exclude, heads, groups, configs) never let a
    ``re.error`` traceback escape.

    Example:
        >>> [p.pattern for p in compile_patterns(["^head", "bias$"], "exclude")]
        ['^head', 'bias$']
        >>> compile_patterns(["ok", "("], "include")
        Traceback (most recent call last):
        ...
        ValueError: include[1]='(' is not a valid regular expression (missing ), unterminated subpattern at position 0); escape special characters such as ( [ . + * with a backslash
    """
    if patterns is None:
        return []
    single = isinstance(patterns, (str, re.Pattern))
    compiled = []
    for i, p in enumerate([patterns] if single else patterns):
        if isinstance(p, re.Pattern):  # compiled once already (MergeOptions)
            compiled.append(p)
            continue
        if not isinstance(p, str):
            raise ValueError(f"{what}: expected a regular expression (a string) or a list of them, got {p!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            where = what if single else f"{what}[{i}]"
            raise ValueError(
                f"{where}={p!r} is not a valid regular expression ({err}); escape special characters "
                "such as ( [ . + * with a backslash"
            ) from None
    return compiled


def plan_merge(
    base: TensorSource,
    models: Sequence[TensorSource],
    include: Patterns = None,
    exclude: Patterns = None,
    warn: bool = True,
) -> MergePlan:
    """Decide, from specs only, which keys are merged.

    A key is merged when it matches ``include`` (regex search; all keys when ``None``), does not
    match ``exclude``, is floating point in base, and every model has it with base's shape.
    Keys that differ across models (typically task-specific heads) are taken from base and
    reported with a warning naming them (``warn=False`` for callers that report heads
    themselves); when ``include`` names such a key explicitly, it is an error. A model whose
    shapes differ from base's on more than half of the floating keys they share is refused:
    that is a checkpoint of another architecture, not a model with a few task heads. Tied
    weights of base (``base.aliases``) are merged once under their first name.

    Example:
        >>> from lightning_ties.merging.sources import StateDictSource
        >>> import torch
        >>> b = StateDictSource({"w": torch.zeros(2), "n": torch.zeros((), dtype=torch.long)})
        >>> plan_merge(b, [b]).merge_keys
        ['w']
    """
    if not models:
        raise ValueError("no models to merge: pass at least one fine-tuned model")
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    model_keys = [set(m.keys()) for m in models]
    plan = MergePlan(keys=list(base.keys()), merge_keys=[], aliases=dict(getattr(base, "aliases", None) or {}))
    asked_but_unmergeable: list[str] = []
    shared = [0] * len(models)  # per model: selected floating keys of base it also has
    reshaped: list[list[str]] = [[] for _ in models]  # ... and those it has with another shape
    for key in plan.keys:
        if key in plan.aliases:
            first = plan.aliases[key]
            plan.skipped[key] = f"tied to {first!r} (one tensor under two names: merged once, same value)"
            continue
        if (inc and not any(p.search(key) for p in inc)) or any(p.search(key) for p in exc):
            plan.skipped[key] = "not selected by include/exclude (from base)"
            continue
        spec = base.spec(key)
        if not spec.is_floating:
            plan.skipped[key] = f"not floating point ({spec.dtype}; from base)"
            continue
        for i, (m, ks) in enumerate(zip(models, model_keys)):
            if key in ks:
                shared[i] += 1
                if m.spec(key).shape != spec.shape:
                    reshaped[i].append(key)
        missing = [m.label for m, ks in zip(models, model_keys) if key not in ks]
        if missing:
            plan.skipped[key] = f"missing from {', '.join(missing)} (from base)"
        else:
            reason = _shape_or_dtype_problem(key, base, models)
            if reason is None:
                plan.merge_keys.append(key)
                plan.numel += spec.numel
                continue
            plan.skipped[key] = reason
        if inc:
            asked_but_unmergeable.append(f"{key}: {plan.skipped[key]}")
    foreign = [
        f"{m.label}: {len(bad)} of the {n} floating keys it shares with base differ in shape "
        f"(e.g. {', '.join(repr(k) for k in bad[:3])})"
        for m, n, bad in zip(models, shared, reshaped)
        if 2 * len(bad) > n
    ]
    if foreign:
        raise ValueError(
            "is this checkpoint of another architecture? most shared keys differ in shape from base's: "
            + "; ".join(foreign)
            + ". Merge only checkpoints fine-tuned from this base (or exclude the differing keys)"
        )
    base_keys = set(plan.keys)
    for m, ks in zip(models, model_keys):
        for key in sorted(ks - base_keys):
            plan.skipped.setdefault(key, f"not in base (dropped; present in {m.label})")
    if asked_but_unmergeable:
        raise ValueError("keys selected by include cannot be merged:\n  " + "\n  ".join(asked_but_unmergeable))
    if not plan.merge_keys:
        hint = prefix_hint(base_keys, models)
        raise ValueError(
            "nothing to merge: no floating-point key is shared by base and every model with the same "
            "shape " + (f"({hint})" if hint else "(check include/exclude and that the models come from this base)")
        )
    if warn and plan.mismatched:
        shown = "; ".join(f"{k} ({r})" for k, r in list(plan.mismatched.items())[:10])
        more = len(plan.mismatched) - 10
        warnings.warn(
            f"{len(plan.mismatched)} key(s) differ across models and are not merged: {shown}"
            + (f"; and {more} more (see the result's report)" if more > 0 else ""),
            stacklevel=3,
        )
    return plan


def key_prefix(keys: set[str], onto: set[str]) -> tuple[str, str] | None:
    """The one prefix that maps ``keys`` onto ``onto``: ``("strip", p)`` when ``keys`` are ``onto``'s
    with ``p`` in front, ``("add", p)`` when ``onto``'s carry it; None when no prefix or several do.

    A prefix (one or two leading dotted parts, such as a LightningModule's ``model.``) maps when
    it makes at least half of the smaller key set match.

    Example:
        >>> key_prefix({"model.w", "model.b"}, {"w", "b", "head"})
        ('strip', 'model.')
        >>> key_prefix({"w"}, {"net.w"}), key_prefix({"w"}, {"v"})
        (('add', 'net.'), None)
    """
    need = max(1, (min(len(keys), len(onto)) + 1) // 2)
    found = []
    for how, have, want in (("strip", keys, onto), ("add", onto, keys)):
        prefixes = {".".join(k.split(".")[:n]) + "." for k in have for n in (1, 2) if k.count(".") >= n}
        for p in sorted(prefixes):
            if len({k[len(p):] for k in have if k.startswith(p)} & want) >= need:
                found.append((how, p))
    return found[0] if len(found) == 1 else None


def prefix_hint(base_keys: set[str], models: Sequence[TensorSource]) -> str:
    """Why nothing matched when the keys differ by a prefix: the source, the prefix and the fix ("" if not)."""
    for m in models:
        found = key_prefix(set(m.keys()), base_keys)
        if found is None:
            continue
        how, p = found
        carrier = m.label if how == "strip" else "base"
        return (
            f"the keys of {carrier} carry the prefix {p!r} that the others lack (such as a LightningModule's "
            f"self.model): pass prefix={p!r} to strip it when reading .ckpt files, or prefix='auto' to find it; "
            "it is not applied silently"
        )
    return ""


def _shape_or_dtype_problem(key: str, base: TensorSource, models: Sequence[TensorSource]) -> str | None:
    base_spec = base.spec(key)
    for m in models:
        spec = m.spec(key)
        if spec.shape != base_spec.shape:
            return f"shape differs: base {tuple(base_spec.shape)} vs {m.label} {tuple(spec.shape)} (from base)"
        if not spec.is_floating:
            return f"not floating point in {m.label} ({spec.dtype}; from base)"
    return None
