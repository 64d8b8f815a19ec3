"""The safetensors format, read and written one tensor at a time with positional file I/O.

We read tensors with ``os.preadv`` into fresh buffers instead of ``safe_open``'s memory map:
pages of a mapped file stay in the process's resident set for as long as the map lives, so
streaming four 642 MB checkpoints through ``safe_open`` grows RSS by their whole size, while
a read into a buffer that is freed after the tensor is merged keeps memory at a few tensors.
The header is parsed and checked against the file size first, so a truncated or corrupt
file is reported by name before any work starts.

Writing, the layout (every tensor's offsets) is fixed from shapes and dtypes alone, so the
header is written first and each tensor is written at its offset whenever it arrives; the
merged model is never held in memory. Files written here are read back by ``safe_open``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..merging.sources import TensorSpec
from .errors import CheckpointError
from .jsonsafe import loads as load_json

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes(spec: TensorSpec) -> int:
    """Bytes a tensor of this shape and dtype takes in a safetensors file (stored packed)."""
    return spec.numel * torch.empty((), dtype=spec.dtype).element_size()


class SafetensorsFile:
    """The header of one ``.safetensors`` file, and positional reads of its tensors.

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> safetensors.torch.save_file({"w": torch.ones(2)}, path)
        >>> SafetensorsFile(path).get("w")
        tensor([1., 1.])
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        header, data_start, size = self._read_header()
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to strings)")
        self.metadata: dict[str, str] = metadata
        self._data_start = data_start
        for name, entry in header.items():
            self._add_entry(name, entry, size)
        self._check_coverage(size - data_start)

    def _read_header(self) -> tuple[dict, int, int]:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
                (n,) = struct.unpack("<Q", prefix)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})"
                    )
                raw = f.read(n)
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot read ({err.strerror or err})") from None
        try:
            header = load_json(raw, str(self.path))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        return header, 8 + n, size

    def _add_entry(self, name: str, entry: object, size: int) -> None:
        def corrupt(why: str) -> CheckpointError:
            return CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r} ({why}): {entry!r}"[:500])

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise corrupt("needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise corrupt(f"unknown dtype; expected one of {sorted(_DTYPES)}")
        # bool is an int subclass in Python; JSON true/false or 2.0 are not dimensions.
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise corrupt("shape must be a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
            raise corrupt("data_offsets must be two non-negative integers")
        start, end = offsets
        spec = TensorSpec(tuple(shape), _DTYPES[dtype])
        if end < start or end - start != nbytes(spec):
            raise corrupt(f"its byte range [{start}, {end}) does not hold shape {tuple(shape)} of {dtype}")
        if self._data_start + end > size:
            raise CheckpointError(
                f"{self.path}: truncated file ({size} bytes, but {name!r} ends at byte {self._data_start + end}); "
                "re-download or re-save it"
            )
        self.specs[name] = spec
        self._offsets[name] = (start, end)

    def _check_coverage(self, data_size: int) -> None:
        """Tensors must tile the data exactly, as the safetensors library requires: no overlap
        (two tensors aliasing the same bytes), no gap, nothing after the last tensor."""
        pos, previous = 0, None
        for name, (start, end) in sorted(self._offsets.items(), key=lambda item: item[1]):
            if start < pos:
                raise CheckpointError(
                    f"{self.path}: corrupt file: tensor {name!r} (bytes {start}-{end}) overlaps tensor {previous!r} "
                    f"(ends at {pos}); re-download or re-save it"
                )
            if start > pos:
                raise CheckpointError(
                    f"{self.path}: corrupt file: {start - pos} unused bytes before tensor {name!r} (offset {start}); "
                    "re-download or re-save it"
                )
            pos, previous = end, name
        if pos != data_size:
            raise CheckpointError(
                f"{self.path}: corrupt file: {data_size - pos} bytes after the last tensor; re-download or re-save it"
            )

    def get(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into a new buffer (nothing stays mapped), or into the front of ``into`` (bytes, reused).

        ``into``: a flat contiguous uint8 tensor of at least the tensor's size; the tensor
        returned is a view of it.
        """
        spec = self.specs[name]
        out = torch.empty(spec.shape, dtype=spec.dtype) if into is None else _view_of(into, spec)
        start, end = self._offsets[name]
        if end > start:
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            fd = os.open(self.path, os.O_RDONLY)
            try:
                _pread_into(fd, buf, self._data_start + start, self.path)
            finally:
                os.close(fd)
        return out

    def get_strided(self, name: str, first: int, stride: int) -> torch.Tensor:
        """``get(name).reshape(-1)[first::stride]``, reading only the pages those entries lie on.

        The global trim's sample takes one entry in ~1000 (a few per page or fewer): read
        whole, the sample pass copied every byte of every source (a third of a merge's reads).
        Here the file is mapped and only the picked entries are copied out.
        """
        spec = self.specs[name]
        if stride < 1 or first < 0:
            raise ValueError(f"get_strided needs first >= 0 and stride >= 1, got {first}, {stride}")
        if first >= spec.numel:
            return torch.empty(0, dtype=spec.dtype)
        start, end = self._offsets[name]
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self._data_start + end:  # mapped bytes past the end would be a SIGBUS
                raise CheckpointError(f"{self.path}: file ended early (truncated while reading?)")
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system that cannot map files: read it whole
                return self.get(name).reshape(-1)[first::stride].clone()
            with mapped:
                entries = np.frombuffer(mapped, _UNSIGNED[nbytes(TensorSpec((), spec.dtype))], spec.numel, self._data_start + start)
                picked = entries[first::stride].copy()
                del entries  # the mapping closes only once no array points into it
        return torch.from_numpy(picked).view(spec.dtype)


# numpy has no bfloat16 or float8: entries are copied as unsigned integers of their size
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _view_of(into: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The front of a flat uint8 buffer as a tensor of ``spec`` (refused: a buffer too small or not bytes)."""
    size = nbytes(spec)
    if into.dtype != torch.uint8 or into.dim() != 1 or not into.is_contiguous() or into.numel() < size:
        raise ValueError(f"into must be a flat contiguous uint8 tensor of at least {size} bytes, got {into.dtype} {tuple(into.shape)}")
    return into[:size].view(spec.dtype).view(spec.shape)


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: file ended early (truncated while reading?)")
        done += n


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def layout_header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) and each tensor's absolute file offset.

    Tensors are laid out in the given order; the header is padded with spaces to a multiple
    of 8 bytes, as the safetensors library does, so that data is aligned.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offsets: dict[str, int] = {}
    pos = 0
    for name, spec in specs.items():
        n = nbytes(spec)
        header[name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: start + v for k, v in offsets.items()}


def check_finite_tensor(path: str | os.PathLike[str], key: str, tensor: torch.Tensor) -> None:
    """Refuse a float output tensor holding inf or NaN (an overflow in its dtype), naming the key.

    Example:
        >>> check_finite_tensor("m.safetensors", "w", torch.tensor([7e4]).half())
        Traceback (most recent call last):
        ...
        OverflowError: m.safetensors: tensor 'w' has 1 inf/NaN value(s) in torch.float16 (largest finite: 65504.0); a merge overflowed its dtype: use a smaller lam, or a float32 or bfloat16 base (the output takes the base's dtype)
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    values = tensor if tensor.element_size() > 1 else tensor.float()  # no float8 kernels for these
    # min and max propagate NaN: both finite means every value is. No bool mask of the tensor's
    # size is made (a fresh allocation: on a 131 MB tensor 290 ms, against 5 ms for this).
    low, high = torch.aminmax(values.reshape(-1))
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = int((~torch.isfinite(values)).sum())
        raise OverflowError(
            f"{path}: tensor {key!r} has {bad} inf/NaN value(s) in {tensor.dtype} "
            f"(largest finite: {torch.finfo(tensor.dtype).max}); a merge overflowed its dtype: use a smaller lam, "
            "or a float32 or bfloat16 base (the output takes the base's dtype)"
        )


class SafetensorsWriter:
    """Write a safetensors file whose layout is fixed up front, tensors in any order.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/m.safetensors"
        >>> with SafetensorsWriter(path, {"w": TensorSpec((2,), torch.float32)}) as w:
        ...     w.write("w", torch.ones(2))
        >>> SafetensorsFile(path).get("w")
        tensor([1., 1.])
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | IO[bytes],
        specs: Mapping[str, TensorSpec],
        metadata: Mapping[str, str] | None = None,
        check_finite: bool = False,
    ) -> None:
        self.specs = dict(specs)
        self.check_finite = check_finite
        header, self._offsets = layout_header(self.specs, {"format": "pt", **(metadata or {})})
        total = len(header) + sum(nbytes(s) for s in self.specs.values())
        self._missing = set(self.specs)
        if hasattr(path, "fileno"):  # an open file (atomic_open's): written through its descriptor, not closed here
            name = getattr(path, "name", None)
            self.path = Path(name) if isinstance(name, (str, os.PathLike)) else Path(f"<file descriptor {path.fileno()}>")
            self._owns_fd = False
            self._fd = path.fileno()
        else:
            self.path = Path(path)
            self._owns_fd = True
            # 0o666 masked by the umask, like any new file.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(self._fd, header, 0)
            os.ftruncate(self._fd, total)
        except BaseException:
            self.abort()  # a full disk here must not leave the descriptor open
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.path}: {name!r} is not part of this file's layout")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{self.path}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, layout says {spec.shape} {spec.dtype}"
            )
        if self.check_finite:
            check_finite_tensor(self.path, name, tensor)
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        _write_all(self._fd, data, self._offsets[name])
        self._missing.discard(name)

    def close(self) -> None:
        """fsync and close; every tensor of the layout must have been written."""
        if self._fd < 0:
            return
        try:
            if self._missing:
                raise ValueError(f"{self.path}: tensors never written: {sorted(self._missing)[:10]}")
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._fd >= 0 and self._owns_fd:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
