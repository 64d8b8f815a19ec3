"""Match a checkpoint's keys to a module's own ``state_dict`` keys, never by guessing.

Inside Lightning, a task (or base) checkpoint must line up with the module being trained or
evaluated. People save in three ways, and each maps onto the module in one way:

- a ``.ckpt`` of the same LightningModule (``trainer.save_checkpoint``, ``ModelCheckpoint``)
  holds the module's keys as they are (``net.0.weight``): used as is;
- the inner model alone (``self.model.save_pretrained(folder)``, ``save_file(self.model.state_dict())``,
  an in-memory ``self.model``) lacks the attribute: its keys are mapped under the module's
  sub-prefix (``model.`` + key);
- a ``.ckpt`` of a wrapper loaded into the inner model has a prefix the module lacks: it is
  removed (``model.bert.x`` -> ``bert.x``), and a wrapper of another attribute name maps both
  ways (``net.x`` -> ``model.x``).

:func:`match_to_module` finds the one mapping (strip ``S`` from the source's keys, add ``P``)
that lands the most source keys on module keys. The identity wins when it is among the best;
several different best mappings (a module holding two copies of the architecture, say
``student.`` and ``teacher.``) or none covering half of the source are one error that shows
keys of both sides and what to pass. To choose by hand, give the source as a dict::

    {"path": "runs/a/", "prefix": "student."}    # module key = "student." + source key
    {"path": "runs/a.ckpt", "strip": "model."}   # module key = source key without "model."

(both may be given). The standalone API (``open_source``, ``ties_merge("a.ckpt", ...)``) keeps
a Lightning ``.ckpt``'s keys as saved; this matching is what the Lightning layer does.

Example:
    >>> import torch
    >>> inner = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}
    >>> matched = match_to_module(inner, ["net.0.weight", "net.0.bias"])
    >>> sorted(matched.keys())
    ['net.0.bias', 'net.0.weight']
    >>> matched.get("net.0.bias")
    tensor([0., 0.])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..distributed.views import read_rows
from ..io.validate import coverage_problem
from ..merging.sources import TensorSource, TensorSpec, as_source, read_strided

#: Keys a source given as a dict may carry besides ``path``.
SPEC_KEYS = ("path", "prefix", "strip")
#: A mapping is accepted only when it lands at least this share of the (stripped) source keys.
MIN_COVERAGE = 0.5


class KeyMatchError(ValueError):
    """A source's keys cannot be matched to the module's (no mapping fits, or several do)."""


class MatchedSource:
    """A source seen under the module's key names (renamed lazily; no tensor is read here).

    Attributes:
        source: the wrapped source; strip, prefix: how its keys were mapped
        (module key = ``prefix`` + source key without ``strip``).
    """

    def __init__(
        self, source: TensorSource, mapping: Mapping[str, str], strip: str = "", prefix: str = "",
        ties: Mapping[str, str] | None = None,
    ) -> None:
        self.source = source
        self.label = source.label
        self.strip, self.prefix = strip, prefix
        self._to_source = dict(mapping)
        self._ties = dict(ties or {})  # tied weights the module knows of (see with_ties)

    def keys(self) -> Sequence[str]:
        return list(self._to_source)

    def tied(self, ties: Mapping[str, str]) -> MatchedSource:
        """This source with ``ties`` (module names, second -> first) added to the tied weights it knows of."""
        return MatchedSource(self.source, self._to_source, self.strip, self.prefix, {**self._ties, **ties})

    @property
    def aliases(self) -> dict[str, str]:
        """The wrapped source's tied weights (second name -> first), under the module's names."""
        to_module = {source_key: key for key, source_key in self._to_source.items()}
        wrapped = getattr(self.source, "aliases", None) or {}
        own = {to_module[k]: to_module[first] for k, first in wrapped.items() if k in to_module and first in to_module}
        return {**self._ties, **own}

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(self._to_source[key])

    def get(self, key: str) -> torch.Tensor:
        return self.source.get(self._to_source[key])

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dimension 0, read per row range where the wrapped source can (sharded merges)."""
        return read_rows(self.source, self._to_source[key], start, stop)

    def get_strided(self, key: str, first: int, stride: int) -> torch.Tensor:
        """``get(key).reshape(-1)[first::stride]``, read by the wrapped source where it can (the global trim's sample)."""
        return read_strided(self.source, self._to_source[key], first, stride)

    def __getattr__(self, name: str) -> Any:  # files, folder, hyper_parameters... of the wrapped source
        if name.startswith("_") or name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def module_ties(module: nn.Module) -> dict[str, str]:
    """The module's tied weights: each later state-dict name of a parameter or buffer -> its first name.

    By object (``state_dict(keep_vars=True)``), so a module on the meta device, whose tensors have no storage,
    is read right.

    Example:
        >>> net = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
        >>> net[1].weight = net[0].weight
        >>> module_ties(net)
        {'1.weight': '0.weight'}
    """
    first: dict[int, str] = {}
    ties = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            ties[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return ties


def held_names(names: Iterable[str], ties: Mapping[str, str]) -> dict[str, str]:
    """Each key held in ``names``, and each key tied to one held (``ties``: second name -> first), -> the name it
    is held under: a checkpoint of tied weights may hold one name only (``save_pretrained`` drops ``lm_head``).

    Example:
        >>> held_names(["emb", "body"], {"out": "emb"})
        {'emb': 'emb', 'body': 'body', 'out': 'emb'}
    """
    held = {name: name for name in names}
    for key, first in ties.items():
        name = held.get(key, held.get(first))
        if name is not None:
            held.setdefault(key, name)
            held.setdefault(first, name)
    return held


def with_ties(source: TensorSource, ties: Mapping[str, str]) -> TensorSource:
    """``source`` (with the module's key names) whose tied weights include the module's ``ties`` it holds both names
    of: a file stores a tied tensor under each name, and the merge must still merge it once, as the module holds it.

    Example:
        >>> from lightning_ties.merging import as_source
        >>> src = with_ties(as_source({"emb": torch.ones(2), "out": torch.ones(2)}), {"out": "emb"})
        >>> src.aliases
        {'out': 'emb'}
    """
    held = set(source.keys())
    own = getattr(source, "aliases", None) or {}
    named = set(own) | set(own.values())  # a tie the source knows already, in either order: never a second one
    extra = {k: first for k, first in ties.items() if {k, first} <= held and not {k, first} & named}
    if not extra:
        return source
    if isinstance(source, MatchedSource):
        return source.tied(extra)
    return MatchedSource(source, {k: k for k in source.keys()}, ties=extra)


def module_keys_of(module: nn.Module | Mapping[str, Any] | Iterable[str]) -> list[str]:
    """The key names of a module (its ``state_dict``), a state dict, or a list of names."""
    if isinstance(module, nn.Module):
        return list(module.state_dict().keys())
    if isinstance(module, Mapping):
        return list(module.keys())
    return list(module)


def split_spec(obj: Any) -> tuple[Any, str | None, str | None]:
    """``(source, prefix, strip)`` of a source given as ``{"path": ..., "prefix": ..., "strip": ...}``.

    Anything else (a path, module, state dict, source) comes back with ``None, None``.

    Example:
        >>> split_spec({"path": "a/", "prefix": "model."})
        ('a/', 'model.', None)
    """
    if not (isinstance(obj, Mapping) and "path" in obj and not isinstance(obj["path"], torch.Tensor)):
        return obj, None, None
    unknown = sorted(set(obj) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"source {dict(obj)!r}: unknown entries {unknown}; a source dict takes {list(SPEC_KEYS)}")
    for name in ("prefix", "strip"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise ValueError(f"source {dict(obj)!r}: {name} must be a string, got {type(obj[name]).__name__}")
    return obj["path"], obj.get("prefix"), obj.get("strip")


def open_for_module(obj: Any, label: str, base: TensorSource | None = None) -> TensorSource:
    """Open ``obj`` with its keys as saved (a ``.ckpt`` keeps its module attribute prefix)."""
    if isinstance(obj, (str, os.PathLike)):
        kwargs: dict[str, Any] = {"prefix": ""}
        if base is not None:
            kwargs["base"] = base  # a LoRA adapter folder reads as full weights over base
        return as_source(obj, label, **kwargs)
    return as_source(obj, label)


def match_to_module(
    source: Any,
    module_keys: nn.Module | Mapping[str, Any] | Iterable[str],
    prefix: str | None = None,
    strip: str | None = None,
    label: str | None = None,
    base: TensorSource | None = None,
) -> TensorSource:
    """``source`` (path, module, state dict, source or ``{"path", "prefix", "strip"}`` dict) under the module's keys.

    With neither ``prefix`` nor ``strip`` (here or in the dict) the mapping is found by matching
    key sets (see the module docstring); keys that land on no module key are left out. Raises
    :class:`KeyMatchError` (a ``ValueError``) naming both sides' keys and the ``prefix``/``strip``
    to pass when no mapping, or more than one, fits.
    """
    obj, spec_prefix, spec_strip = split_spec(source)
    prefix = spec_prefix if prefix is None else prefix
    strip = spec_strip if strip is None else strip
    name = label or (os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else "source")
    src = open_for_module(obj, name, base)
    wanted = module_keys_of(module_keys)
    target = set(wanted)
    keys = list(src.keys())
    if prefix is not None or strip is not None:
        mapping = _mapping(keys, strip or "", prefix or "", target)
        if not mapping:
            raise KeyMatchError(
                f"{src.label}: with strip={strip or ''!r} and prefix={prefix or ''!r} no key lands on a module key; "
                + _samples(keys, wanted)
            )
        return _wrap(src, mapping, strip or "", prefix or "")
    if keys and all(k in target for k in keys):
        return src  # the module's own keys (a .ckpt of the same module, its state dict)
    strip_, prefix_ = _best_mapping(src.label, keys, wanted)
    mapping = _mapping(keys, strip_, prefix_, target)
    _check_coverage(src, mapping, module_keys)
    return _wrap(src, mapping, strip_, prefix_)


def _check_coverage(src: TensorSource, mapping: Mapping[str, str], module_keys: Any) -> None:
    """Refuse a mostly foreign source: its float keys must cover half of the module's, and half of its own."""
    floats = {k for k in src.keys() if src.spec(k).dtype.is_floating_point}
    matched = sum(1 for k in mapping.values() if k in floats)
    problem = coverage_problem(src.label, matched, len(floats), _float_key_count(module_keys))
    if problem is not None:
        raise KeyMatchError(problem)


def _float_key_count(module_keys: Any) -> int:
    """The module's float keys (all of its names when only names are given)."""
    state = module_keys.state_dict() if isinstance(module_keys, nn.Module) else module_keys
    if isinstance(state, Mapping):
        return sum(1 for v in state.values() if not isinstance(v, torch.Tensor) or v.is_floating_point())
    return len(module_keys_of(state))


def _wrap(src: TensorSource, mapping: dict[str, str], strip: str, prefix: str) -> TensorSource:
    if all(k == v for k, v in mapping.items()) and len(mapping) == len(src.keys()):
        return src
    return MatchedSource(src, mapping, strip, prefix)


def _mapping(keys: Sequence[str], strip: str, prefix: str, target: set[str]) -> dict[str, str]:
    """module key -> source key for the source keys that land on a module key."""
    out = {}
    for k in keys:
        if k.startswith(strip):
            m = prefix + k[len(strip):]
            if m in target:
                out[m] = k
    return out


def _dot_prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ``["", "a.", "a.b."]``: every place a key can be split at a dot."""
    parts = key.split(".")
    return [".".join(parts[:i]) + ("." if i else "") for i in range(len(parts))]


def _best_mapping(label: str, keys: Sequence[str], module_keys: Sequence[str]) -> tuple[str, str]:
    """The (strip, prefix) that lands the most source keys on module keys, or a :class:`KeyMatchError`."""
    target = set(module_keys)
    # Source prefixes worth stripping: those that turn a source key into a module key, and
    # each first segment (a wrapper's attribute, which may map under another name).
    strips = {""}
    for k in keys:
        strips.update(p for p in _dot_prefixes(k)[1:] if k[len(p):] in target)
        if "." in k:
            strips.add(k.split(".", 1)[0] + ".")
    coverage: dict[tuple[str, str], int] = {}
    for s in strips:
        rests = {k[len(s):] for k in keys if k.startswith(s)}
        if not rests:
            continue
        counts: dict[str, int] = {}
        for m in module_keys:
            for p in _dot_prefixes(m):
                rest = m[len(p):]
                # renaming both sides must keep a module path, not only a tensor name ("x.weight" is
                # not "head.weight" by that alone)
                if rest in rests and (not (s and p) or "." in rest):
                    counts[p] = counts.get(p, 0) + 1
        for p, n in counts.items():
            if n >= MIN_COVERAGE * len(rests):
                coverage[(s, p)] = n
    if not coverage:
        raise KeyMatchError(
            f"{label}: its keys do not match the module's: no prefix to add or strip lands half of them on module "
            f"keys. Is it a checkpoint of this model? " + _samples(keys, module_keys)
            + ". If it is, pass it as {'path': ..., 'prefix': <module prefix to add>, 'strip': <its prefix to remove>}"
        )
    top = max(coverage.values())
    best = sorted((c for c, n in coverage.items() if n == top), key=lambda c: (len(c[0]) + len(c[1]), c))
    if ("", "") in best:
        return "", ""
    distinct: list[tuple[str, str]] = []
    seen: list[dict[str, str]] = []
    for s, p in best:
        m = _mapping(keys, s, p, target)
        if m not in seen:
            seen.append(m)
            distinct.append((s, p))
    if len(distinct) > 1:
        options = "; ".join(_describe(s, p) for s, p in distinct[:6])
        raise KeyMatchError(
            f"{label}: its keys match the module's in {len(distinct)} ways ({options}). " + _samples(keys, module_keys)
            + ". Choose one: pass the source as {'path': <path>, " + _spec_text(*distinct[0]) + "} (or the other values)"
        )
    return distinct[0]


def _describe(strip: str, prefix: str) -> str:
    if strip and prefix:
        return f"strip {strip!r} and add {prefix!r}"
    return f"strip {strip!r}" if strip else f"add {prefix!r}"


def _spec_text(strip: str, prefix: str) -> str:
    items = ([f"'prefix': {prefix!r}"] if prefix else []) + ([f"'strip': {strip!r}"] if strip else [])
    return ", ".join(items)


def _samples(keys: Sequence[str], module_keys: Sequence[str]) -> str:
    return f"source keys look like {sorted(keys)[:4]}; module keys look like {sorted(module_keys)[:4]}"


__all__ = ["KeyMatchError", "MatchedSource", "held_names", "match_to_module", "module_keys_of", "module_ties",
           "split_spec", "with_ties"]
