"""Which reader a path needs: ``open_source`` looks at a file or folder and opens it lazily.

Safetensors files and Hugging Face folders (single or sharded, safetensors or
``pytorch_model.bin``), Lightning ``.ckpt`` files, plain ``.pt``/``.pth``/``.bin`` state
dicts and PEFT LoRA adapter folders. The readers themselves live in :mod:`.readers` and
:mod:`.lora`; this module only dispatches, so imports point one way:
``safetensors_file <- hf_folder <- readers <- lora <- formats``.

Pickled torch files are loaded with ``torch.load(weights_only=True)`` only: a file that
needs arbitrary unpickling is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..merging.sources import TensorSource, as_source
from .dcp import DcpSource, is_dcp_folder
from .errors import CheckpointError
from .hf_folder import ADAPTER_CONFIG, BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from .lora import LoraSource
from .readers import SafetensorsSource, open_bin_shards, open_index, open_torch_file
from .validate import check_dtypes

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def open_folder(folder: Path, base: Any = None, trust_pickle: bool = False, label: str | None = None) -> TensorSource:
    """Open a Hugging Face model folder or a PEFT LoRA adapter folder."""
    if (folder / ADAPTER_CONFIG).is_file():
        if base is None:
            raise CheckpointError(f"{folder}: a LoRA adapter needs its base model: pass base=<model or path>")
        return LoraSource(folder, as_source(base, "base"), label=label)
    if (folder / SAFETENSORS_INDEX).is_file():
        return open_index(folder / SAFETENSORS_INDEX, trust_pickle, label)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return SafetensorsSource([folder / SAFETENSORS_SINGLE], label, folder=folder)
    if (folder / BIN_INDEX).is_file():
        return open_index(folder / BIN_INDEX, trust_pickle, label)
    if (folder / BIN_SINGLE).is_file():
        return open_bin_shards(folder, [folder / BIN_SINGLE], trust_pickle, label)
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsSource(singles, label, folder=folder)
    raise CheckpointError(
        f"{folder}: not a model folder: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE}, "
        f"{BIN_INDEX} or {ADAPTER_CONFIG}; found {sorted(p.name for p in folder.iterdir())[:10]}"
    )


def open_source(
    path: str | os.PathLike[str],
    base: Any = None,
    prefix: str | None = None,
    trust_pickle: bool = False,
    label: str | None = None,
) -> TensorSource:
    """Open a checkpoint file or folder lazily as a :class:`TensorSource`.

    Accepts a ``.safetensors`` file, a Hugging Face folder (``model.safetensors``, sharded
    ``model-*.safetensors`` + index, ``pytorch_model.bin`` (+ index)), a Lightning ``.ckpt``
    (its ``state_dict``, keys as saved: ``prefix="model."`` strips that prefix, ``prefix="auto"``
    the first dotted part all keys share), a ``.pt``/``.pth``/``.bin`` state dict, or a PEFT LoRA
    adapter folder, read as full weights ``base + scaling * B @ A`` (needs ``base``), or a
    ``torch.distributed.checkpoint`` folder (``.metadata``; what Lightning's sharded strategies save:
    the module's keys, its ``state_dict.``/``model.`` container stripped; see :mod:`.dcp`).
    Pickled files load with ``weights_only=True`` unless ``trust_pickle=True``.

    Example:
        >>> import tempfile, safetensors.torch, torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
        >>> open_source(path).get("w")
        tensor([1., 1.])
    """
    # float8, complex or integer-only weights: one clear error now, not torch's promotion error mid-merge
    return check_dtypes(_open_any(Path(path), base, prefix, trust_pickle, label))


def _open_any(p: Path, base: Any, prefix: str | None, trust_pickle: bool, label: str | None) -> TensorSource:
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir() and is_dcp_folder(p):
        return DcpSource(p, prefix, trust_pickle, label)
    if p.is_dir():
        return open_folder(p, base, trust_pickle, label)
    if p.name.endswith(".index.json"):
        return open_index(p, trust_pickle, label)
    if p.suffix == ".safetensors":
        return SafetensorsSource([p], label)
    if p.suffix == ".ckpt" or p.suffix in _TORCH_SUFFIXES:
        return open_torch_file(p, prefix, trust_pickle, label)
    raise CheckpointError(
        f"{p}: unknown checkpoint format (suffix {p.suffix!r}); expected .safetensors, .ckpt, .pt, .pth, .bin "
        "or a model/adapter folder"
    )
