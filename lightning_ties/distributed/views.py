"""How one rank sees its slice of a sharded module, and the same slice of every task's weights.

A :class:`ShardedView` lists, for every entry of a module's state dict, the global shape and
dtype (what the merge plans with: every rank plans the same model) and the row range
``[row_start, row_stop)`` of dimension 0 this rank holds. Sharding along dimension 0 splits
the row-major flattened tensor into contiguous pieces, so a row range is also a flat range,
``[row_start * row_numel, row_stop * row_numel)``: the ``shards`` the merge engine takes.

Supported layouts (anything else is refused by :func:`sharded_view`, naming what is):

- FSDP2 (``fully_shard``; Lightning's ``ModelParallelStrategy`` with tensor_parallel_size=1):
  DTensor parameters with placements ``(Shard(0),)``, or HSDP ``(Replicate(), Shard(0))``.
  Rows are split as DTensor splits them (``torch.chunk``: ceil(rows / W) per rank, the last
  ranks possibly short or empty). Merged pieces are written into ``param.to_local()``.
- FSDP1 (``FullyShardedDataParallel``; Lightning's ``FSDPStrategy``): the sharded state dict
  of ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (ShardedTensor or DTensor
  chunks of dimension 0), written back with ``set_model_state_dict``.
- Entries held whole by every rank (buffers, unsharded parameters): rank 0 owns them for the
  merge, and the merged value is shared with the other ranks by one sum (exact: the others add zeros).

Refused: tensor parallelism (``Shard(1)``, ``_StridedShard``, ``Partial``, several Shard
placements), because its pieces are not contiguous flat ranges of the global tensor.

Task weights are read per row range by :func:`read_rows` (safetensors: ``safe_open``'s
``get_slice``, never the whole tensor; DCP folders: only the chunks that overlap the rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..merging.sources import TensorSource, TensorSpec
from .collectives import TorchCollectives

SUPPORTED = (
    "supported: FSDP2 fully_shard with placements (Shard(0),) or HSDP (Replicate(), Shard(0)) "
    "(Lightning's ModelParallelStrategy with tensor_parallel_size=1), FSDP1 FullyShardedDataParallel "
    "(FSDPStrategy), or an unsharded module"
)


class UnsupportedShardingError(ValueError):
    """A module is sharded in a way the merge cannot follow (tensor parallelism, mixed meshes)."""


def chunk_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` that part ``index`` of ``parts`` holds when ``rows`` are split as
    ``torch.chunk`` (and DTensor's ``Shard``) split them: ceil(rows / parts) each, the last short
    or empty.

    Example:
        >>> [chunk_rows(5, 4, i) for i in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    size = -(-rows // parts) if rows else 0
    start = min(index * size, rows)
    return start, min(start + size, rows)


@dataclass
class LocalEntry:
    """One state-dict entry as this rank sees it.

    ``spec``: global shape and dtype; ``rows``: the rows of dimension 0 this rank merges
    (a 0-d tensor has one row); ``local``: the tensor holding those rows, live (writing it
    writes the module) for FSDP2; ``replicated``: every rank holds the whole entry.
    """

    spec: TensorSpec
    rows: tuple[int, int]
    local: torch.Tensor
    replicated: bool = False

    @property
    def row_numel(self) -> int:
        shape = self.spec.shape
        n = 1
        for d in shape[1:]:
            n *= d
        return n

    @property
    def flat(self) -> tuple[int, int]:
        return self.rows[0] * self.row_numel, self.rows[1] * self.row_numel

    def piece(self) -> torch.Tensor:
        """The rows this rank merges, shaped ``(rows, *shape[1:])`` (for a replicated entry: a slice)."""
        t = self.local.detach()
        if t.dim() == 0:
            return t.reshape(1) if self.rows == (0, 1) else t.reshape(1)[:0]
        return t[self.rows[0]:self.rows[1]] if self.replicated else t


class ShardedView:
    """One rank's view of a module's state dict: global specs, local rows, write-back.

    Build it with :func:`sharded_view`. ``shards`` (key -> flat range) and :meth:`source`
    (a :class:`~lightning_ties.merging.sources.TensorSource` of the local pieces with global
    specs) are what the merge engine takes; :meth:`write_` puts merged pieces back in place.
    """

    def __init__(
        self,
        module: nn.Module,
        entries: dict[str, LocalEntry],
        collectives: Any,
        kind: str,
        aliases: dict[str, str],
        fsdp1_state: dict[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.entries = entries
        self.collectives = collectives
        self.kind = kind
        self.aliases = aliases
        self._fsdp1_state = fsdp1_state

    def __repr__(self) -> str:
        return f"ShardedView(kind={self.kind!r}, entries={len(self.entries)}, collectives={self.collectives!r})"

    @property
    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def shards(self) -> dict[str, tuple[int, int]]:
        """Key -> the flat range ``[start, stop)`` of the global tensor this rank merges."""
        return {k: e.flat for k, e in self.entries.items()}

    @property
    def rows(self) -> dict[str, tuple[int, int]]:
        return {k: e.rows for k, e in self.entries.items()}

    def specs(self) -> dict[str, TensorSpec]:
        return {k: e.spec for k, e in self.entries.items()}

    def local_state(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A copy of this rank's pieces on ``device`` (CPU: the captured base costs no GPU memory).

        Tied entries stay tied in the copy (one tensor under both names), so the merge sees them as one.
        """
        out: dict[str, torch.Tensor] = {}
        for key, entry in self.entries.items():
            first = self.aliases.get(key)
            out[key] = out[first] if first is not None else entry.piece().to(device, copy=True)
        return out

    def source(self, state: Mapping[str, torch.Tensor] | None = None, label: str = "module") -> LocalSource:
        """The local pieces (``state``, default: the live module's) as a source with global specs."""
        return LocalSource(state if state is not None else {k: e.piece() for k, e in self.entries.items()},
                           self.specs(), label, aliases=self.aliases)

    def write_(self, pieces: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write merged local pieces (key -> ``(rows, *shape[1:])`` or flat) into the module, in place.

        ``pieces`` may be a generator of ``(key, piece)`` pairs, so that only one merged piece exists at a
        time. A tied entry's other names get the value of its first name. Entries held whole by every rank
        were merged by rank 0 alone: one sum gives every rank the whole value. Every rank must call this
        with the same keys in the same order (it runs a collective per replicated key).
        """
        names: dict[str, list[str]] = {}
        for key in self.entries:
            names.setdefault(self.aliases.get(key, key), []).append(key)
        items = pieces.items() if isinstance(pieces, Mapping) else pieces
        with torch.no_grad():
            for first, value in items:
                if first not in self.entries:
                    continue
                entry = self.entries[first]
                if entry.replicated:
                    value = self._share_replicated(entry, value)
                for key in names.get(first, ()):
                    target = self.entries[key].local
                    target.copy_(value.reshape(target.shape))
            if self._fsdp1_state is not None:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.module, self._fsdp1_state, options=StateDictOptions(full_state_dict=False))

    def _share_replicated(self, entry: LocalEntry, value: torch.Tensor) -> torch.Tensor:
        """The whole merged value of an entry rank 0 merged alone: the others add zeros (exact)."""
        full = torch.zeros(entry.spec.numel, dtype=torch.float64, device=entry.local.device)
        start, stop = entry.flat
        full[start:stop] = value.reshape(-1).to(full.device, torch.float64)
        return self.collectives.all_sum(full).to(entry.local.dtype)


class LocalSource:
    """A :class:`TensorSource` of local pieces: ``get`` returns this rank's rows, ``spec`` the global spec.

    Example:
        >>> src = LocalSource({"w": torch.ones(1, 3)}, {"w": TensorSpec((4, 3), torch.float32)}, "rank1")
        >>> src.spec("w").shape, tuple(src.get("w").shape)
        ((4, 3), (1, 3))
    """

    def __init__(
        self,
        pieces: Mapping[str, torch.Tensor],
        specs: Mapping[str, TensorSpec],
        label: str,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._pieces = dict(pieces)
        self._specs = dict(specs)
        self.label = label
        self.aliases = dict(aliases or {})
        floating = [t for t in self._pieces.values() if t.is_floating_point()]
        self.device = floating[0].device if floating else torch.device("cpu")

    def keys(self) -> Sequence[str]:
        return list(self._pieces)

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def get(self, key: str) -> torch.Tensor:
        return self._pieces[key]


class RowsSource:
    """A task's weights restricted to this rank's rows: ``get(key)`` reads only ``rows[key]``.

    ``spec`` stays global. Reads go through :func:`read_rows` (per row range for safetensors and
    DCP folders).
    """

    def __init__(self, source: TensorSource, rows: Mapping[str, tuple[int, int]]) -> None:
        self.source = source
        self.rows = dict(rows)
        self.label = source.label

    def keys(self) -> Sequence[str]:
        return [k for k in self.source.keys() if k in self.rows]

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def get(self, key: str) -> torch.Tensor:
        start, stop = self.rows[key]
        return read_rows(self.source, key, start, stop)


def read_rows(source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of dimension 0 of ``source``'s ``key`` (a 0-d tensor has one row).

    A source whose class defines ``get_rows(key, start, stop)`` (DCP folders) reads only those
    rows; safetensors files are sliced with ``safe_open(...).get_slice``; any other source is
    read whole and sliced (in-memory state dicts cost nothing more).

    Example:
        >>> from lightning_ties.merging.sources import StateDictSource
        >>> read_rows(StateDictSource({"w": torch.arange(6.0).reshape(3, 2)}), "w", 1, 3)
        tensor([[2., 3.],
                [4., 5.]])
    """
    rows_reader = getattr(type(source), "get_rows", None)  # the class's own: a key-renaming wrapper's
    if rows_reader is not None:                            # __getattr__ must not forward it
        return rows_reader(source, key, start, stop)
    from ..io.readers import SafetensorsSource

    if type(source) is SafetensorsSource:
        return _safetensors_rows(source, key, start, stop)
    t = source.get(key)
    return t.reshape(1)[start:stop] if t.dim() == 0 else t[start:stop]


def _safetensors_rows(source: Any, key: str, start: int, stop: int) -> torch.Tensor:
    from safetensors import safe_open

    files = getattr(source, "_files_of", None)
    if files is None:  # which file holds which key: headers only, once per source
        files = {}
        for path in source.files:
            with safe_open(str(path), framework="pt") as handle:
                files.update(dict.fromkeys(handle.keys(), path))
        source._files_of = files
    with safe_open(str(files[key]), framework="pt") as handle:
        piece = handle.get_slice(key)
        if not piece.get_shape():
            return piece[...].reshape(1)[start:stop]
        return piece[start:stop].clone()


# ---- building a view --------------------------------------------------------------------------
def sharded_view(module: nn.Module, collectives: Any = None) -> ShardedView:
    """How this rank sees ``module``: FSDP2 DTensors, FSDP1 flat shards, or a whole (unsharded) module.

    ``collectives`` defaults to the process group that shards the parameters (for HSDP its shard
    dimension only). Raises :class:`UnsupportedShardingError` for tensor parallelism.

    Example (inside an initialised process group, after ``fully_shard(model)``)::

        view = sharded_view(model)
        view.shards  # {"0.weight": (0, 9), ...}: this rank's flat range of each tensor
    """
    if _is_fsdp1(module):
        return _fsdp1_view(module, collectives)
    return _fsdp2_view(module, collectives)


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _shard_dim(key: str, param: Any) -> int | None:
    """The mesh dimension that shards ``param``'s rows (None: replicated everywhere); refuses the rest."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = []
    for i, p in enumerate(param.placements):
        if type(p) is Shard and p.dim == 0:
            shard_dims.append(i)
        elif type(p) is not Replicate:
            raise UnsupportedShardingError(
                f"{key!r} has placements {tuple(param.placements)} (tensor parallel or partial): the merge reads "
                f"each parameter as contiguous row ranges; {SUPPORTED}. Merge without tensor parallelism "
                "(tensor_parallel_size=1), or merge the saved checkpoints offline with merge_to"
            )
    if len(shard_dims) > 1:
        raise UnsupportedShardingError(
            f"{key!r} is sharded on dimension 0 by several mesh dimensions {tuple(param.placements)}; {SUPPORTED}"
        )
    return shard_dims[0] if shard_dims else None


def _fsdp2_view(module: nn.Module, collectives: Any) -> ShardedView:
    from torch.distributed.tensor import DTensor

    state = module.state_dict(keep_vars=True)
    # (mesh, shard dimension) of every sharded parameter; meshes compare by their ranks and names, not identity:
    # equal meshes built apart (e.g. each access of a parent mesh's submesh) shard over the same ranks
    groups: set[tuple[Any, int]] = set()
    entries: dict[str, LocalEntry] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            dim = _shard_dim(key, value)
            with torch.no_grad():  # the local tensor itself, not an autograd view of it: written in place
                local = value.to_local()
            if dim is None:
                entries[key] = _replicated_entry(value.shape, value.dtype, local)
                continue
            mesh = value.device_mesh
            groups.add((mesh, dim))
            rows = value.shape[0]
            span = chunk_rows(rows, mesh.size(dim), mesh.get_local_rank(dim))
            expected = (span[1] - span[0], *value.shape[1:])
            if tuple(local.shape) != expected:
                raise UnsupportedShardingError(
                    f"{key!r}: local shard has shape {tuple(local.shape)}, expected {expected} for rows {span} of "
                    f"{tuple(value.shape)} split as DTensor's Shard(0); {SUPPORTED}"
                )
            entries[key] = LocalEntry(TensorSpec(tuple(value.shape), value.dtype), span, local)
        elif isinstance(value, torch.Tensor):
            entries[key] = _replicated_entry(value.shape, value.dtype, value)
    if len(groups) > 1:
        raise UnsupportedShardingError(
            f"parameters are sharded over {len(groups)} different meshes or mesh dimensions; {SUPPORTED} "
            "with one mesh for the whole model"
        )
    if collectives is None:
        if groups:
            (mesh, dim), = groups
            collectives = TorchCollectives(mesh.get_group(dim))
        else:
            collectives = _default_collectives()
    _own_replicated(entries, collectives.rank)
    kind = "fsdp2" if groups else "replicated"
    return ShardedView(module, entries, collectives, kind, _aliases(state, entries))


def _fsdp1_view(module: nn.Module, collectives: Any) -> ShardedView:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=False))
    if collectives is None:
        collectives = TorchCollectives(_fsdp1_group(module))
    entries: dict[str, LocalEntry] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            dim = _shard_dim(key, value)
            local = value.to_local()
            if dim is not None:
                start = _dtensor_row_offset(value, dim)
                entries[key] = LocalEntry(TensorSpec(tuple(value.shape), value.dtype), (start, start + local.shape[0]), local)
            else:
                entries[key] = _replicated_entry(value.shape, value.dtype, local)
        elif hasattr(value, "local_shards"):  # ShardedTensor
            entries[key] = _sharded_tensor_entry(key, value)
        elif isinstance(value, torch.Tensor):
            entries[key] = _replicated_entry(value.shape, value.dtype, value)
    _own_replicated(entries, collectives.rank)
    # FSDP1's sharded state dict holds tied weights once per name, as copies: tie them by name in the module
    return ShardedView(module, entries, collectives, "fsdp1", _module_aliases(module, entries), fsdp1_state=state)


def _fsdp1_group(module: nn.Module) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for m in module.modules():
        if isinstance(m, FullyShardedDataParallel):
            return m.process_group
    return None


def _dtensor_row_offset(value: Any, dim: int) -> int:
    mesh = value.device_mesh
    return chunk_rows(value.shape[0], mesh.size(dim), mesh.get_local_rank(dim))[0]


def _sharded_tensor_entry(key: str, value: Any) -> LocalEntry:
    shape = tuple(value.shape)
    shards = value.local_shards()
    spec = TensorSpec(shape, value.dtype if hasattr(value, "dtype") else shards[0].tensor.dtype)
    if not shards:  # this rank holds no row of it
        rows = shape[0] if shape else 1
        empty = torch.empty((0, *shape[1:]), dtype=spec.dtype)
        return LocalEntry(spec, (rows, rows), empty)
    if len(shards) > 1:
        raise UnsupportedShardingError(f"{key!r}: {len(shards)} local shards on one rank; {SUPPORTED}")
    meta = shards[0].metadata
    offsets, sizes = list(meta.shard_offsets), list(meta.shard_sizes)
    if any(offsets[1:]) or tuple(sizes[1:]) != shape[1:]:
        raise UnsupportedShardingError(
            f"{key!r}: local shard at offsets {offsets} of size {sizes} is not a row range of {shape}; {SUPPORTED}"
        )
    start = offsets[0] if offsets else 0
    return LocalEntry(spec, (start, start + (sizes[0] if sizes else 1)), shards[0].tensor)


def _replicated_entry(shape: Any, dtype: torch.dtype, local: torch.Tensor) -> LocalEntry:
    shape = tuple(shape)
    rows = shape[0] if shape else 1
    return LocalEntry(TensorSpec(shape, dtype), (0, rows), local, replicated=True)


def _own_replicated(entries: dict[str, LocalEntry], rank: int) -> None:
    """Entries every rank holds whole are merged by rank 0 alone (counted once in global quantities)."""
    for entry in entries.values():
        if entry.replicated and rank != 0:
            end = entry.rows[1]
            entry.rows = (end, end)


def _aliases(state: Mapping[str, Any], entries: Mapping[str, LocalEntry]) -> dict[str, str]:
    """Tied entries (one parameter under two names): later name -> first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in state.items():
        if key not in entries:
            continue
        if id(value) in first:
            aliases[key] = first[id(value)]
        else:
            first[id(value)] = key
    return aliases


def _module_aliases(module: nn.Module, entries: Mapping[str, LocalEntry]) -> dict[str, str]:
    """Tied parameters of a module, by identity of the parameter objects (later name -> first name)."""
    names = _param_names(module)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, param_id in names:
        if key not in entries:
            continue
        if param_id in first:
            aliases[key] = first[param_id]
        else:
            first[param_id] = key
    return aliases


def _param_names(module: nn.Module) -> Iterator[tuple[str, int]]:
    """(clean name, id) of every parameter under every name, FSDP1's wrapper prefixes removed."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    for name, param in module.named_parameters(remove_duplicate=False):
        yield clean_tensor_name(name), id(param)


def _default_collectives() -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchCollectives()
    from ..merging.collectives import SINGLE_PROCESS  # type: ignore[import-not-found]

    return SINGLE_PROCESS
