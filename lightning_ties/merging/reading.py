"""Reading task vectors for the engine: tau = theta_t - theta_base, one key (or chunk) at a time.

:class:`TaskReader` holds what every pass of a merge shares: the base and model sources, the
merge device and compute dtype, the chunk size, reusable scratch buffers and, on W ranks,
which flat range of each key this rank holds (its *shard*). Every read goes through here, so
the passes (thresholds, merge, fused kernels) never touch a source themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from .sources import TensorSource

DeviceLike = str | torch.device | None
DEFAULT_CHUNK = 1 << 16
# Off the CPU each chunk costs a few kernel launches and host syncs whatever its size, so the
# chunk is as large as this many entries over all tasks allow ([N, chunk] scratch buffers of
# 1 GiB each in float32): whole tensors in practice.
_DEVICE_CHUNK_ENTRIES = 1 << 28


def check_device(device: torch.device, option: str) -> torch.device:
    """``device`` when this machine has it; a CUDA device without CUDA is one clear error (not torch's assertion).

    Example:
        >>> check_device(torch.device("cpu"), "device")
        device(type='cpu')
    """
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(
                f"{option}={str(device)!r}, but this machine has {count} CUDA device(s): "
                f"use {option}='cpu'" + (f" or one of cuda:0..cuda:{count - 1}" if count else "")
            )
    return device


def resolve_device(device: DeviceLike, base: TensorSource) -> torch.device:
    """``device`` as a torch.device; None: where base's tensors live (CPU for file sources)."""
    if device is not None:
        return check_device(torch.device(device), "device")
    found = getattr(base, "device", None)
    return torch.device(found) if found is not None else torch.device("cpu")


class TaskReader:
    """The N task vectors of a key, flat, in ``compute_dtype`` on ``device``: whole or chunked.

    ``shards`` (None: every key whole) maps a key to the flat range ``(start, stop)`` of the
    row-major flattened tensor that the sources return for it here; ``spec(key)`` stays the
    global shape. A key with an empty range is never read.

    Example:
        >>> from lightning_ties.merging import StateDictSource
        >>> r = TaskReader(StateDictSource({"w": torch.zeros(3)}), [StateDictSource({"w": torch.ones(3)})])
        >>> r.task_vectors("w")
        tensor([[1., 1., 1.]])
    """

    def __init__(
        self,
        base: TensorSource,
        models: Sequence[TensorSource],
        compute_dtype: torch.dtype = torch.float32,
        device: DeviceLike = None,
        chunk_size: int | None = None,
        shards: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.base = base
        self.models = list(models)
        self.compute_dtype = compute_dtype
        self.device = resolve_device(device, base)
        self.on_cpu = self.device.type == "cpu"
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK if self.on_cpu else max(DEFAULT_CHUNK, _DEVICE_CHUNK_ENTRIES // len(self.models))
        self.chunk_size = chunk_size
        self.shards = shards
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def n_tasks(self) -> int:
        return len(self.models)

    def numel(self, key: str) -> int:
        """Entries of ``key`` in the whole model (all ranks together)."""
        return self.base.spec(key).numel

    def local_range(self, key: str) -> tuple[int, int]:
        """The flat range ``(start, stop)`` of ``key`` read here (``(0, numel)`` without shards)."""
        if self.shards is None:
            return 0, self.numel(key)
        try:
            start, stop = self.shards[key]
        except KeyError:
            raise ValueError(f"shards has no range for merged key {key!r}; give every merged key one ((0, 0): none here)") from None
        return int(start), int(stop)

    def local_numel(self, key: str) -> int:
        start, stop = self.local_range(key)
        return stop - start

    def buffer(self, name: str, columns: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reusable ``[N, columns]`` scratch tensor (``compute_dtype`` by default): fresh large tensors per chunk cost page faults."""
        buf = self._buffers.get(name)
        dtype = dtype or self.compute_dtype
        if buf is None or buf.shape[1] < columns or buf.dtype != dtype:
            buf = torch.empty(self.n_tasks, max(columns, min(self.chunk_size, 1 << 16)), dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:, :columns]

    def get(self, source: TensorSource, key: str) -> torch.Tensor:
        """One tensor of a source (this rank's range of it), flat, on the merge device (no copy when already there)."""
        t = source.get(key)
        if self.shards is not None and t.numel() != self.local_numel(key):
            start, stop = self.local_range(key)
            raise ValueError(
                f"{source.label} returned {t.numel()} entries for {key!r}, but its shard is the flat range "
                f"[{start}, {stop}) ({stop - start} entries); return exactly this rank's range"
            )
        return t.reshape(-1).to(self.device)

    def local_shape(self, key: str) -> tuple[int, ...]:
        """The shape tau_m of ``key`` comes out in here: global for a whole key, flat for a part."""
        start, stop = self.local_range(key)
        spec = self.base.spec(key)
        return tuple(spec.shape) if (start, stop) == (0, spec.numel) else (stop - start,)

    def chunks(self, key: str, chunk_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, taus)``: the N task vectors of ``key`` over one flat chunk, [N, c].

        ``start`` counts from the start of what is read here. The buffer is reused between
        chunks: consumers must not keep it. A key with an empty range yields nothing.
        """
        if self.local_numel(key) == 0:
            return
        base, fts = self.inputs(key)
        yield from self.chunks_of(base, fts, 0, base.numel(), chunk_size)

    def inputs(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Base's and the models' flat tensors of ``key`` (this rank's range) on the merge device."""
        return self.get(self.base, key), [self.get(m, key) for m in self.models]

    def chunks_of(
        self,
        base: torch.Tensor,
        fts: Sequence[torch.Tensor],
        begin: int,
        end: int,
        chunk_size: int | None = None,
        buffer: str = "taus",
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """:meth:`chunks` over the columns ``[begin, end)`` of tensors already read, in scratch ``buffer``."""
        cd = self.compute_dtype
        size = chunk_size or self.chunk_size
        for start in range(begin, end, size):
            stop = min(end, start + size)
            b = base[start:stop].to(cd)
            taus = self.buffer(buffer, stop - start)
            for i, ft in enumerate(fts):
                if ft.dtype == cd:
                    torch.sub(ft[start:stop], b, out=taus[i])
                else:  # subtract in compute precision, not in the stored (e.g. bf16) one
                    taus[i].copy_(ft[start:stop]).sub_(b)
            yield start, taus

    def task_vectors(self, key: str) -> torch.Tensor:
        """The N task vectors of ``key`` as one fresh ``[N, local numel]`` tensor (for small tensors)."""
        if self.local_numel(key) == 0:
            return torch.empty(self.n_tasks, 0, dtype=self.compute_dtype, device=self.device)
        base = self.get(self.base, key).to(self.compute_dtype)
        return torch.stack([self.get(m, key).to(self.compute_dtype) - base for m in self.models])

    def check_finite(self, taus: torch.Tensor, key: str) -> None:
        """A ValueError naming the models whose task vector at ``key`` holds NaN or Inf."""
        bad = [m.label for m, row in zip(self.models, taus) if not bool(torch.isfinite(row).all())]
        if bad:
            raise ValueError(f"task vector of {', '.join(bad)} at {key!r} holds NaN or Inf values; fix or exclude it")

    def check_finite_sum(self, taus: torch.Tensor, key: str) -> None:
        # One reduction catches NaN/Inf (and overflow); the exact culprit is found only then.
        if not bool(torch.isfinite(taus.sum())):
            self.check_finite(taus, key)


@contextmanager
def single_threaded_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """``workers`` threads whose torch ops each run on one core, for work split by hand.

    On a VM (or a busy host) every parallel region of torch's intra-op pool costs a
    fork/join that can wait ~0.5 ms for a descheduled core; the merge runs tens of thousands
    of small ops, so splitting its columns over threads that each run single-threaded ops
    scales where the ops' own parallelism does not. ``torch.set_num_threads(1)`` in a worker
    is that thread's setting, but it also changes the process default until it is set back:
    the caller's value is restored once every worker has started.
    """
    saved = torch.get_num_threads()
    started = threading.Barrier(workers + 1)

    def start() -> None:
        # A thread's first torch call copies the process default into its own setting: make
        # that call first, else it undoes the 1 below once the caller restores its value.
        torch.get_num_threads()
        torch.set_num_threads(1)
        started.wait()

    pool = ThreadPoolExecutor(workers, initializer=start, thread_name_prefix="lightning-ties")
    try:
        for _ in range(workers):
            pool.submit(lambda: None)
        started.wait()
        torch.set_num_threads(saved)
        yield pool
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(saved)


__all__ = ["DEFAULT_CHUNK", "DeviceLike", "TaskReader", "check_device", "resolve_device", "single_threaded_pool"]
