"""A merge's options, checked once: :class:`MergeOptions` (method, k, lam, scope, parameters, keys).

The public entry points (``ties_merge``, ``merge``, ``method_task_vector``, ``merged_task_vector``,
``io.merge_to``) take plain keywords, as users write them, build one :class:`MergeOptions` at
once (every value checked against the method registry, every regex compiled) and pass that
object inward; nothing below re-checks or re-parses, and ``k`` is a named field from the entry
point to the engine's :class:`~lightning_ties.merging.spec.MergeSpec`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .plan import Patterns, compile_patterns
from .registry import MergeMethod, get_method, resolve_method
from .spec import MergeSpec

#: Parameters that are named fields of :class:`MergeOptions` rather than entries of ``params``.
_NAMED = ("k", "scope")


@dataclass(frozen=True, eq=True)
class MergeOptions:
    """One merge's recipe, validated at construction: a bad value fails here, naming it.

    Attributes:
        method: a registered method (:data:`~lightning_ties.merging.registry.METHODS`), or
            ``"auto"``: the best data-free method on record (:data:`~lightning_ties.merging.registry.AUTO_METHOD`).
        k: fraction of each task vector the trim keeps; None: the method's default (None for
            methods without a trim).
        lam: scale of tau_m; None: the method's default. Checked by ``check_lam``.
        scope: ``"global"`` or ``"per_tensor"`` for methods with a scope; None: the method's default.
        params: the method's other parameters (``sign``, ``merge``, ``p``, ``seed``...), each
            name declared by the method and each value one it accepts.
        include, exclude: regexes choosing the merged keys (a string or a list of them), kept
            compiled; a bad one fails naming the pattern.

    After construction ``k``, ``lam`` and ``scope`` hold the resolved values (defaults filled).

    Example:
        >>> opts = MergeOptions("ties", k=0.3, params={"sign": "count"}, exclude=["head"])
        >>> opts.k, opts.lam, opts.scope, opts.spec.sign, [p.pattern for p in opts.exclude]
        (0.3, 1.0, 'global', 'count', ['head'])
        >>> MergeOptions("ties", params={"sign": "bogus"})
        Traceback (most recent call last):
        ...
        ValueError: method 'ties': unknown sign 'bogus'; choose one of 'mass', 'count', 'normfrac', 'normmass'
    """

    method: str = "ties"
    k: float | None = None
    lam: float | None = None
    scope: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    include: Patterns | tuple[re.Pattern[str], ...] = None
    exclude: Patterns | tuple[re.Pattern[str], ...] = None
    _spec: MergeSpec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", resolve_method(self.method))  # "auto": the best data-free method on record
        m = get_method(self.method)
        params = dict(self.params)
        named = [n for n in _NAMED if n in params]
        if named:
            raise ValueError(f"pass {', '.join(named)} as MergeOptions field(s), not inside params")
        declared = m.parameters()
        for name in _NAMED:
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        checked = m.check_params(params)
        for name in _NAMED:
            object.__setattr__(self, name, checked.pop(name, declared.get(name)))
        object.__setattr__(self, "params", MappingProxyType(checked))
        object.__setattr__(self, "lam", m.resolve_lam(self.lam))
        object.__setattr__(self, "include", tuple(compile_patterns(self.include, "include")))
        object.__setattr__(self, "exclude", tuple(compile_patterns(self.exclude, "exclude")))
        if not m.needs_data:  # a method that needs data (RegMean) runs elsewhere: no spec to build
            object.__setattr__(self, "_spec", m.spec(**self.method_params))

    @classmethod
    def from_keywords(
        cls, method: str = "ties", lam: float | None = None, include: Patterns = None, exclude: Patterns = None, **params: Any
    ) -> MergeOptions:
        """The options of a keyword call (``merge(..., method, lam, k=0.3, sign="count")``).

        Example:
            >>> MergeOptions.from_keywords("ties", k=0.5, merge="sum").method_params
            {'k': 0.5, 'scope': 'global', 'sign': 'mass', 'merge': 'sum'}
        """
        named = {n: params.pop(n) for n in _NAMED if n in params}
        return cls(method, lam=lam, params=params, include=include, exclude=exclude, **named)

    def __hash__(self) -> int:
        patterns = tuple(p.pattern for p in (*self.include, *self.exclude))  # type: ignore[union-attr]
        return hash((self.method, self.k, self.lam, self.scope, tuple(self.params.items()), patterns))

    @property
    def merge_method(self) -> MergeMethod:
        """The registry entry of :attr:`method`."""
        return get_method(self.method)

    @property
    def method_params(self) -> dict[str, Any]:
        """Every parameter of the method (defaults filled), in its declared order, k and scope included."""
        values = {**self.params, **{n: getattr(self, n) for n in _NAMED}}
        return {name: values.get(name, default) for name, default in self.merge_method.parameters().items()}

    @property
    def spec(self) -> MergeSpec:
        """The engine's recipe; a method that needs data (RegMean) refuses here with its message."""
        if self._spec is None:
            return self.merge_method.spec(**self.method_params)  # raises the method's own error
        return self._spec

    def replace(self, **changes: Any) -> MergeOptions:
        """A copy with some fields changed, checked again (e.g. another k for a k search).

        Example:
            >>> MergeOptions("ties").replace(k=0.1).k
            0.1
        """
        fields = {
            "method": self.method, "k": self.k, "lam": self.lam, "scope": self.scope, "params": dict(self.params),
            "include": self.include, "exclude": self.exclude,
        }  # fmt: skip
        if "method" in changes and changes["method"] != self.method:  # another method: its own defaults
            fields.update(k=None, lam=None, scope=None, params={})
        fields.update(changes)
        return MergeOptions(**fields)


__all__ = ["MergeOptions"]
