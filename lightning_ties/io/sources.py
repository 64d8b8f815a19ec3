"""File sources: every checkpoint format people have, opened lazily as a ``TensorSource``.

``open_source`` looks at a path and picks the reader: safetensors files and Hugging Face
folders (single or sharded, safetensors or ``pytorch_model.bin``), Lightning ``.ckpt``
files, plain ``.pt``/``.pth``/``.bin`` state dicts and PEFT LoRA adapter folders. Opening
reads only headers (safetensors) or maps the zip archive (torch files), so shapes and
dtypes are known before any tensor is read.

Pickled torch files are loaded with ``torch.load(weights_only=True)`` only: a file that
needs arbitrary unpickling is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..merging.sources import StateDictSource, TensorSource, TensorSpec, as_source
from .errors import CheckpointError
from .safetensors_file import SafetensorsFile

#: Files a Hugging Face model folder may hold, in the order they are looked for.
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: ``prefix`` value asking to strip the first dotted part every key of a checkpoint shares.
AUTO_PREFIX = "auto"


class SafetensorsSource:
    """One or several safetensors files (a sharded folder) read as one source.

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
        >>> SafetensorsSource([path]).spec("w")
        TensorSpec(shape=(2,), dtype=torch.float32)
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], label: str | None = None, folder: Path | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.folder = folder
        self.label = label or str(folder or self.files[0])
        self.prefix = ""
        self._where: dict[str, SafetensorsFile] = {}
        for path in self.files:
            shard = SafetensorsFile(path)
            for name in shard.specs:
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {self._where[name].path}")
                self._where[name] = shard

    def keys(self) -> Sequence[str]:
        return list(self._where)

    def spec(self, key: str) -> TensorSpec:
        return self._where[key].specs[key]

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get(key)


class TorchFileSource(StateDictSource):
    """A pickled state dict (``.pt``/``.bin``/Lightning ``.ckpt``), memory-mapped when possible.

    Attributes:
        files: the files read; prefix: the key prefix that was stripped (``"model."``...);
        hyper_parameters: a Lightning checkpoint's ``hyper_parameters`` (else None).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        label: str,
        files: Sequence[Path],
        prefix: str = "",
        hyper_parameters: dict[str, Any] | None = None,
        folder: Path | None = None,
    ) -> None:
        super().__init__(tensors, label)
        self.files = list(files)
        self.prefix = prefix
        self.hyper_parameters = hyper_parameters
        self.folder = folder


def load_torch_file(path: str | os.PathLike[str], trust_pickle: bool = False) -> Any:
    """``torch.load`` a file safely: ``weights_only=True`` (memory-mapped when the format allows).

    Raises :class:`CheckpointError` naming the file when it is missing, corrupt, or needs
    arbitrary unpickling (then only ``trust_pickle=True`` loads it, for files you trust).

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/sd.pt"
        >>> torch.save({"w": torch.zeros(1)}, path)
        >>> load_torch_file(path)["w"]
        tensor([0.])
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            raise CheckpointError(f"{path}: corrupt pickle ({err})") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: it needs arbitrary unpickling, which can run code from the file "
            f"({reason}). Convert it to safetensors, or pass trust_pickle=True only if you trust who made it."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({type(err).__name__}: {err})") from None


def split_prefix(keys: Sequence[str], prefix: str | None) -> str:
    """The prefix to strip from a checkpoint's keys: none by default, ``prefix`` when given.

    ``prefix="auto"`` asks for the first dotted part every key shares (a LightningModule that
    keeps its network in one attribute, ``self.model``), ``""`` when they share none.

    Example:
        >>> split_prefix(["model.a.weight", "model.b.bias"], None)
        ''
        >>> split_prefix(["model.a.weight", "model.b.bias"], "auto")
        'model.'
        >>> split_prefix(["a.weight", "b.bias"], "auto")
        ''
    """
    if prefix is None:
        return ""
    if prefix != AUTO_PREFIX:
        return prefix
    heads = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(heads) == 1 and all("." in k for k in keys):
        return heads.pop() + "."
    return ""


def _strip(tensors: Mapping[str, Any], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    if not prefix:
        return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not out:
        heads = sorted({k.split(".", 1)[0] + "." for k in tensors})
        raise CheckpointError(f"{path}: no key starts with prefix {prefix!r}; its keys start with {heads[:10]}")
    return out


def _state_dict_of(obj: Any, path: Path) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """The state dict inside a loaded file (a Lightning checkpoint nests it under ``state_dict``)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        hp = obj.get("hyper_parameters")
        return obj["state_dict"], dict(hp) if isinstance(hp, Mapping) else None
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    kind = f"a dict with keys {list(obj)[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{path}: holds {kind}, not a state dict (name -> tensor) nor a checkpoint with a 'state_dict' entry"
    )


def open_torch_file(
    path: str | os.PathLike[str], prefix: str | None = None, trust_pickle: bool = False, label: str | None = None
) -> TorchFileSource:
    """Open a ``.pt``/``.pth``/``.bin`` state dict or a Lightning ``.ckpt`` (its ``state_dict``).

    Keys are kept as saved (a ``.ckpt`` of a LightningModule keeps its attribute prefix,
    ``model.``...), so a checkpoint matches the module that wrote it. ``prefix`` strips a
    prefix (keys without it are left out), and ``prefix="auto"`` strips the first dotted
    part every key shares, if any. (Inside Lightning, sources are matched to the module's
    own keys instead: :mod:`lightning_ties.lightning.keys`.)

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/run.ckpt"
        >>> torch.save({"state_dict": {"model.w": torch.ones(1)}}, path)
        >>> list(open_torch_file(path).keys()), list(open_torch_file(path, prefix="auto").keys())
        (['model.w'], ['w'])
    """
    path = Path(path)
    obj = load_torch_file(path, trust_pickle)
    tensors, hparams = _state_dict_of(obj, path)
    chosen = split_prefix(list(tensors), prefix)
    return TorchFileSource(_strip(tensors, chosen, path), label or str(path), [path], chosen, hparams)


def _read_index(path: Path) -> list[Path]:
    """The shard files an index names, each a plain file name inside the index's folder.

    A ``weight_map`` entry such as ``../other/x.safetensors`` or ``/abs/x.safetensors`` would
    make opening a folder read files outside it, so it is refused, as is any entry that is
    not a string.
    """
    try:
        index = json.loads(path.read_text())
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


def _open_bin_shards(folder: Path, shards: Sequence[Path], trust_pickle: bool, label: str | None) -> TorchFileSource:
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part, _ = _state_dict_of(load_torch_file(shard, trust_pickle), shard)
        tensors.update({k: v for k, v in part.items() if isinstance(v, torch.Tensor)})
    return TorchFileSource(tensors, label or str(folder), list(shards), folder=folder)


def open_folder(folder: Path, base: Any = None, trust_pickle: bool = False, label: str | None = None) -> TensorSource:
    """Open a Hugging Face model folder or a PEFT LoRA adapter folder."""
    if (folder / ADAPTER_CONFIG).is_file():
        from .lora import LoraSource  # lora imports this module

        if base is None:
            raise CheckpointError(f"{folder}: a LoRA adapter needs its base model: pass base=<model or path>")
        return LoraSource(folder, as_source(base, "base"), label=label)
    if (folder / SAFETENSORS_INDEX).is_file():
        return SafetensorsSource(_read_index(folder / SAFETENSORS_INDEX), label, folder=folder)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return SafetensorsSource([folder / SAFETENSORS_SINGLE], label, folder=folder)
    if (folder / BIN_INDEX).is_file():
        return _open_bin_shards(folder, _read_index(folder / BIN_INDEX), trust_pickle, label)
    if (folder / BIN_SINGLE).is_file():
        return _open_bin_shards(folder, [folder / BIN_SINGLE], trust_pickle, label)
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
    adapter folder, read as full weights ``base + scaling * B @ A`` (needs ``base``).
    Pickled files load with ``weights_only=True`` unless ``trust_pickle=True``.

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
        >>> open_source(path).get("w")
        tensor([1., 1.])
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return open_folder(p, base, trust_pickle, label)
    if p.name.endswith(".index.json"):
        if p.name.startswith("pytorch_model"):
            return _open_bin_shards(p.parent, _read_index(p), trust_pickle, label)
        return SafetensorsSource(_read_index(p), label, folder=p.parent)
    if p.suffix == ".safetensors":
        return SafetensorsSource([p], label)
    if p.suffix == ".ckpt" or p.suffix in _TORCH_SUFFIXES:
        return open_torch_file(p, prefix, trust_pickle, label)
    raise CheckpointError(
        f"{p}: unknown checkpoint format (suffix {p.suffix!r}); expected .safetensors, .ckpt, .pt, .pth, .bin "
        "or a model/adapter folder"
    )
