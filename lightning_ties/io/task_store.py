"""An on-disk store of task vectors for continual merging (safetensors, trimmed vectors stored sparsely).

Tasks arrive one at a time. Each fit's task vector tau_t = theta_t - theta_base is trimmed to the
top-k magnitudes with the engine's exact global threshold and stored in its own safetensors file,
sparse (flat int32 indices + float32 values) where that is smaller, so a store of t tasks holds
about 2k of t models on disk, and merging reads one tensor of one task at a time: task t never
needs t full checkpoints in memory. Per-task heads (float keys not merged) are kept whole.

Because the trim keeps exactly the top-k entries, trimming a stored vector again at the same k
(or a smaller one) keeps the same entries: merging the stored tasks with TIES at k equals
``ties_merge`` of the fine-tuned models (up to float rounding of base + tau - base).

Layout::

    root/index.json          {"format": "lightning-ties-task-store", "version": 1, "tasks": [...]}
    root/base.safetensors    the pretrained weights (written once)
    root/tasks/<name>.safetensors

Example:
    >>> import tempfile, torch
    >>> store = TaskVectorStore(tempfile.mkdtemp(), k=0.5)
    >>> store.save_base({"w": torch.zeros(4)})
    >>> store.add("a", {"w": torch.tensor([1.0, -3.0, 0.5, 2.0])})["stored"]
    2
    >>> store.task_vector("a")["w"].tolist()
    [0.0, -3.0, 0.0, 2.0]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..merging import MergeResult, MergeSpec, TensorSource, TensorSpec, as_source, merge, merged_task_vector
from ..merging.collectives import SINGLE_PROCESS, Collectives
from .atomic import atomic_open, clean_stale_in
from .locks import locked
from .ownership import check_writable
from .errors import CheckpointError
from .jsonsafe import loads as load_json
from .safetensors_file import SafetensorsFile, SafetensorsWriter

FORMAT = "lightning-ties-task-store"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # fullmatch: "$" would let a trailing newline through


class TaskVectorStore:
    """Task vectors on disk, added one task at a time and merged lazily.

    Args:
        root: the store's folder (created if missing).
        k: trim density applied when a task is added (``None``: store dense, untrimmed vectors).
            Later merges may use this k or a smaller one exactly.
        exclude: regexes of keys never merged (per-task heads); they are stored whole.
    """

    def __init__(self, root: str | os.PathLike[str], k: float | None = 0.2, exclude: str | Sequence[str] | None = None):
        self.root = Path(root)
        self.k = k
        self.exclude = exclude
        (self.root / "tasks").mkdir(parents=True, exist_ok=True)
        # Temporaries of an add() or save_base() killed mid-write (their process is gone).
        clean_stale_in(self.root)
        clean_stale_in(self.root / "tasks")
        self._index()  # a damaged index is reported now, not at the first merge

    # ---- index and base ----------------------------------------------------------------------
    def _index(self) -> dict[str, Any]:
        index = self.root / "index.json"
        if not index.exists():
            return {"format": FORMAT, "version": 1, "tasks": []}
        try:
            data = load_json(index.read_bytes(), str(index))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(
                f"{index}: unreadable task store index ({type(err).__name__}: {err}); restore it from a backup, "
                "or delete the store folder to start over"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{index} is not a {FORMAT} index (format={found!r}); is {self.root} a task store?")
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, str) and _NAME.fullmatch(t) for t in tasks):
            raise CheckpointError(
                f"{index}: corrupt task list {tasks!r}; restore it from a backup, or delete the store folder to start over"
            )
        return data

    def check(self) -> None:
        """Check the whole store cheaply (index, and the headers and metadata of every file).

        Reads no tensor data: a truncated or corrupt base or task file, or a task stored
        against another base, raises :class:`CheckpointError` naming the file. Call it before
        training (the callback does, at ``setup``) so a damaged store fails before the fit.

        Example:
            >>> import tempfile, torch
            >>> store = TaskVectorStore(tempfile.mkdtemp())
            >>> store.save_base({"w": torch.zeros(2)})
            >>> store.check()
        """
        names = self.names()
        self._refuse_sharded()
        if not self.has_base():
            if names:
                raise CheckpointError(f"{self.base_path} is missing but the store holds tasks {names}; restore it")
            return
        base = _open_file(self.base_path)
        base_source = _HeaderOnly(base)
        for name in names:
            path = self.task_path(name)
            if not path.exists():
                raise CheckpointError(f"{path}: task {name!r} is in {self.root / 'index.json'} but its file is missing")
            TaskVectorSource(path, base_source, label=f"{self.root}/{name}")

    def _refuse_sharded(self) -> None:
        """A store sharded ranks wrote holds its tensors in their folders: read or added to here, it would look
        empty or be torn apart (a task in no rank's folder)."""
        sharded = self._index().get("sharded")
        if sharded is not None:  # lightning_ties.distributed.store: each rank's rows in its own folder
            raise CheckpointError(
                f"{self.root} was written by a sharded fit on {sharded.get('world_size')} ranks (each rank's rows in "
                f"{self.root}/rank-<r>-of-<W>): continue it under a sharded strategy (on any number of ranks), or "
                "lay it out for one process first with lightning_ties.distributed.gather_store(store) (the one-process "
                "ContinualTiesMerging does this itself)"
            )

    def _write_index(self, **changes: Any) -> None:
        data = {**self._index(), **changes}
        with atomic_open(self.root / "index.json") as f:
            f.write(json.dumps(data, indent=1).encode())

    def index(self) -> dict[str, Any]:
        """The index's fields (``tasks``, ``choice``, and ``sharded`` for a store written by W ranks)."""
        return self._index()

    def update_index(self, **changes: Any) -> None:
        """Set index fields under the store's lock (a sharded store's rank 0 lists what every rank wrote)."""
        with self._locked():
            self._write_index(**changes)

    def names(self) -> list[str]:
        """Stored task names, in the order they were added."""
        return list(self._index()["tasks"])

    @property
    def choice(self) -> dict[str, float | None] | None:
        """The (k, lam) last chosen for the stored tasks (``{"k": ..., "lam": ...}``), if recorded."""
        return self._index().get("choice")

    def record_choice(self, k: float | None, lam: float) -> None:
        """Remember the merge chosen for the stored tasks (the next fit may start from it)."""
        with self._locked():
            self._write_index(choice={"k": k, "lam": lam})

    @property
    def base_path(self) -> Path:
        return self.root / "base.safetensors"

    def has_base(self) -> bool:
        return self.base_path.exists()

    def _locked(self) -> Any:
        """The store's lock (waits for another process's ``add``/``save_base``, saying so once)."""
        return locked(self.root, wait=True, lock=self.root / ".lightning-ties.lock")

    def save_base(self, base: Any) -> None:
        """Write the pretrained weights once (every task vector is relative to them).

        Refused once the store holds tasks: their vectors are relative to the stored base, so
        replacing it would silently change every one of them. Tied parameters (one tensor under
        two names) are written once per name, streamed tensor by tensor.
        """
        self._refuse_sharded()
        src = as_source(base, "base")
        check_writable(self.base_path)  # a file of another tool at that name is refused before any work
        with self._locked():
            names = self.names()
            if names:
                raise FileExistsError(
                    f"{self.base_path}: the store {self.root} holds tasks {names}, stored relative to this base; "
                    "it cannot be replaced. Use a new store folder for another base"
                )
            _write(self.base_path, src, {"format": FORMAT})

    def rewrite_base(self, base: Any) -> None:
        """Write the stored base again, as it is, in another layout (a store laid out for another number
        of processes: :mod:`lightning_ties.distributed.store`). Unlike :meth:`save_base` it is allowed
        while the store holds tasks: the caller gives the very entries the tasks are relative to."""
        src = as_source(base, "base")
        check_writable(self.base_path)
        with self._locked():
            _write(self.base_path, src, {"format": FORMAT})

    def base_state(self) -> dict[str, torch.Tensor]:
        self._refuse_sharded()
        if not self.has_base():
            raise FileNotFoundError(f"{self.base_path} does not exist; call save_base(base) first")
        base = _open_file(self.base_path)
        return {k: base.get(k) for k in base.specs}

    def _base(self, base: Any) -> TensorSource:
        return as_source(base if base is not None else self.base_state(), "base")

    # ---- tasks -----------------------------------------------------------------------------------
    def task_path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"task name {name!r} must be letters, digits, '_', '-' or '.'")
        return self.root / "tasks" / f"{name}.safetensors"

    def add(
        self, name: str, finetuned: Any, base: Any = None, overwrite: bool = False, *,
        collectives: Collectives = SINGLE_PROCESS, shards: dict[str, tuple[int, int]] | None = None,
    ) -> dict[str, int]:
        """Store tau = finetuned - base (trimmed at the store's k); returns entry counts.

        ``collectives``/``shards``: this rank's flat ranges of a model sharded over W ranks (sources
        with global specs and local pieces): the trim's threshold is the global one, and the file
        holds this rank's pieces, flat (:mod:`lightning_ties.distributed.store`).

        Returns:
            ``{"numel": merged entries, "stored": non-zero entries kept, "bytes": file size}``.
        """
        self._refuse_sharded()
        path = self.task_path(name)
        names = self.names()
        if name in names and not overwrite:
            raise FileExistsError(f"task {name!r} is already in the store {self.root}; pass overwrite=True")
        check_writable(path)
        base_src = self._base(base)
        spec = MergeSpec("magnitude", k=self.k, sign=None, merge="sum") if self.k is not None and self.k < 1 else (
            MergeSpec(None, sign=None, merge="sum")
        )
        tau = merged_task_vector(base_src, [finetuned], spec, exclude=self.exclude, collectives=collectives, shards=shards)
        if shards is not None:  # a rank's pieces are stored flat, as its base's
            tau = {key: t.reshape(-1) for key, t in tau.items()}
        ft = as_source(finetuned, name, base=base_src)
        full = {key: ft.get(key).detach().cpu() for key in ft.keys() if key not in tau and ft.spec(key).is_floating}
        return self.put(name, tau, full, overwrite=overwrite)

    def put(self, name: str, tau: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor],
            overwrite: bool = False) -> dict[str, int]:
        """Store task ``name`` as given: its (already trimmed) task vector and its unmerged entries.

        What :meth:`add` writes after the trim; a sharded store laid out for another world size
        (:mod:`lightning_ties.distributed.store`) writes the stored entries again, unchanged.
        ``tau`` is read twice, one key at a time (its non-zero counts fix the file's layout, then
        each key is encoded and written), so a mapping that makes each value when asked keeps
        one key in memory: a key with few non-zeros is stored as int32 indices and values.
        """
        path = self.task_path(name)
        check_writable(path)
        shapes: dict[str, list[int]] = {}
        specs: dict[str, TensorSpec] = {}
        stored = numel = 0
        for key in tau:  # first read: the layout
            t = tau[key]
            shapes[key] = list(t.shape)
            numel += t.numel()
            nnz = int(torch.count_nonzero(t))
            stored += nnz
            if _sparse(nnz, t.numel()):
                specs[f"idx/{key}"] = TensorSpec((nnz,), torch.int32)
                specs[f"val/{key}"] = TensorSpec((nnz,), t.dtype)
            else:
                specs[f"tau/{key}"] = TensorSpec(tuple(t.shape), t.dtype)
            del t
        for key, value in full.items():
            specs[f"full/{key}"] = TensorSpec(tuple(value.shape), value.dtype)
        meta = {"format": FORMAT, "k": json.dumps(self.k), "shapes": json.dumps(shapes)}
        with self._locked():  # another process's add between reading and writing the index would be lost
            names = self.names()
            if name in names and not overwrite:
                raise FileExistsError(f"task {name!r} was added to the store {self.root} meanwhile; pass overwrite=True")
            with atomic_open(path) as f, SafetensorsWriter(f, specs, meta, check_finite=True) as writer:
                for key in tau:  # second read: each key encoded and written, then let go
                    flat = tau[key].reshape(-1)
                    if f"tau/{key}" in specs:
                        writer.write(f"tau/{key}", flat.reshape(shapes[key]).contiguous())
                    else:
                        idx = torch.nonzero(flat).squeeze(1)
                        writer.write(f"idx/{key}", idx.to(torch.int32))
                        writer.write(f"val/{key}", flat[idx].contiguous())
                    del flat
                for key, value in full.items():
                    writer.write(f"full/{key}", value.contiguous())
            if name not in names:
                self._write_index(tasks=[*names, name])
        return {"numel": numel, "stored": stored, "bytes": path.stat().st_size}

    def source(self, name: str, base: Any = None) -> TaskVectorSource:
        """Task ``name`` as fine-tuned weights (base + stored tau), read lazily one key at a time."""
        self._refuse_sharded()
        if name not in self.names():
            raise KeyError(f"task {name!r} is not in the store {self.root}; stored: {self.names()}")
        return TaskVectorSource(self.task_path(name), self._base(base), label=f"{self.root}/{name}")

    def task_vector(self, name: str) -> dict[str, torch.Tensor]:
        """The stored (trimmed) task vector of ``name``, dense."""
        src = self.source(name, base=None) if self.has_base() else None
        if src is None:
            raise FileNotFoundError(f"{self.base_path} does not exist; call save_base(base) first")
        return {k: src.tau(k) for k in src.merged_keys}

    def merge(self, method: str = "ties", lam: float | None = None, base: Any = None, **params: Any) -> MergeResult:
        """Merge every stored task (``method``, ``lam`` and parameters as :func:`lightning_ties.merge`)."""
        self._refuse_sharded()
        names = self.names()
        if not names:
            raise ValueError(f"the store {self.root} holds no task yet")
        base_src = self._base(base)
        return merge(base_src, [self.source(n, base_src) for n in names], method, lam, exclude=self.exclude, **params)


class TaskVectorSource:
    """A stored task as a :class:`~lightning_ties.merging.TensorSource`: base + tau per key, on demand."""

    def __init__(self, path: Path, base: TensorSource, label: str) -> None:
        self.path = path
        self.base = base
        self.label = label
        self.files = [path]
        self._file = _open_file(path)
        meta = self._file.metadata
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a task vector of a {FORMAT} (format={meta.get('format')!r})")
        try:
            shapes = load_json(meta["shapes"], f"{path} metadata 'shapes'")
            self._shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(
                f"{path}: corrupt task metadata 'shapes' ({type(err).__name__}: {err}); add the task again"
            ) from None
        names = self._file.specs
        self._full = {n[len("full/"):]: names[n] for n in names if n.startswith("full/")}
        for key, shape in self._shapes.items():
            stored = [n for n in (f"tau/{key}", f"idx/{key}", f"val/{key}") if n in names]
            if stored not in ([f"tau/{key}"], [f"idx/{key}", f"val/{key}"]):
                raise CheckpointError(f"{path}: task vector of {key!r} is missing or incomplete; add the task again")
            if f"tau/{key}" in names and names[f"tau/{key}"].shape != shape:
                raise CheckpointError(f"{path}: {key!r} is stored as {names[f'tau/{key}'].shape}, metadata says {shape}")
        self.merged_keys = list(self._shapes)
        missing = [k for k in self.merged_keys if k not in base.keys()]
        if missing:
            raise CheckpointError(
                f"{path}: keys {missing[:5]} are not in the base; was this task stored against another base?"
            )
        wrong = [k for k in self.merged_keys if tuple(base.spec(k).shape) != self._shapes[k]]
        if wrong:
            raise CheckpointError(
                f"{path}: shapes of {wrong[:5]} differ from the base's; was this task stored against another base?"
            )

    def keys(self) -> list[str]:
        return [*self.merged_keys, *(k for k in self._full if k not in self._shapes)]

    def spec(self, key: str) -> TensorSpec:
        if key in self._shapes:
            return TensorSpec(self._shapes[key], self.base.spec(key).dtype)
        return self._full[key]

    def tau(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        if f"tau/{key}" in self._file.specs:
            return self._file.get(f"tau/{key}")
        idx, val = self._file.get(f"idx/{key}").long(), self._file.get(f"val/{key}")
        n = math.prod(shape)
        if idx.numel() != val.numel() or (idx.numel() and (idx.min() < 0 or idx.max() >= n)):
            raise CheckpointError(f"{self.path}: corrupt sparse task vector of {key!r} (indices out of range); add the task again")
        dense = torch.zeros(n, dtype=val.dtype)
        dense[idx] = val
        return dense.reshape(shape)

    def get(self, key: str) -> torch.Tensor:
        if key in self._shapes:
            b = self.base.get(key)
            if b.dtype == torch.float64:
                return b + self.tau(key).double()
            return (b.float() + self.tau(key)).to(b.dtype)
        return self._file.get(f"full/{key}")


def _open_file(path: Path) -> SafetensorsFile:
    """A store file's header, checked (size, offsets) before any tensor is read."""
    try:
        return SafetensorsFile(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. This task store file is damaged: add the task (or save the base) again") from None


class _HeaderOnly:
    """A stored base seen through its header (keys and specs), for :meth:`TaskVectorStore.check`."""

    def __init__(self, file: SafetensorsFile) -> None:
        self._file = file

    def keys(self) -> list[str]:
        return list(self._file.specs)

    def spec(self, key: str) -> TensorSpec:
        return self._file.specs[key]


def _sparse(nnz: int, numel: int) -> bool:
    """Whether a key's stored entries take less room as int32 indices + values than dense."""
    return nnz * 2 < numel and numel < 2**31


def _write(path: Path, source: TensorSource, metadata: dict[str, str]) -> None:
    """Stream ``source`` into ``path`` atomically (a temporary beside it, removed on any failure).

    Tensors are written one at a time at offsets fixed up front, so tied tensors (shared
    storage) need no copy and memory does not grow with the file.
    """
    specs = {k: source.spec(k) for k in source.keys()}
    with atomic_open(path) as f, SafetensorsWriter(f, specs, metadata, check_finite=True) as writer:
        for key in specs:
            writer.write(key, source.get(key))


__all__ = ["TaskVectorSource", "TaskVectorStore"]
