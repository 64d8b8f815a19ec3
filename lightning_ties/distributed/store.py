"""A continual task store written by W ranks of a sharded fit, each rank keeping only its own rows.

Layout (``root`` is the store folder the user names)::

    root/index.json              the tasks every rank has stored, the last (k, lam), and
                                 "sharded": {"world_size": W} (written by rank 0 after every rank succeeded)
    root/rank-<r>-of-<W>/        rank r's own TaskVectorStore: its flat pieces of the base and of each
                                 task vector, its index ("shards": its flat range of every key), its manifest

Each rank writes only its own folder, through :class:`~lightning_ties.io.task_store.TaskVectorStore`
(atomic files, recorded in that folder's manifest, never over a file we did not write). A task
vector is trimmed with the global threshold (the engine's counts all-reduced), so the pieces
are exactly the single-process store's entries of this rank's rows, and merging them equals
the single-process continual merge bit for bit. A store written by W ranks is read back by W
ranks sharded the same way (checked: every rank's ranges); a fit on another number of ranks first
writes its own ``rank-<r>-of-<W'>`` folders from the old ones, copying the stored entries of its
rows (:meth:`ShardedTaskStore._reshard`); so does a fit continuing a store one process wrote. One
process continues a store W ranks wrote once :func:`gather_store` has put the rows together into
whole tensors (``root/base.safetensors``, ``root/tasks/``), from the global shapes rank 0 records
in the index. A layout left from an earlier world size (or one process) is written again, never
read: the store may have grown since.

Example (on every rank, inside a process group, after ``fully_shard(model)``)::

    store = ShardedTaskStore("runs/store", sharded_view(model), k=0.2)
    store.check()
    if not store.has_base():
        store.save_base(view.local_state())
    store.add("b", view.source(label="b"))        # this run's rows, trimmed globally
    tasks = {name: store.source(name) for name in store.names()}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..io.errors import CheckpointError
from ..io.ownership import check_writable
from ..io.readers import SafetensorsSource
from ..io.safetensors_file import SafetensorsFile
from ..io.task_store import TaskVectorSource, TaskVectorStore
from ..merging.sources import TensorSpec
from .views import LocalSource, ShardedView, UnsupportedShardingError

T = TypeVar("T")


class ShardedTaskStore:
    """This rank's part of a task store (see the module's docstring); every method is collective.

    Args:
        root: the store folder.
        view: this rank's view of the sharded module (its flat ranges, its collectives).
        k: the trim density tasks are stored at (``None``: dense).
        exclude: regexes of keys never merged (heads): stored whole (their rows).
    """

    def __init__(self, root: str | Path, view: ShardedView, k: float | None, exclude: Any = None) -> None:
        self.root, self.view = Path(root), view
        coll = view.collectives
        self.rank, self.world_size = coll.rank, coll.world_size
        if dist.is_initialized() and dist.get_world_size() != self.world_size:  # HSDP: replicas would write one folder
            raise UnsupportedShardingError(
                f"a continual task store under HSDP (the parameters sharded over {self.world_size} of "
                f"{dist.get_world_size()} ranks) is not supported: every replica would write the same rank folders. "
                "Shard over every rank (FSDP2 Shard(0) on a 1-D mesh, or FSDPStrategy), or use TiesMerging(tasks=...)"
            )
        self.index = TaskVectorStore(self.root, k=k, exclude=exclude)
        self.local = TaskVectorStore(self.root / f"rank-{self.rank}-of-{self.world_size}", k=k, exclude=exclude)

    # ---- agreement: one rank's failure is every rank's error (no rank waits for a peer that raised) ----
    def _together(self, fn: Callable[[], T]) -> T:
        failure: BaseException | None = None
        value: Any = None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on this rank and (as a count) on the others
            failure = err
        failed = int(self.view.collectives.all_sum(torch.tensor([int(failure is not None)])).item())
        if failure is not None:
            raise failure
        if failed:
            raise CheckpointError(f"{self.root}: {failed} other rank(s) failed on the task store; see their errors")
        return value

    @property
    def _shards(self) -> dict[str, list[int]]:
        return {key: [int(a), int(b)] for key, (a, b) in self.view.shards.items()}

    def check(self) -> None:
        """Refuse a store this rank cannot continue: one of another model (the global shapes the index
        records), one with other row ranges (another sharding); then the rank's own files, headers only.
        A store written by one process or by another number of ranks is first laid out again for this
        one (:meth:`_reshard`)."""
        index = self._together(self.index.index)
        sharded = index.get("sharded")
        written_by = (sharded or {}).get("world_size")
        one_process = sharded is None and bool(index.get("tasks") or self.index.has_base())
        self._together(lambda: self._check_shapes((sharded or {}).get("shapes")))
        if one_process or (written_by is not None and written_by != self.world_size):
            self._together(lambda: self._reshard(written_by))

        def check() -> None:
            stored = self.local.index().get("shards")
            if stored is not None and stored != self._shards:
                raise CheckpointError(
                    f"{self.local.root}: this rank's rows differ from the ones it stored (another model or sharding); "
                    "continue the store with the same model and strategy, or use a new store folder"
                )
            for name in self.names():
                if name not in self.local.names():
                    raise CheckpointError(f"{self.local.root}: task {name!r} of {self.root} is missing here")
            self.local.check()

        self._together(check)
        if one_process or (sharded is not None and sharded != self._marker()):  # a store from before shapes were recorded
            self._together(self._mark_sharded)

    def _check_shapes(self, shapes: Mapping[str, Any] | None) -> None:
        """Refuse a store of another model: a key it recorded with another global shape than the module's."""
        specs = self.view.specs()
        for key, shape in (shapes or {}).items():
            if key in specs and list(shape) != list(specs[key].shape):
                raise CheckpointError(
                    f"{self.root}: {key!r} is stored with shape {list(shape)}, the module's is {list(specs[key].shape)}: "
                    "the store holds another model's weights; use a new store folder for this model"
                )

    def _reshard(self, old: int | None) -> None:
        """Write this rank's folder from what wrote the store: the folders of its ``old`` ranks, or (None)
        one process's whole tensors.

        Its rows of the base and of every stored task are the stored entries, copied as they are
        (trimmed once, with the global threshold: no re-trim, no base + tau - base rounding), so the
        merges that follow are the ones the store gave before. What was read is left as it was. A folder
        this rank kept from an earlier run on this world size is written again (the store may have grown,
        or replaced tasks, since): its files are ours; one changed by anyone else is refused
        (:func:`~lightning_ties.io.ownership.check_writable`).
        """
        if old is None:  # one process: a single 'rank' holding every key whole
            olds = [self.index]
            base_files = [SafetensorsFile(self.index.base_path)]
            layout = [{key: (0, spec.numel) for key, spec in base_files[0].specs.items()}]
        else:
            olds = _rank_stores(self.root, old)
            layout = [{key: tuple(r) for key, r in (o.index().get("shards") or {}).items()} for o in olds]
            base_files = [SafetensorsFile(o.base_path) for o in olds]

        what = f"{old} ranks" if old else "one process"

        def rows(key: str, read: Callable[[int], torch.Tensor]) -> torch.Tensor:  # this rank's flat range of `key`
            return _assemble(layout, key, *self.view.shards[key], read, self.root, what)

        mine = [key for key in base_files[0].specs if key in self.view.shards]
        self.local.rewrite_base({key: rows(key, lambda j, key=key: base_files[j].get(key)) for key in mine})
        self.local.update_index(shards=self._shards)
        for name in self.names():
            stored = _stored_tasks(olds, name, self.root)
            tau = {key: rows(key, lambda j, key=key: stored[j].tau(key))
                   for key in stored[0].merged_keys if key in self.view.shards}
            full = {key: rows(key, lambda j, key=key: stored[j].get(key)).reshape(self.view.entries[key].piece().shape)
                    for key in stored[0].keys() if key not in tau and key in self.view.shards}
            self.local.put(name, tau, full, overwrite=True)

    def _marker(self) -> dict[str, Any]:
        """The index's ``sharded`` field: the world size, and every key's global shape (what one process
        needs to put the rows together: :func:`gather_store`)."""
        return {"world_size": self.world_size,
                "shapes": {key: list(spec.shape) for key, spec in self.view.specs().items()}}

    def _mark_sharded(self) -> None:
        if self.rank == 0:
            self.index.update_index(sharded=self._marker())

    def names(self) -> list[str]:
        """The tasks every rank has stored, in the order they were added."""
        return self.index.names()

    def has_base(self) -> bool:
        """Whether the store holds the base; every rank's folder must agree (else the store is damaged)."""
        has = self.local.has_base()
        count = int(self.view.collectives.all_sum(torch.tensor([int(has)])).item())
        if count not in (0, self.world_size):
            raise CheckpointError(
                f"{self.root}: {count} of {self.world_size} ranks' folders hold the base; the store is damaged "
                "(restore it, or use a new store folder)"
            )
        return has

    def save_base(self, pieces: Mapping[str, torch.Tensor]) -> None:
        """Write this rank's pieces of the base (flat) and its ranges; then rank 0 marks the store as sharded."""
        def write() -> None:
            self.local.save_base({key: value.reshape(-1) for key, value in pieces.items()})
            self.local.update_index(shards=self._shards)

        self._together(write)
        self._together(self._mark_sharded)

    def base_pieces(self) -> dict[str, torch.Tensor]:
        """This rank's pieces of the stored base, shaped as the module's pieces."""
        flat = self.local.base_state()
        return {key: flat[key].reshape(entry.piece().shape) for key, entry in self.view.entries.items() if key in flat}

    def add(self, name: str, finetuned: LocalSource, base: Mapping[str, torch.Tensor]) -> None:
        """Store this rank's pieces of tau = finetuned - base, trimmed at the store's k with the global
        threshold; once every rank has, rank 0 lists the task (replacing an earlier one of that name)."""
        specs = self.view.specs()
        base_src = LocalSource(base, specs, "base", aliases=self.view.aliases)
        # what can be refused before the trim's collectives is refused together first: a rank raising inside
        # them would leave the others waiting in a collective it never joins
        self._together(lambda: check_writable(self.local.task_path(name)))
        self._together(lambda: self.local.add(name, finetuned, base_src, overwrite=True,
                                              collectives=self.view.collectives, shards=self.view.shards))

        def list_task() -> None:  # rank 0, once every rank has stored its rows; every rank sees it from here on
            names = self.names()
            if self.rank == 0 and name not in names:
                self.index.update_index(tasks=[*names, name])

        self._together(list_task)

    def source(self, name: str) -> StoredRows:
        """Task ``name`` as this rank's rows of its fine-tuned weights (base + stored tau), global specs."""
        if name not in self.names():
            raise KeyError(f"task {name!r} is not in the store {self.root}; stored: {self.names()}")
        return StoredRows(self.local.source(name), self.view, label=f"{self.root}/{name}")

    def record_choice(self, k: float | None, lam: float) -> None:
        """Rank 0 records the (k, lam) chosen for the stored tasks."""
        if self.rank == 0:
            self.index.record_choice(k, lam)

    @property
    def choice(self) -> dict[str, float | None] | None:
        return self.index.choice


def gather_store(store: TaskVectorStore) -> None:
    """Lay a store that W ranks wrote out for one process: whole tensors, put together from the ranks' rows.

    ``root/base.safetensors`` and ``root/tasks/<name>.safetensors`` get every rank's stored entries in
    flat order, shaped by the global shapes rank 0 recorded (no re-trim, no base + tau - base rounding:
    the merges are the ones the ranks gave); then the index says one process holds the store, and a
    sharded fit lays it out again from these files. Files of the store's earlier one-process layout
    are written again (ours; one changed by anyone else is refused). A store one process holds is
    left as it is. The one-process ``ContinualTiesMerging`` runs this at setup (rank 0, under DDP).

    Example::

        store = TaskVectorStore("runs/store", k=0.2)   # written by fits on 2 ranks
        gather_store(store)
        merged = store.merge("ties", lam=1.0)
    """
    sharded = store.index().get("sharded")
    if sharded is None:
        return
    world, shapes = sharded.get("world_size"), sharded.get("shapes")
    if not isinstance(shapes, dict):
        raise CheckpointError(
            f"{store.root / 'index.json'}: the store written by {world} ranks records no global shapes (an earlier "
            "lightning-ties wrote it): continue it once under the sharded strategy, which records them, then here"
        )
    olds = _rank_stores(store.root, world)
    layout = [{key: tuple(r) for key, r in (o.index().get("shards") or {}).items()} for o in olds]
    what = f"{world} ranks"

    def whole(key: str, read: Callable[[int], torch.Tensor]) -> torch.Tensor:
        if key not in shapes:
            raise CheckpointError(f"{store.root / 'index.json'}: no global shape of {key!r} recorded; the store is damaged "
                                  "(restore it, or use a new store folder)")
        return _assemble(layout, key, 0, math.prod(shapes[key]), read, store.root, what).reshape(shapes[key])

    base_files = [SafetensorsFile(o.base_path) for o in olds]
    specs = {key: TensorSpec(tuple(shapes.get(key, ())), spec.dtype) for key, spec in base_files[0].specs.items()}
    store.rewrite_base(_Whole(specs, lambda key: whole(key, lambda j: base_files[j].get(key)), f"{store.root} base"))
    for name in store.names():
        stored = _stored_tasks(olds, name, store.root)
        # each key put together when the store reads it (twice, one key at a time): never a whole task in memory
        tau = _OnDemand(stored[0].merged_keys, lambda key, stored=stored: whole(key, lambda j: stored[j].tau(key)))
        full = {key: whole(key, lambda j, key=key: stored[j].get(key)) for key in stored[0].keys() if key not in tau}
        store.put(name, tau, full, overwrite=True)
    store.update_index(sharded=None)


class _OnDemand(Mapping[str, torch.Tensor]):
    """A mapping whose values are made when asked (not kept): a task's keys, each put together from the ranks."""

    def __init__(self, keys: Sequence[str], make: Callable[[str], torch.Tensor]) -> None:
        self._keys, self._known, self._make = list(keys), set(keys), make

    def __contains__(self, key: object) -> bool:  # without making the value (Mapping's own would)
        return key in self._known

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._make(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Whole:
    """Whole tensors of the given specs, each put together when read (a lazy source, streamed to a file)."""

    def __init__(self, specs: Mapping[str, TensorSpec], read: Callable[[str], torch.Tensor], label: str) -> None:
        self._specs, self._read, self.label = specs, read, label

    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key]

    def get(self, key: str) -> torch.Tensor:
        return self._read(key)


def _rank_stores(root: Path, world: Any) -> list[TaskVectorStore]:
    """The ``world`` rank folders of a sharded store, each checked to exist (opening one creates it)."""
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{root / 'index.json'}: world size {world!r} is not a number of ranks; the store is damaged")
    folders = [root / f"rank-{j}-of-{world}" for j in range(world)]
    missing = [f.name for f in folders if not (f / "index.json").is_file()]
    if missing:
        raise CheckpointError(
            f"{root}: the store was written by {world} ranks but {missing} is missing; restore it, or use a new store folder"
        )
    return [TaskVectorStore(f, k=None) for f in folders]


def _stored_tasks(olds: Sequence[TaskVectorStore], name: str, root: Path) -> list[TaskVectorSource]:
    """Task ``name`` as each old rank (or one process) stored it, each against its own stored base."""
    if any(name not in o.names() for o in olds):
        raise CheckpointError(f"{root}: task {name!r} is missing from a rank's folder; the store is damaged "
                              "(restore it, or use a new store folder)")
    return [o.source(name, base=SafetensorsSource([o.base_path])) for o in olds]


def _assemble(layout: Sequence[Mapping[str, tuple[int, int]]], key: str, start: int, stop: int,
              read: Callable[[int], torch.Tensor], root: Path, what: str) -> torch.Tensor:
    """Entries ``[start, stop)`` of ``key``'s flat tensor from the old ranks whose ranges in ``layout`` cover them
    (``read(j)``: rank ``j``'s stored piece); an empty range keeps the stored dtype."""
    if start == stop:
        return read(_holder(layout, key, None, root, what)).reshape(-1)[:0]
    parts, pos = [], start
    while pos < stop:
        j = _holder(layout, key, pos, root, what)
        lo, hi = layout[j][key]
        parts.append(read(j).reshape(-1)[pos - lo : min(stop, hi) - lo])
        pos = min(stop, hi)
    return torch.cat(parts)


def _holder(layout: Sequence[Mapping[str, tuple[int, int]]], key: str, pos: int | None, root: Path, what: str) -> int:
    """The index of the old rank (in ``layout``, each rank's flat range per key) holding entry ``pos`` of
    ``key`` (``None``: any entry)."""
    for j, ranges in enumerate(layout):
        if key in ranges and (pos is None or ranges[key][0] <= pos < ranges[key][1]):
            return j
    raise CheckpointError(
        f"{root}: nothing of what wrote the store ({what}) holds entry {pos or 0} of {key!r}; "
        "the store is damaged (restore it, or use a new store folder)"
    )


class StoredRows(LocalSource):
    """A stored task's pieces on this rank as the sharded merge reads them: global specs, local rows, lazily."""

    def __init__(self, stored: TaskVectorSource, view: ShardedView, label: str) -> None:
        super().__init__({}, view.specs(), label, aliases={})
        self.stored, self.view = stored, view

    def keys(self) -> Sequence[str]:
        present = set(self.stored.keys())
        return [key for key in self.view.entries if key in present]

    def get(self, key: str) -> torch.Tensor:
        return self.stored.get(key).reshape(self.view.entries[key].piece().shape)


__all__ = ["ShardedTaskStore", "StoredRows", "gather_store"]
