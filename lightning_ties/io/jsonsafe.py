"""JSON with bounded nesting: a nesting bomb is one clear error naming the file, never a RecursionError.

Every JSON file lightning-ties reads (safetensors headers, Hugging Face indexes,
``adapter_config.json``, task store indexes, manifests) goes through :func:`loads`. A nesting
deeper than :data:`MAX_DEPTH` is refused, whether the parser gives up on it or not.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import CheckpointError

#: The deepest nesting accepted; real checkpoint metadata nests 3 or 4 levels.
MAX_DEPTH = 64


class JSONNestingError(CheckpointError):
    """A JSON file nests deeper than :data:`MAX_DEPTH` (the message names the file)."""


def nesting_depth(value: Any) -> int:
    """The deepest list/dict nesting of a parsed JSON value, measured without recursion.

    Example:
        >>> nesting_depth({"a": [1, [2]], "b": "[[["})
        3
    """
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item if isinstance(v, (list, dict)))
    return deepest


def loads(data: bytes | str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth``, naming ``where``.

    The C parser stops a deep bomb with ``RecursionError``; anything it accepts is then measured
    iteratively, so no later walk of the result recurses deeper than ``max_depth``. Other JSON
    errors are raised as ``json.JSONDecodeError`` (a ``ValueError``) for the caller to phrase.

    Example:
        >>> loads('{"a": [1]}', "x.json")
        {'a': [1]}
        >>> loads("[" * 100 + "]" * 100, "bomb.json")
        Traceback (most recent call last):
        ...
        lightning_ties.io.jsonsafe.JSONNestingError: bomb.json: JSON nested more than 64 levels deep; the file is corrupt or hostile: replace it
    """
    try:
        value = json.loads(data)
        deep = nesting_depth(value) > max_depth
    except RecursionError:
        deep = True
    if deep:
        raise JSONNestingError(f"{where}: JSON nested more than {max_depth} levels deep; the file is corrupt or hostile: replace it")
    return value


__all__ = ["MAX_DEPTH", "JSONNestingError", "loads", "nesting_depth"]
