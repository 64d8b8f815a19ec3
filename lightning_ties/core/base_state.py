"""The base of a fit-end merge: captured from the module (or read from ``base``), and referenced by file.

``TiesMerging`` merges onto the weights the module had before its first training step. Those are
captured once at fit start; checkpoints then hold a reference to a file instead of the tensors:
``{"path", "sha256"}`` of the ``base`` the user gave, or of ``save_dir/base.safetensors`` written
once (atomically, by :func:`~lightning_ties.io.save_safetensors`). A restored reference whose file
is gone or changed fails at once, naming the file: merging onto another base gives another model.

Lightning-free: the shell passes whether this process writes (``is_global_zero``) and a barrier.

Example:
    >>> import torch
    >>> state = clone_state(torch.nn.Linear(2, 1))
    >>> sorted(state), checksum({"w": torch.ones(2)})
    (['bias', 'weight'], '2.000000000000e+00')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io.card import sha256_file
from ..io.sinks import save_safetensors
from ..merging.reading import check_device
from ..merging.sources import copy_state
from .keys import match_to_module, module_ties, with_ties

#: The captured base (module weights at fit start), written once under ``save_dir`` and referenced by checkpoints.
BASE_FILE = "base.safetensors"


def clone_state(module: nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A copy of the module's state on ``device`` (CPU by default: the copy costs no GPU memory); tied weights stay
    one tensor (:func:`~lightning_ties.merging.sources.copy_state`), so the merge counts them once."""
    return copy_state(module.state_dict(), device)


def capture_base(base: Any, module: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """The base's weights on ``device`` under ``module``'s keys: ``base`` (path, state dict, ...) when given, else the module's."""
    if base is None:
        return clone_state(module, device)
    src = with_ties(match_to_module(base, list(module.state_dict()), label="base"), module_ties(module))
    aliases = getattr(src, "aliases", None) or {}  # tied weights (the module's, the base's): one copy for both names
    captured: dict[str, torch.Tensor] = {}
    for key in src.keys():
        first = aliases.get(key)
        captured[key] = captured[first] if first in captured else src.get(key).detach().to(device, copy=True)
    return captured


def base_reference(
    base: Any,
    save_dir: str | os.PathLike[str] | None,
    captured: Mapping[str, torch.Tensor] | None,
    is_global_zero: bool = True,
    barrier: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """What checkpoints keep instead of the base: ``{"path", "sha256"}`` of the base's file.

    A ``base`` given as a file is referenced as is; a ``captured`` base is written once to
    ``save_dir/base.safetensors`` (by rank zero; every rank waits at ``barrier``). ``None`` when
    there is no file: a base given as a module or state dict is given again on resume, and a
    captured one without ``save_dir`` stays in the checkpoint.
    """
    if base is not None:
        path = base if isinstance(base, (str, os.PathLike)) else None
        if path is None or not Path(path).exists():
            return None
        path = Path(path).resolve()
        return {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None}
    if save_dir is None or captured is None:
        return None
    path = (Path(save_dir) / BASE_FILE).resolve()
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(dict(captured), path)
    if barrier is not None:
        barrier("ties_base_written")
    return {"path": str(path), "sha256": sha256_file(path)}


def check_base_device(base_device: str) -> None:
    """``"module"`` or a torch device name: a bad one fails when the callback is built, not at fit start."""
    if base_device == "module":
        return
    try:
        device = torch.device(base_device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"base_device must be 'cpu', 'module' or a torch device such as 'cuda:0', got {base_device!r}"
        ) from None
    check_device(device, "base_device")


def check_base_file(ref: Mapping[str, Any]) -> None:
    """The base a checkpoint references must be the file it was: present, with the same sha256."""
    path = Path(ref["path"])
    if not path.exists():
        raise FileNotFoundError(
            f"the checkpoint's TiesMerging state references its base at {path}, which does not exist; restore "
            "that file (or resume with a fresh TiesMerging and no ckpt_path to start the merge over)"
        )
    expected = ref.get("sha256")
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"the base at {path} changed since the checkpoint was written (sha256 {actual[:12]}..., the "
                f"checkpoint recorded {expected[:12]}...); merging onto another base gives another model: restore "
                "the original file"
            )


def checksum(state: Mapping[str, torch.Tensor]) -> str:
    """A cheap identity of the fine-tuned weights: cached scores are reused only for the same weights."""
    total = sum(float(v.double().abs().sum()) for v in state.values() if v.is_floating_point())
    return f"{total:.12e}"


__all__ = ["BASE_FILE", "base_reference", "capture_base", "check_base_device", "check_base_file", "checksum",
           "clone_state"]
