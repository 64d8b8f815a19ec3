"""``merge_to`` on W processes: join the ranks a launcher started, split the output, publish it once.

Under ``torchrun --nproc_per_node=W`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``, on one host or several sharing a file system) every rank runs
the same ``merge_to`` call:

1. Every rank opens the sources and plans from their headers alone; :func:`assign_keys` gives
   each rank a contiguous run of the output's tensors in file order, balanced by the bytes
   read to produce them. No communication.
2. Rank 0 lays the output's files out (headers, sizes) in one temporary; the ranks exchange
   their status and the temporary's path (:meth:`Ranks.exchange`).
3. Each rank merges its own tensors and writes them at their offsets in those files. Global
   quantities (the trim's thresholds, the election's majority sign) go through the merger's
   collectives (:class:`TorchCollectives`).
4. Every rank reports success; only then rank 0 writes the index, card and config and
   publishes the output atomically; every rank learns that it did.

A rank that fails tells the others at the next exchange, or, in the middle of the merge, by
tearing down the process group, which makes every peer's pending or next collective fail at
once (gloo sees the closed connection; a killed rank closes it too). Every rank then removes
the temporary and raises; nobody waits for the default 30-minute timeout: the group's timeout
is ``LIGHTNING_TIES_DIST_TIMEOUT`` seconds (default 120), the most one rank may wait for another
at one collective (a hung rank, a lost host). One window is left: rank 0 killed (SIGKILL)
while it writes the headers, before the others know the temporary's name; the next write
at that path removes it (:func:`~lightning_ties.io.atomic.clean_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ..merging.sources import TensorSpec
from .digests import hash_range
from .errors import OutputWriteError
from .ownership import remember_digest
from .safetensors_file import check_finite_tensor, layout_header, nbytes
from .tempfiles import TEMP, clean_stale

#: Seconds one rank may wait for the others at a collective before every rank gives up.
ENV_TIMEOUT = "LIGHTNING_TIES_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# Room for one rank's status line in an exchange (longer messages are cut).
_MESSAGE_BYTES = 2048
# merge_to calls that started a group in this process (the same count on every rank)
_JOINS = itertools.count()


class RankFailedError(RuntimeError):
    """Another rank of a multi-process merge failed, was killed or stopped answering.

    Raised on every rank but the one that failed (which raises its own error). Nothing is
    left at the output path and no temporary remains.
    """


class TorchCollectives:
    """The merger's collectives (``all_sum``, ``all_gather``) over a ``torch.distributed`` group (None: the default).

    The one implementation, for ``merge_to`` on W processes and for the merge of a sharded fit
    (:mod:`lightning_ties.distributed` imports it). Tensors travel on the backend's device (CPU
    for gloo, the current CUDA device for NCCL) and come back on the caller's device;
    ``all_sum`` returns int64 for integer and bool inputs and float64 for floating ones (the
    widened sum, never rounded back). Any failure of a collective (a peer that died, a timeout)
    becomes a :class:`RankFailedError`.

    Example:
        >>> import torch.distributed as dist, tempfile
        >>> store = dist.FileStore(tempfile.mktemp(), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> TorchCollectives().all_gather(torch.tensor([1, 2]))
        tensor([[1, 2]])
        >>> TorchCollectives().all_sum(torch.tensor([1, 2], dtype=torch.int32))
        tensor([1, 2])
        >>> dist.destroy_process_group()
    """

    def __init__(self, group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCollectives needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or a Lightning strategy's setup)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = timeout_s
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def __repr__(self) -> str:
        return f"TorchCollectives(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``t`` over the group's ranks (int64 or float64), on ``t``'s device."""
        wide = torch.float64 if t.is_floating_point() else torch.int64
        buf = t.detach().to(self.device, wide, copy=True)
        with self._peers_failing():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.to(t.device)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order: ``(world_size, *t.shape)``, on ``t``'s device.

        Every rank must pass the same shape and dtype.
        """
        if t.dtype == torch.bool:  # not every backend gathers bool
            return self.all_gather(t.to(torch.uint8)).to(torch.bool)
        local = t.detach().to(self.device).contiguous()
        out = torch.empty((self.world_size, *local.shape), dtype=local.dtype, device=self.device)
        with self._peers_failing():
            dist.all_gather(list(out.unbind(0)), local, group=self.group)
        return out.to(t.device)

    @contextlib.contextmanager
    def _peers_failing(self) -> Iterator[None]:
        try:
            yield
        except RankFailedError:
            raise
        except Exception as err:
            raise RankFailedError(
                f"rank {self.rank}: a collective with the other ranks failed ({str(err).strip().splitlines()[0][:300]}): "
                "another rank failed or was killed (its own error says why), or did not answer within "
                f"{self.timeout_s:.0f} s (raise {ENV_TIMEOUT} for ranks that legitimately wait longer)"
            ) from err


def _timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be a positive number of seconds")
    return value


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (set by torchrun or your launcher)") from None


class Ranks:
    """The process group one multi-process ``merge_to`` runs on, owned for that one call.

    ``close`` tears the group down (also after a failure, which breaks it); :meth:`abort` does
    it at once so that the peers' collectives fail instead of waiting.
    """

    def __init__(self, group: Any, owns_default: bool, timeout_s: float) -> None:
        self.group = group
        self.owns_default = owns_default
        self.collectives = TorchCollectives(group, timeout_s)
        self.rank = self.collectives.rank
        self.world_size = self.collectives.world_size
        self._open = True

    def abort(self) -> None:
        """Tear the group down now: every peer's pending and next collective fails at once."""
        if self._open:
            self._open = False
            with contextlib.suppress(Exception):
                dist.destroy_process_group(None if self.owns_default else self.group)

    close = abort

    def exchange(self, error: BaseException | None, stage: str, payload: str = "") -> list[str]:
        """Every rank reports ``error`` (or success with ``payload``); returns the payloads by rank.

        Raises on every rank when one failed: that rank its own ``error``, the others a
        :class:`RankFailedError` naming it and quoting its error.
        """
        text = (f"{type(error).__name__}: {error}" if error is not None else payload).encode()
        if error is None and len(text) > _MESSAGE_BYTES:
            raise ValueError(f"exchange payload of {len(text)} bytes exceeds {_MESSAGE_BYTES}")
        row = torch.zeros(1 + _MESSAGE_BYTES, dtype=torch.uint8)
        row[0] = error is not None
        text = text[:_MESSAGE_BYTES]
        row[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else row[1:1]
        rows = self.collectives.all_gather(row)
        messages = [bytes(r[1:].tolist()).rstrip(b"\0").decode(errors="replace") for r in rows]
        failed = [(r, messages[r]) for r in range(self.world_size) if int(rows[r, 0])]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            others = f" (and rank(s) {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
            raise RankFailedError(f"rank {rank}{others} failed while {stage}: {message}")
        return messages

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def join_ranks(device: str | torch.device | None = None, distributed: bool | None = None) -> Ranks | None:
    """The ranks this process merges with, or None when it merges alone.

    ``distributed``: None detects; False merges alone whatever the environment (a call made
    on one rank only, e.g. under ``if trainer.is_global_zero``); True requires several ranks.
    Detected: an initialised default group of several ranks (used through a new group with
    this call's short timeout), else ``WORLD_SIZE`` > 1 with ``RANK`` (or ``LOCAL_RANK`` on one
    host) and ``MASTER_PORT`` (``MASTER_ADDR`` defaults to 127.0.0.1). The backend is gloo,
    with NCCL for CUDA tensors when CUDA is available.
    """
    if distributed is False:
        return None
    timeout_s = _timeout_s()
    timeout = timedelta(seconds=timeout_s)
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return _alone(distributed, "the initialised process group has one rank")
        with _joining(dist.get_world_size(), timeout_s):
            group = dist.new_group(backend=backend, timeout=timeout)
        return Ranks(group, owns_default=False, timeout_s=timeout_s)
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return _alone(distributed, f"WORLD_SIZE is {world if world is not None else 'not set'}")
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed; run one process")
    rank = _env_int("RANK")
    rank = _env_int("LOCAL_RANK") if rank is None else rank
    port = _env_int("MASTER_PORT")
    if rank is None or port is None:
        raise ValueError(
            f"WORLD_SIZE={world} asks for a multi-process merge, but RANK (or LOCAL_RANK) and MASTER_PORT are not "
            "both set: start it with torchrun, or set them (and MASTER_ADDR on several hosts), or pass distributed=False"
        )
    if cuda and torch.device(device or "cuda").index is None and _env_int("LOCAL_RANK") is not None:
        torch.cuda.set_device(_env_int("LOCAL_RANK"))
    address = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    with _joining(world, timeout_s):
        store, _, _ = next(dist.rendezvous(f"tcp://{address}:{port}?rank={rank}&world_size={world}", timeout=timeout))
        # The launcher's store outlives a group: each call's keys get their own prefix, or a second
        # merge_to in the same processes would meet the first one's addresses and wait forever.
        store = dist.PrefixStore(f"lightning_ties/merge_to/{next(_JOINS)}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Ranks(None, owns_default=True, timeout_s=timeout_s)


def _alone(distributed: bool | None, why: str) -> None:
    if distributed:
        raise ValueError(f"distributed=True, but {why}: start the merge with torchrun (or your launcher) on several ranks")
    return None


@contextlib.contextmanager
def _joining(world: int, timeout_s: float) -> Iterator[None]:
    """Setting up the group: a rank that never comes is one error with what to do, not a traceback."""
    try:
        yield
    except Exception as err:
        raise RankFailedError(
            f"merge_to runs on all {world} ranks of this job, but they did not all join within {timeout_s:.0f} s "
            f"({str(err).strip().splitlines()[0][:200]}): call merge_to on every rank, or pass distributed=False "
            "to merge in this process alone (e.g. under `if trainer.is_global_zero:`)"
        ) from err


def process_rank() -> int:
    """This process's rank in the job that launched it (0 alone): who reports a multi-process merge.

    Example:
        >>> process_rank()  # one process, no launcher
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return 0
    rank = _env_int("RANK")
    return _env_int("LOCAL_RANK") or 0 if rank is None else rank


@contextlib.contextmanager
def stopped_by_sigterm(rank: int) -> Iterator[None]:
    """Turn SIGTERM into a :class:`RankFailedError` while the block runs (main thread only).

    A launcher stops the remaining ranks with SIGTERM when one fails; raising lets them
    remove their temporaries on the way out. A handler the program installed itself is kept.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process
        raise RankFailedError(f"rank {rank} was stopped by SIGTERM (a launcher stops every rank when one fails)")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def assign_keys(costs: Mapping[str, int], world_size: int, together: Mapping[str, str] | None = None,
                head_start: int = 0) -> dict[str, int]:
    """Rank of every key: contiguous runs in the given order, balanced by cost.

    A key goes to the rank whose share of the total cost holds its midpoint; a key named in
    ``together`` (tied weights: alias -> first name) goes with that other key. ``head_start``:
    work rank 0 does besides (hashing), counted before the first key, so it takes that much less.

    Example:
        >>> assign_keys({"a": 4, "b": 4, "c": 1, "d": 7}, 2)
        {'a': 0, 'b': 0, 'c': 1, 'd': 1}
        >>> assign_keys({"a": 4, "b": 4, "c": 1, "d": 7}, 2, head_start=4)
        {'a': 0, 'b': 1, 'c': 1, 'd': 1}
    """
    total = (sum(costs.values()) + head_start) or 1
    owner: dict[str, int] = {}
    done = head_start
    for key, cost in costs.items():
        owner[key] = min(world_size - 1, int((done + cost / 2) * world_size // total))
        done += cost
    for alias, first in (together or {}).items():
        if alias in owner and first in owner:
            owner[alias] = owner[first]
    return owner


# ---- files laid out by rank 0, filled by every rank -------------------------------------------------
Layout = Mapping[str, tuple[Mapping[str, TensorSpec], Mapping[str, str]]]
"""Output files (name inside the temporary, ``""`` for the temporary itself) -> (specs in file order, metadata)."""


def create_layout(root: Path, layout: Layout) -> None:
    """Write every file's header and give it its final size (rank 0, before anyone writes)."""
    for name, (specs, metadata) in layout.items():
        header, _ = layout_header(specs, metadata)
        path = root / name if name else root
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _pwrite_all(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(nbytes(s) for s in specs.values()))
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class PartWriter:
    """Write this rank's tensors into files laid out by :func:`create_layout` (any order).

    ``close`` checks every key of ``mine`` was written and fsyncs, so an exchange after it
    reports data on disk. An OS error (a full disk) becomes an :class:`OutputWriteError`
    naming ``output``, the path the user asked for. An inf/NaN tensor is refused as the
    one-process writers do (:func:`~lightning_ties.io.safetensors_file.check_finite_tensor`).
    """

    def __init__(self, root: Path, layout: Layout, mine: set[str], output: Path | None = None) -> None:
        self.output = output or root
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._fds: list[int] = []
        self._missing = set(mine)
        try:
            for name, (specs, metadata) in layout.items():
                keys = [k for k in specs if k in mine]
                if not keys:
                    continue
                fd = os.open(root / name if name else root, os.O_WRONLY)
                self._fds.append(fd)
                _, offsets = layout_header(specs, metadata)
                for key in keys:
                    self._where[key] = (fd, offsets[key], specs[key])
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, tensor: torch.Tensor) -> None:
        fd, offset, spec = self._where[key]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{key!r} is {tuple(tensor.shape)} {tensor.dtype}, the layout says {spec.shape} {spec.dtype}")
        check_finite_tensor(self.output, key, tensor)
        with self._naming_output():
            _pwrite_all(fd, memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()), offset)
        self._missing.discard(key)

    def close(self) -> None:
        try:
            if self._missing:
                raise ValueError(f"tensors of this rank never written: {sorted(self._missing)[:10]}")
            with self._naming_output():
                for fd in self._fds:
                    os.fsync(fd)
        finally:
            self.abort()

    @contextlib.contextmanager
    def _naming_output(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise OutputWriteError(
                err.errno or errno.EIO,
                f"cannot write {self.output}: {err.strerror or err}; the disk may be full or the folder not writable. "
                "Nothing was written at that path",
            ) from err

    def abort(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


class OutputHashes:
    """The sha256 of every output file, hashed by the ranks that wrote it rather than re-read at publish.

    A file's hasher is the rank owning its first tensor (rank 0 for a file without tensors). As
    soon as its own tensors are on disk it hashes the file's start: the header (rank 0 wrote it
    before anyone merged) and its run of tensors there, a whole file when it wrote all of it
    (:meth:`hash_heads`, while other ranks may still merge). :meth:`finish` waits until every
    rank has written, hashes the rest of the files it started, shares every digest (one
    all_gather of 33 bytes per file) and, on rank 0, records them for the manifest
    (:func:`~lightning_ties.io.ownership.remember_digest`): publishing reads no file again.
    """

    def __init__(self, root: Path, layout: Layout, owners: Mapping[str, int], rank: int) -> None:
        self.rank = rank
        self.paths = [root / name if name else root for name in layout]
        # per file hashed here: its index, where this rank's run at its start ends, its size
        self._mine: list[tuple[int, int, int]] = []
        self._started: dict[int, Any] = {}
        for index, (specs, metadata) in enumerate(layout.values()):
            header, offsets = layout_header(specs, metadata)
            keys = [k for k in specs if nbytes(specs[k])]  # empty tensors are written by nobody
            head = owners[keys[0]] if keys else 0
            end = len(header)
            for key in keys:
                if owners[key] != head:
                    break
                end = offsets[key] + nbytes(specs[key])
            if head == rank:
                self._mine.append((index, end, len(header) + sum(nbytes(s) for s in specs.values())))

    def hash_heads(self) -> None:
        """Hash the start of every file this rank hashes: the part it and the header hold (on disk already)."""
        for index, end, _ in self._mine:
            self._started[index] = self._hash(index, hashlib.sha256(), 0, end)

    def finish(self, collectives: Any) -> dict[Path, str]:
        """Every file's sha256 by path, on every rank (a collective: every rank calls it once it has written)."""
        collectives.all_gather(torch.zeros(1, dtype=torch.uint8))  # every rank's tensors are on disk now
        rows = torch.zeros(len(self.paths), 33, dtype=torch.uint8)  # a flag, then the digest
        for index, end, size in self._mine:
            h = self._hash(index, self._started.pop(index), end, size)
            rows[index, 0] = 1
            rows[index, 1:] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
        gathered = collectives.all_gather(rows)
        digests = {self.paths[i]: bytes(row[1:].tolist()).hex() for rank_rows in gathered for i, row in enumerate(rank_rows) if row[0]}
        if self.rank == 0:
            for path, sha256 in digests.items():
                remember_digest(path, sha256)
        return digests

    def _hash(self, index: int, h: Any, start: int, stop: int) -> Any:
        fd = os.open(self.paths[index], os.O_RDONLY)
        try:
            hash_range(fd, h, start, stop)
        finally:
            os.close(fd)
        return h


def remove_temporary(path: Path) -> None:
    """Remove a shared temporary (folder or file) another rank created; gone already is fine.

    When the rank that created it was killed, its output lock file is left beside it too:
    :func:`~lightning_ties.io.tempfiles.clean_stale` removes that (and any other leftover of a
    dead process of this host), so a killed rank 0 leaves nothing when a survivor shares its host.
    """
    if TEMP.fullmatch(path.parent.name):  # a single file's temporary lies in a private folder of ours
        path = path.parent
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    clean_stale(path)  # the folder it lies in


def run_on_ranks(
    ranks: Ranks,
    prepare: Callable[[], Any],
    create: Callable[[Any], contextlib.AbstractContextManager[Path]],
    merge: Callable[[Any, Path], None],
    publish: Callable[[Any, Path], None],
) -> Any:
    """The staged protocol of a multi-process write (see the module's docstring); returns ``prepare()``'s job.

    ``prepare()`` (every rank: open, check, plan); ``create(job)`` (rank 0: a context yielding
    the laid-out temporary, published when it exits cleanly, removed on error); ``merge(job,
    tmp)`` (every rank: its own tensors, on disk when it returns); ``publish(job, tmp)`` (rank
    0, after every rank succeeded: the index, card and config).
    """
    with stopped_by_sigterm(ranks.rank), contextlib.ExitStack() as rank0_output:
        try:
            job = prepare()
            tmp = rank0_output.enter_context(create(job)) if ranks.rank == 0 else None
        except BaseException as err:
            ranks.exchange(err, "checking the inputs and laying out the output")
        shared = Path(ranks.exchange(None, "checking the inputs and laying out the output", str(tmp or ""))[0])
        try:
            try:
                merge(job, shared)
            except RankFailedError:
                raise
            except BaseException:
                ranks.abort()  # the peers may be inside a collective: make it fail now
                raise
            ranks.exchange(None, "merging")
        except BaseException:
            if ranks.rank != 0:
                remove_temporary(shared)  # rank 0's own context removes it too, unless rank 0 was killed
            raise
        failure: BaseException | None = None
        if ranks.rank == 0:
            try:
                publish(job, shared)
                rank0_output.close()  # the atomic rename
            except BaseException as err:
                failure = err
        ranks.exchange(failure, "publishing the output")
    return job
