"""Readers: one checkpoint file format each, opened lazily as a ``TensorSource``.

Safetensors files (one, or the shards of a folder) and pickled torch files (``.pt``,
``.pth``, ``.bin`` state dicts, Lightning ``.ckpt``). Opening reads only headers
(safetensors) or maps the zip archive (torch files), so shapes and dtypes are known before
any tensor is read. Which reader a path needs is decided in :mod:`.formats` (``open_source``).

Pickled torch files are loaded with ``torch.load(weights_only=True)`` only: a file that
needs arbitrary unpickling is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..merging.sources import StateDictSource, TensorSpec
from .errors import CheckpointError
from .hf_folder import read_index
from .safetensors_file import SafetensorsFile

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

    def get_into(self, key: str, into: torch.Tensor) -> torch.Tensor:
        """:meth:`get` into the front of ``into``, a flat uint8 buffer the caller reuses (returns a view of it)."""
        return self._where[key].get(key, into)

    def get_strided(self, key: str, first: int, stride: int) -> torch.Tensor:
        """``get(key).reshape(-1)[first::stride]``, reading only those entries (the global trim's sample)."""
        return self._where[key].get_strided(key, first, stride)


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


def open_bin_shards(folder: Path, shards: Sequence[Path], trust_pickle: bool = False, label: str | None = None) -> TorchFileSource:
    """Open the pickled shards of a folder (``pytorch_model*.bin``) as one source."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part, _ = _state_dict_of(load_torch_file(shard, trust_pickle), shard)
        tensors.update({k: v for k, v in part.items() if isinstance(v, torch.Tensor)})
    return TorchFileSource(tensors, label or str(folder), list(shards), folder=folder)


def open_index(path: Path, trust_pickle: bool = False, label: str | None = None) -> SafetensorsSource | TorchFileSource:
    """Open the shards a ``*.index.json`` names (safetensors, or pickled ``pytorch_model*.bin``)."""
    shards = read_index(path)
    if path.name.startswith("pytorch_model"):
        return open_bin_shards(path.parent, shards, trust_pickle, label)
    return SafetensorsSource(shards, label, folder=path.parent)
