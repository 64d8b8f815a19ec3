"""The merging callbacks' work on a sharded module: base at fit start, merge at fit end, lam in place.

A plain object the Lightning hooks call (no Lightning here): the callback says which module
holds the shards (the LightningModule under FSDP2, the strategy's FSDP wrapper under FSDP1)
and gives the task sources matched to the module's keys; this object keeps this rank's rows
of the base (CPU) and of tau_m, so that every rank holds about 1/W of each.

Example (on every rank; ``module`` sharded by ``fully_shard``)::

    fit = ShardedFitMerge(module)
    fit.capture_base()                      # on_fit_start
    ...                                     # training
    merged = fit.merge({"a": source_a}, "b", MergeOptions("ties", k=0.2, lam=1.0))  # on_fit_end
    merged.apply_(0.9)                      # another lam, the same tau_m

A resumed fit captures the base again at fit start (Lightning restores a sharded checkpoint after
``on_fit_start``), so :attr:`ShardedFitMerge.base_fingerprint`, an exact identity of the whole base
that is the same on any number of ranks, lets the callback prove it is the base the first fit took.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..merging.options import MergeOptions
from ..merging.sources import TensorSource
from .merge import ShardedMerge, merge_sharded_
from .views import RowsSource, ShardedView, sharded_view


class ShardedFitMerge:
    """This rank's part of a fit's merge: the base's rows captured once, tau_m's rows per merge.

    Args:
        module: the module whose state dict holds the shards (FSDP2 DTensors or an FSDP1 root).
        base_device: where the captured base rows are kept (CPU by default: no GPU memory).
    """

    def __init__(self, module: nn.Module, base_device: torch.device | str = "cpu") -> None:
        self.module = module
        self.base_device = torch.device(base_device)
        self.base: dict[str, torch.Tensor] | None = None
        #: :func:`rows_fingerprint` of the captured base (every rank alike)
        self.base_fingerprint: str | None = None

    def view(self) -> ShardedView:
        """A fresh view of the module (FSDP1's sharded state dict is a copy: rebuilt at every use)."""
        return sharded_view(self.module)

    @property
    def keys(self) -> list[str]:
        return self.view().keys

    def capture_base(self, source: TensorSource | None = None) -> None:
        """Keep this rank's rows of the base: the module's own shards now, or ``source``'s rows
        (a base given as a checkpoint, its keys matched to the module's)."""
        view = self.view()
        if source is None:
            self.base = view.local_state(self.base_device)
        else:
            rows = RowsSource(source, view.rows)
            self.base = {k: rows.get(k).to(self.base_device) for k in rows.keys()}
        self.base_fingerprint = rows_fingerprint(view, self.base)

    def finetuned(self) -> dict[str, torch.Tensor]:
        """A CPU copy of this rank's rows of the module as it is now (the fine-tuned weights)."""
        return self.view().local_state()

    def merge(
        self,
        tasks: Mapping[str, TensorSource],
        task: str,
        options: MergeOptions,
        finetuned: Mapping[str, torch.Tensor] | None = None,
        apply: bool = True,
    ) -> ShardedMerge:
        """Merge the other ``tasks`` (sources with the module's keys and global shapes) with this run's
        weights (``finetuned``: local rows; default: the module's shards themselves, read before anything
        is written, so no copy is made) under ``task``, and apply ``options.lam`` in place unless
        ``apply=False``. Collective: every rank calls it with the same arguments."""
        if self.base is None:
            raise RuntimeError("no base captured: call capture_base() at fit start, before training changes the weights")
        view = self.view()
        mine = view.source(dict(finetuned) if finetuned is not None else None, label=task)
        sources = [*tasks.values(), mine]
        return merge_sharded_(view, self.base, sources, options, apply=apply)

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write this rank's rows (e.g. :meth:`finetuned`'s copy) back into the module."""
        self.view().write_(state)


#: Entries per step of :func:`_residue` (32 MB of int64 temporaries, on the piece's device).
_CHUNK = 1 << 22
_MASK = (1 << 64) - 1
_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rows_fingerprint(view: ShardedView, pieces: Mapping[str, torch.Tensor]) -> str:
    """An exact identity of the whole tensors whose rows this rank holds in ``pieces``, the same on any number
    of ranks (collective: every rank calls it).

    Per key, the sum over the entries of ``bits(x_i) * (i + 1)`` modulo 2**64 (``i``: the entry's global flat
    index): integer sums, so neither the split nor the order of addition changes them, and all-reduced; any
    changed bit or moved entry changes them. Returns the sha256 of every key's sum (hex, 32 characters).

    Example (in one process: one rank holding everything)::

        rows_fingerprint(sharded_view(model), sharded_view(model).local_state())
    """
    keys = [key for key in view.keys if key in pieces]
    sums = [_residue(pieces[key], view.entries[key].flat[0]) for key in keys]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in sums], dtype=torch.int64)
    total = view.collectives.all_sum(signed)  # int64 adds wrap: the sum modulo 2**64
    text = ";".join(f"{key}={int(v) & _MASK}" for key, v in zip(keys, total))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _residue(piece: torch.Tensor, start: int) -> int:
    """``sum(bits(x_i) * (start + i + 1)) mod 2**64`` over the flat ``piece`` (its bit patterns as integers).

    Per step of ``n`` entries at offset ``o``: ``sum(b_j * (j + 1)) + (start + o) * sum(b_j)``, with one weight
    vector for every step; torch's int64 products and sums wrap, i.e. are exact modulo 2**64.
    """
    flat = piece.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.int8)
    weights = torch.arange(1, min(_CHUNK, flat.numel()) + 1, dtype=torch.int64, device=flat.device)
    total = 0
    for lo in range(0, flat.numel(), _CHUNK):
        bits = flat[lo : lo + _CHUNK].contiguous().view(_SAME_WIDTH_INT[flat.element_size()]).to(torch.int64)
        total += int((bits * weights[: bits.numel()]).sum()) + (start + lo) * int(bits.sum())
    return total & _MASK


def full_state(module: nn.Module, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The whole tensors of a sharded module, one at a time gathered on every rank (for small checks
    and for writing a merged model from rank 0; costs one whole tensor at a time, not the model)."""
    view = sharded_view(module)
    out: dict[str, torch.Tensor] = {}
    coll = view.collectives
    for key, entry in view.entries.items():
        if keys is not None and key not in keys:
            continue
        out[key] = gather_entry(entry, coll)
    return out


def gather_entry(entry: Any, collectives: Any, piece: torch.Tensor | None = None) -> torch.Tensor:
    """One entry whole, from every rank's rows (``piece``, default the module's; collective).

    Exact: each entry comes from one rank, the others add zeros (in float64 / int64).
    """
    numel = entry.spec.numel
    flat = torch.zeros(numel, dtype=torch.float64 if entry.spec.is_floating else torch.int64)
    start, stop = entry.flat
    flat[start:stop] = (entry.piece() if piece is None else piece).reshape(-1).to(flat.dtype).cpu()
    return collectives.all_sum(flat).to(entry.spec.dtype).reshape(entry.spec.shape)


def save_full_safetensors(
    view: ShardedView, path: str | Any, writer: bool, piece_of: Callable[[str], torch.Tensor | None] | None = None
) -> None:
    """Write the module's whole tensors to one safetensors file, gathered one tensor at a time.

    ``piece_of(key)``: this rank's rows to write instead of the module's (None: the module's), e.g. a
    merge that is not applied: ``lambda key: merged.piece(key, lam)``. Collective: every rank calls it; only ``writer`` (global
    rank 0) writes, atomically (a temporary sibling renamed over ``path``). Peak extra memory: one whole
    tensor (float64).
    """
    from contextlib import ExitStack
    from pathlib import Path

    from ..io.atomic import atomic_file
    from ..io.safetensors_file import SafetensorsWriter

    with ExitStack() as stack:
        out = None
        if writer:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(atomic_file(path))
            out = stack.enter_context(SafetensorsWriter(tmp, view.specs()))
        for key, entry in view.entries.items():
            first = view.aliases.get(key, key)
            piece = piece_of(first) if piece_of is not None else None
            tensor = gather_entry(entry, view.collectives, piece)
            if out is not None:
                out.write(key, tensor)
