"""Groups of parameters that share one learned coefficient per task (``granularity``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...merging.plan import Patterns, compile_patterns

GRANULARITIES = ("task", "layer", "tensor")


def default_group(key: str) -> str:
    """The block a key belongs to: its prefix through the first numeric part, else its parent module's.

    Example:
        >>> default_group("encoder.layer.3.attention.self.query.weight")
        'encoder.layer.3.'
        >>> default_group("embeddings.word_embeddings.weight"), default_group("bert.pooler.dense.bias")
        ('embeddings.', 'bert.pooler.')
    """
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    if len(parts) == 1:
        return key
    # "emb.word.weight" -> "emb.", "head.weight" -> "head.": one level above the tensor's own module
    return ".".join(parts[: max(1, len(parts) - 2)]) + "."


def group_keys(keys: Sequence[str], granularity: str, patterns: Patterns = None) -> tuple[list[str], list[int]]:
    """Group names and, per key, the index of its group.

    ``"task"``: one group; ``"tensor"``: one per key; ``"layer"``: the text matched by the first
    of ``patterns`` (regexes, searched in the key) that matches, else :func:`default_group`.

    Example:
        >>> group_keys(["l.0.w", "l.0.b", "l.1.w", "out.w"], "layer")
        (['l.0.', 'l.1.', 'out.'], [0, 0, 1, 2])
    """
    check_granularity(granularity)
    if granularity == "task":
        return ["all"], [0] * len(keys)
    if granularity == "tensor":
        return list(keys), list(range(len(keys)))
    compiled = compile_patterns(patterns, "group")
    used = [False] * len(compiled)
    labels = []
    for key in keys:
        label = None
        for i, pattern in enumerate(compiled):
            match = pattern.search(key)
            if match:
                label, used[i] = match.group(0), True
                break
        labels.append(label if label is not None else default_group(key))
    unused = [p.pattern for p, u in zip(compiled, used) if not u]
    if unused:
        raise ValueError(
            f"group pattern(s) {unused} match no merged key; merged keys look like {list(keys)[:3]}"
        )
    groups = list(dict.fromkeys(labels))
    index = {g: i for i, g in enumerate(groups)}
    return groups, [index[g] for g in labels]


def check_granularity(granularity: str, allowed: Sequence[str] = GRANULARITIES) -> None:
    if granularity not in allowed:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(allowed)}")


def expand_coefficients(coarse: torch.Tensor, coarse_index: Sequence[int], fine_index: Sequence[int]) -> torch.Tensor:
    """Coarse coefficients ``[tasks, coarse groups]`` as finer ones: each fine group takes its coarse group's value.

    ``coarse_index[i]`` / ``fine_index[i]`` are key i's group under each granularity (:func:`group_keys`);
    every fine group must lie inside one coarse group (a tensor inside its layer, a layer inside the task).

    Example:
        >>> expand_coefficients(torch.tensor([[0.5, 2.0]]), [0, 0, 1], [0, 1, 2])
        tensor([[0.5000, 0.5000, 2.0000]])
    """
    if len(coarse_index) != len(fine_index):
        raise ValueError(f"group indices of {len(coarse_index)} and {len(fine_index)} keys: they must cover the same keys")
    parent: dict[int, int] = {}
    for c, f in zip(coarse_index, fine_index):
        if parent.setdefault(f, c) != c:
            raise ValueError(f"fine group {f} spans coarse groups {parent[f]} and {c}: it must lie inside one")
    order = [parent[f] for f in range(len(parent))]
    return coarse[:, order].clone()


__all__ = ["GRANULARITIES", "check_granularity", "default_group", "expand_coefficients", "group_keys"]
