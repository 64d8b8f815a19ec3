"""The Hugging Face model-folder layout: file names, shard planning and shard indexes.

File names and the shard plan come from ``huggingface_hub`` (what ``save_pretrained`` and
``from_pretrained`` use), so a folder we write is one the Hub's tools read, and the other way
round. We plan shards from :class:`~lightning_ties.merging.TensorSpec` s (shape and dtype)
rather than tensors, because the sinks write each tensor at its offset as it is merged and
never hold the model: ``split_state_dict_into_shards_factory`` takes a size function for that.

This module knows names and plans only; reading is in :mod:`.readers`, writing in :mod:`.sinks`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import constants, split_state_dict_into_shards_factory

# The parser the shard factory itself applies to "5GB"; not re-exported at the package top.
from huggingface_hub.serialization._base import parse_size_to_int

from ..merging.sources import TensorSpec
from .errors import CheckpointError
from .jsonsafe import loads as load_json
from .safetensors_file import nbytes

#: Files a Hugging Face model folder may hold, in the order they are looked for.
SAFETENSORS_INDEX = constants.SAFETENSORS_INDEX_FILE
SAFETENSORS_SINGLE = constants.SAFETENSORS_SINGLE_FILE
BIN_SINGLE = constants.PYTORCH_WEIGHTS_NAME
# huggingface_hub names no pickle index; this is transformers' WEIGHTS_INDEX_NAME.
BIN_INDEX = BIN_SINGLE + ".index.json"
#: A PEFT adapter folder's config (peft's CONFIG_NAME; peft is not a dependency).
ADAPTER_CONFIG = "adapter_config.json"
#: ``max_shard_size`` when none is given (huggingface_hub's and transformers' default).
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Binary units, which huggingface_hub's size parser (decimal KB/MB/GB/TB only) lacks.
_BINARY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG])iB\s*", re.IGNORECASE)
_BINARY_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}
_BYTES = re.compile(r"\s*(\d+)\s*B?\s*", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, a decimal size as ``save_pretrained`` takes (``"5GB"``: 5 * 10**9,
    parsed by huggingface_hub), or a binary one (``"500MiB"``: 500 * 2**20).

    Example:
        >>> parse_size("2GB"), parse_size("1MiB"), parse_size(100)
        (2000000000, 1048576, 100)
    """
    value: int | None = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        binary, plain = _BINARY.fullmatch(size), _BYTES.fullmatch(size)
        if binary:
            value = int(float(binary[1]) * _BINARY_UNITS[binary[2].upper()])
        elif plain:
            value = int(plain[1])
        else:
            try:
                value = parse_size_to_int(size)
            except ValueError:
                value = None
    if value is None or value <= 0:
        raise ValueError(
            f"max_shard_size must be a positive size like 5GB, 500MB or 500MiB (or a number of bytes), got {size!r}"
        )
    return value


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_size: int | str) -> dict[str, dict[str, TensorSpec]]:
    """Shard file name -> the specs it holds, planned by huggingface_hub as ``save_pretrained`` does.

    Keys are taken in order and a shard is closed before it would exceed ``max_shard_size``;
    a tensor bigger than that gets a shard of its own (the shard being filled stays open,
    as in ``save_pretrained``). One shard is named
    ``model.safetensors``, several ``model-00001-of-0000N.safetensors``.

    Example:
        >>> import torch
        >>> specs = {k: TensorSpec((10,), torch.float32) for k in ("a", "b", "c")}  # 40 bytes each
        >>> {name: list(shard) for name, shard in plan_shards(specs, 100).items()}
        {'model-00001-of-00002.safetensors': ['a', 'b'], 'model-00002-of-00002.safetensors': ['c']}
    """
    if not specs:  # the factory returns no file at all; an empty model is still one (empty) file
        return {SAFETENSORS_SINGLE: {}}
    split = split_state_dict_into_shards_factory(
        dict(specs),
        get_storage_size=nbytes,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=parse_size(max_shard_size),
    )
    return {name: {key: specs[key] for key in keys} for name, keys in split.filename_to_tensors.items()}


def write_index(folder: Path, weight_map: Mapping[str, str], total_size: int) -> Path:
    """Write ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``) into ``folder``."""
    path = folder / SAFETENSORS_INDEX
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def read_index(path: Path) -> list[Path]:
    """The shard files an index names, each a plain file name inside the index's folder.

    A ``weight_map`` entry such as ``../other/x.safetensors`` or ``/abs/x.safetensors`` would
    make opening a folder read files outside it, so it is refused, as is any entry that is
    not a string.
    """
    try:
        index = load_json(path.read_bytes(), str(path))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not a mapping of tensor name -> file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: corrupt shard index ({type(err).__name__}: {err})") from None
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: weight_map entry {key!r} -> {name!r} is not a file name; re-save the model")
        # Only a plain name: no separators (either kind), no '..', not absolute, not empty.
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
            raise CheckpointError(
                f"{path}: weight_map entry {key!r} -> {name!r} is not a plain file name inside {path.parent}; "
                "refused (an index may only name shard files next to it)"
            )
    shards = [path.parent / f for f in sorted(set(weight_map.values()))]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard file(s) missing: {', '.join(missing)}")
    return shards
