"""``torch.distributed.checkpoint`` (DCP) folders as lazy sources, read whole or per row range.

What ``trainer.save_checkpoint`` writes under ``ModelParallelStrategy`` and under
``FSDPStrategy(state_dict_type="sharded")`` is a folder: ``.metadata`` (a pickled
:class:`~torch.distributed.checkpoint.metadata.Metadata`: every tensor's global shape, dtype and
chunks, and where each chunk's bytes are), ``__<rank>_<i>.distcp`` data files (each chunk a
``torch.save``'d tensor at an offset) and Lightning's ``meta.pt`` (epoch, loops, hyper-parameters).
Keys, shapes and dtypes come from the metadata alone; a tensor is read by loading only the
chunks it needs, so a rank reads only the chunks overlapping its rows (:meth:`DcpSource.get_rows`).

Lightning nests the weights in the checkpoint: ``state_dict.<key>`` (ModelParallelStrategy) or
``model.<key>`` (FSDPStrategy), beside ``optimizer_<i>.*``. The source strips that container, so
its keys are the LightningModule's ``state_dict`` keys, as a ``.ckpt``'s are.

Safety: DCP itself reads ``.metadata`` with plain ``pickle.load``, which can run code from the
file. We unpickle it with an allow-list of the classes DCP's metadata is made of (its dataclasses,
``torch.Size``, dtypes, layouts, paths) and refuse anything else, naming it, unless
``trust_pickle=True``. Chunks are read with ``torch.load(weights_only=True)`` and ``meta.pt``
with :func:`~lightning_ties.io.readers.load_torch_file`, the rule of every other source.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..merging.sources import TensorSpec
from .errors import CheckpointError
from .readers import load_torch_file, split_prefix

METADATA_FILE = ".metadata"
LIGHTNING_META = "meta.pt"  # lightning.fabric.strategies.model_parallel._METADATA_FILENAME
#: Where Lightning's strategies put the module's weights inside a DCP checkpoint.
LIGHTNING_CONTAINERS = ("state_dict", "model")  # ModelParallelStrategy, FSDPStrategy(state_dict_type="sharded")

_DCP = "torch.distributed.checkpoint"
_ALLOWED_GLOBALS = {
    (f"{_DCP}.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def is_dcp_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder written by ``torch.distributed.checkpoint`` (it holds ``.metadata``)."""
    return (Path(path) / METADATA_FILE).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: dataclasses of ``torch.distributed.checkpoint``, sizes, dtypes, paths."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path}: refused to unpickle {module}.{name}: a DCP .metadata file holds only "
            "torch.distributed.checkpoint's metadata classes, sizes and dtypes. Pass trust_pickle=True only if "
            "you trust who made the checkpoint"
        )


def read_metadata(folder: Path, trust_pickle: bool = False) -> Any:
    """The DCP ``Metadata`` of ``folder``, unpickled through the allow-list (see the module docstring)."""
    path = folder / METADATA_FILE
    try:
        with open(path, "rb") as f:
            if trust_pickle:
                return pickle.load(f)
            return _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt DCP metadata ({type(err).__name__}: {err})") from None


class DcpSource:
    """A DCP checkpoint folder as a lazy source: specs from ``.metadata``, chunks read on demand.

    Args:
        folder: the checkpoint folder (``.metadata`` + ``*.distcp``).
        prefix: after Lightning's container is stripped, ``"auto"`` strips the first dotted part every
            key shares, a string strips that prefix, None (default) keeps the keys.
        trust_pickle: unpickle ``.metadata`` and ``meta.pt`` without the allow-list / ``weights_only``.
        label: the source's name in reports (default: the folder).

    Attributes:
        container: Lightning's container that was stripped (``"state_dict"``, ``"model"``) or ``""``.
        hyper_parameters: ``meta.pt``'s ``hyper_parameters`` (None without them).

    Example:
        >>> import tempfile, torch.distributed.checkpoint as dcp
        >>> folder = tempfile.mkdtemp()
        >>> dcp.save({"w": torch.arange(6.0).reshape(3, 2)}, checkpoint_id=folder, no_dist=True)  # doctest: +ELLIPSIS
        Metadata(...)
        >>> src = DcpSource(folder)
        >>> src.spec("w"), src.get_rows("w", 1, 2)
        (TensorSpec(shape=(3, 2), dtype=torch.float32), tensor([[2., 3.]]))
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        prefix: str | None = None,
        trust_pickle: bool = False,
        label: str | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.label = label or str(self.folder)
        self.trust_pickle = trust_pickle
        metadata = read_metadata(self.folder, trust_pickle)
        self._storage = metadata.storage_data
        self._index = {(i.fqn, tuple(i.offset or ())): i for i in self._storage}
        tensors = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "chunks")}
        paths = getattr(metadata, "planner_data", None) or {}
        meta_file = self.folder / LIGHTNING_META
        self.hyper_parameters = None
        if meta_file.is_file():
            meta = load_torch_file(meta_file, trust_pickle)
            hp = meta.get("hyper_parameters") if isinstance(meta, dict) else None
            self.hyper_parameters = dict(hp) if isinstance(hp, dict) else None
        self.container = _lightning_container(list(tensors), paths, meta_file.is_file())
        named = {_strip_container(k, paths, self.container): (k, v) for k, v in tensors.items()
                 if _in_container(k, paths, self.container)}
        self.prefix = split_prefix(list(named), prefix)
        if self.prefix and not any(k.startswith(self.prefix) for k in named):
            raise CheckpointError(
                f"{self.folder}: no key starts with prefix {self.prefix!r}; keys look like {sorted(named)[:4]}"
            )
        self._entries = {k[len(self.prefix):]: v for k, v in named.items() if k.startswith(self.prefix)}
        self.files = sorted({self.folder / info.relative_path for info in self._storage.values()})

    def keys(self) -> Sequence[str]:
        return list(self._entries)

    def spec(self, key: str) -> TensorSpec:
        _, meta = self._entries[key]
        return TensorSpec(tuple(meta.size), meta.properties.dtype)

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, assembled from its chunks."""
        shape = self.spec(key).shape
        if not shape:
            return self.get_rows(key, 0, 1).reshape(())
        return self.get_rows(key, 0, shape[0])

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dimension 0 (a 0-d tensor has one row), reading only overlapping chunks."""
        fqn, meta = self._entries[key]
        spec = self.spec(key)
        shape = spec.shape or (1,)
        out = torch.empty((stop - start, *shape[1:]), dtype=spec.dtype)
        covered = 0
        for chunk in meta.chunks:
            offsets = tuple(chunk.offsets) or (0,)
            sizes = tuple(chunk.sizes) or (1,)
            lo, hi = max(start, offsets[0]), min(stop, offsets[0] + sizes[0])
            if lo >= hi:
                continue
            data = self._read_chunk(fqn, chunk, key).reshape(sizes)
            region = out[lo - start:hi - start]
            for dim in range(1, len(shape)):
                region = region.narrow(dim, offsets[dim], sizes[dim])
            region.copy_(data[lo - offsets[0]:hi - offsets[0]])
            covered += region.numel()
        if covered != out.numel():
            raise CheckpointError(
                f"{self.folder}: the chunks of {fqn!r} cover {covered} of the {out.numel()} entries of rows "
                f"[{start}, {stop}); the checkpoint is incomplete"
            )
        return out

    def _read_chunk(self, fqn: str, chunk: Any, key: str) -> torch.Tensor:
        index = self._index.get((fqn, tuple(chunk.offsets)))
        if index is None:
            raise CheckpointError(f"{self.folder}: no stored data for {fqn!r} at offsets {list(chunk.offsets)}")
        info = self._storage[index]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{self.folder}: {fqn!r} is stored with transforms {info.transform_descriptors} (compression?), "
                "which this reader does not decode; save the checkpoint without them"
            )
        path = self.folder / info.relative_path
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), info.length, info.offset)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read {fqn!r} ({err})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{path}: truncated: {fqn!r} needs bytes {info.offset}..{info.offset + info.length}")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: refused to load {fqn!r}: not a plain tensor ({err})") from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt chunk of {fqn!r} ({type(err).__name__}: {err})") from None


def _lightning_container(keys: list[str], paths: dict[str, Any], has_lightning_meta: bool) -> str:
    """``"state_dict"`` / ``"model"`` when the weights sit in Lightning's container, else ``""``."""
    heads = {_head(k, paths) for k in keys}
    if "state_dict" in heads:
        return "state_dict"
    if has_lightning_meta and "model" in heads and heads <= {"model"} | {h for h in heads if h.startswith("optimizer_")}:
        return "model"
    return ""


def _head(key: str, paths: dict[str, Any]) -> str:
    path = paths.get(key)
    if path is not None and len(path) > 1:
        return str(path[0])
    return key.split(".", 1)[0] if "." in key else ""


def _in_container(key: str, paths: dict[str, Any], container: str) -> bool:
    return not container or _head(key, paths) == container


def _strip_container(key: str, paths: dict[str, Any], container: str) -> str:
    if not container:
        return key
    return key[len(container) + 1:]
