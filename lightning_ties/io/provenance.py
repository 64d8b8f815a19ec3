"""What a resumed search was computed from: a fingerprint of every source, checked at restore.

A search resumed after a task checkpoint changed would reuse candidates scored on the old task.
:func:`fingerprint_sources` records each source (base and every task) at the start;
:func:`check_fingerprints` compares at restore and refuses any difference, naming the source.

* a file: its size and sha256;
* a folder (Hugging Face folder, LoRA adapter): sha256 over every file in it, by relative path;
* tensors in memory (a state dict or module): sha256 over every key, dtype, shape and value.

Example:
    >>> import torch
    >>> saved = fingerprint_sources({"a": {"w": torch.ones(2)}})
    >>> check_fingerprints(saved, fingerprint_sources({"a": {"w": torch.ones(2)}}), "the search progress")
    >>> check_fingerprints(saved, fingerprint_sources({"a": {"w": torch.zeros(2)}}), "the search progress")
    Traceback (most recent call last):
    ...
    lightning_ties.io.provenance.StaleResultError: the search progress was computed from sources that changed since: a (tensors in memory). Its finished candidates were scored on the old weights: restore them, or start the search over (delete the saved progress)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .ownership import MANIFEST, digest


class StaleResultError(ValueError):
    """Saved results were computed from sources that changed since (the message names them)."""


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            if name == MANIFEST or name.startswith("."):
                continue  # our bookkeeping and hidden temporaries are not the model
            path = Path(root) / name
            h.update(f"{path.relative_to(folder).as_posix()}\0{digest(path)['sha256']}\n".encode())
    return h.hexdigest()


def _tensor_fingerprint(state: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(source: Any) -> dict[str, Any]:
    """One source's fingerprint: ``{"kind", "sha256"}`` (+ ``"path"`` and ``"size"`` for files).

    Example:
        >>> import torch
        >>> fingerprint({"w": torch.zeros(1)})["kind"]
        'tensors'
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        if path.is_dir():
            return {"kind": "folder", "path": str(path), "sha256": _folder_fingerprint(path)}
        return {"kind": "file", "path": str(path), **digest(path)}
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    if isinstance(source, Mapping):
        return {"kind": "tensors", "sha256": _tensor_fingerprint(source)}
    raise TypeError(f"cannot fingerprint a {type(source).__name__}: pass a path, a state dict or a module")


def fingerprint_sources(sources: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """:func:`fingerprint` of each named source (``{"base": ..., "task_a": ...}``)."""
    return {name: fingerprint(src) for name, src in sources.items()}


def _describe(name: str, saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> str:
    where = (now or saved or {}).get("path")
    if saved is None:
        return f"{name} (not part of the saved run)"
    if now is None:
        return f"{name} (no longer given)"
    return f"{name} ({where})" if where else f"{name} (tensors in memory)"


def check_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any], what: str) -> None:
    """Refuse to reuse ``what`` when any source differs from its saved fingerprint.

    ``saved`` and ``current`` are :func:`fingerprint_sources` results; a source added or
    removed counts as changed.
    """
    changed = [
        _describe(name, saved.get(name), current.get(name))
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]
    if changed:
        raise StaleResultError(
            f"{what} was computed from sources that changed since: {', '.join(changed)}. Its finished candidates "
            "were scored on the old weights: restore them, or start the search over (delete the saved progress)"
        )


__all__ = ["StaleResultError", "check_fingerprints", "fingerprint", "fingerprint_sources"]
