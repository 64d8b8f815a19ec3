"""The streaming merge from files: headers checked, tau_m pulled key by key, written as it comes.

``merge_to`` opens every source lazily, checks all headers at once, then pulls ``(key, tau_m)``
from the engine's :class:`~lightning_ties.merging.TaskVectorMerger` and writes
``base + lam * tau_m`` straight into the output's pre-laid-out safetensors shards. Peak memory
is a few tensors per model, whatever the model size; the output appears atomically at the end.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..merging import MergeOptions, MergePlan, MergeReport, TaskVectorMerger, plan_merge
from ..merging.collectives import SINGLE_PROCESS, Collectives
from ..merging.engine import model_list
from ..merging.spec import MergeSpec
from ..merging.plan import Patterns, compile_patterns
from ..merging.sources import TensorSource, TensorSpec, as_source, read_strided
from .atomic import atomic_dir, atomic_file, atomic_open, check_output, library_version, owner_metadata
from .card import SourceDigests, merge_model_card, source_files, write_merge_config
from .formats import open_source
from .hf_folder import DEFAULT_MAX_SHARD_SIZE, parse_size, plan_shards, write_index
from .ranks import Layout, OutputHashes, PartWriter, assign_keys, create_layout, join_ranks, run_on_ranks
from .safetensors_file import SafetensorsWriter, nbytes
from .sinks import ShardedWriter, copy_model_files, save_lightning_checkpoint
from .validate import CommonRowsSource, check_compatible

OutputFormat = Literal["folder", "safetensors", "ckpt"]


# Tensors over this size are read into buffers kept from one read to the next. glibc serves
# allocations over 32 MiB by mapping fresh memory (a page fault per 4 KiB: such reads ran at
# ~2 GB/s), and a stream of 4-11 MB tensors from its heap left it fragmented (+1.2 GB of RSS
# over the sample pass). Measured on bench_distributed.py's 4 x 168M (one process, one thread):
# main-thread CPU 8.3 s -> 6.1 s, peak RSS 1.2-1.8 GB (varies run to run) -> 1.6 GB.
_REUSED_BUFFER_BYTES = 1 << 20
_BUFFERS = 2  # per source


class RecentTensorCache:
    """Keep the last tensor read from a source, since the engine reads one key several times in a row.

    A per-tensor trim reads each key once per selection pass and once to merge; serving the
    repeats from memory turns three file reads into one. Holds one tensor per source.
    (Reading the next key ahead in a thread was tried: tensors allocated in another thread
    land in another malloc arena, and the global merge's peak RSS grew by ~0.9 GB.)

    Tensors over 1 MiB from a source that reads into a given buffer (``get_into``) are read
    into buffers kept for the next ones: the first one nothing else holds (a write in flight,
    a caller's view of the previous tensor kept while the next is read). Two suffice for a
    loop that holds the last tensor while it reads the next; when both are held a new one
    replaces the smaller (its holder keeps it alive as long as it needs it).
    """

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.label = source.label
        self._key: str | None = None
        self._value: torch.Tensor | None = None
        self._buffers: list[torch.Tensor] = []  # flat uint8, for the tensors over _REUSED_BUFFER_BYTES
        #: called with each key read (a progress bar follows the passes that come before the merge)
        self.on_read: Callable[[str], None] | None = None

    def __getattr__(self, name: str) -> object:  # files, folder, prefix... of the wrapped source
        try:
            wrapped = self.__dict__["source"]
        except KeyError:  # not initialised yet (copy, pickle)
            raise AttributeError(name) from None
        return getattr(wrapped, name)

    def keys(self) -> Sequence[str]:
        return self.source.keys()

    def spec(self, key: str) -> TensorSpec:
        return self.source.spec(key)

    def get(self, key: str) -> torch.Tensor:
        if self.on_read is not None:
            self.on_read(key)
        if key != self._key:
            self._key, self._value = None, None  # free the old tensor before reading the new one
            self._value = self._read(key)
            self._key = key
        assert self._value is not None
        return self._value

    def get_strided(self, key: str, first: int, stride: int) -> torch.Tensor:
        """``get(key).reshape(-1)[first::stride]`` from the source itself (a file reads only those entries)."""
        return read_strided(self.source, key, first, stride)

    def _read(self, key: str) -> torch.Tensor:
        # the class's own get_into: a wrapper's __getattr__ (CommonRowsSource's) would forward
        # the wrapped source's, which reads the wrapped rows (a vocabulary of another size)
        get_into = getattr(type(self.source), "get_into", None)
        size = nbytes(self.source.spec(key))
        if get_into is None or size <= _REUSED_BUFFER_BYTES:
            return self.source.get(key)
        free = [i for i, b in enumerate(self._buffers) if not _held_elsewhere(b)]
        fits = [i for i in free if self._buffers[i].numel() >= size]
        if fits:
            return get_into(self.source, key, self._buffers[fits[0]])
        # a free buffer too small is dropped before the new one is taken; else the smaller held one
        if free or len(self._buffers) == _BUFFERS:
            self._buffers.pop(free[0] if free else min(range(_BUFFERS), key=lambda i: self._buffers[i].numel()))
        self._buffers.append(torch.empty(size, dtype=torch.uint8))
        return get_into(self.source, key, self._buffers[-1])


def _held_elsewhere(buffer: torch.Tensor) -> bool:
    """Whether a tensor other than ``buffer`` shares its memory (a view handed out and still alive).

    Counts the references to its storage: ``buffer`` and the storage object asked here hold
    one each. Without that count (another torch), a buffer is never reused.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is None or use_count(buffer.untyped_storage()._cdata) > 2


class WriteBehind:
    """Hand tensors to a sink in a background thread, at most one write in flight.

    The next key is merged while the previous one is written (``os.pwrite`` releases the
    GIL); the tensor being written is the only extra memory. Errors surface on the next
    call or on :meth:`wait`.
    """

    def __init__(self, put: Callable[[str, torch.Tensor], None]) -> None:
        self._put = put
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        self._last: Future[None] | None = None

    def __call__(self, key: str, tensor: torch.Tensor) -> None:
        self.wait()
        self._last = self._pool.submit(self._put, key, tensor)

    def wait(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        """Wait for the write in flight (its error, if any, is dropped: one is already raised)."""
        try:
            self.wait()
        except BaseException:
            pass
        self._pool.shutdown(wait=True)


def _open(obj: Any, label: str, base: TensorSource | None, prefix: str | None, trust_pickle: bool) -> TensorSource:
    if isinstance(obj, (str, os.PathLike)):
        return open_source(obj, base=base, prefix=prefix, trust_pickle=trust_pickle)
    return as_source(obj, label)


def _source_paths(sources: Sequence[Any]) -> list[Path]:
    paths: list[Path] = []
    for source in sources:
        inner = source.model if isinstance(source, CommonRowsSource) else source
        paths += [Path(f) for f in getattr(inner, "files", None) or []]
        if getattr(inner, "folder", None) is not None:
            paths.append(Path(inner.folder))
    return paths


def _output_format(output: Path, output_format: str | None) -> OutputFormat:
    fmt = output_format or {".safetensors": "safetensors", ".ckpt": "ckpt"}.get(output.suffix, "folder")
    if fmt not in ("folder", "safetensors", "ckpt"):
        raise ValueError(f"output_format must be 'folder', 'safetensors' or 'ckpt', got {output_format!r}")
    return fmt  # type: ignore[return-value]


def _yaml_value(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_yaml_value(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return repr(value)


def _pattern_list(patterns: Patterns, what: str) -> list[str] | None:
    """``include``/``exclude`` as the config holds them, a list of regexes: given as one string, compiled, or a list."""
    return None if patterns is None else [p.pattern for p in compile_patterns(patterns, what)]


def merge_to(
    output: str | os.PathLike[str],
    base: Any,
    models: Sequence[Any],
    method: str = "ties",
    lam: float | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    common_rows: bool = False,
    on_mismatch: Literal["error", "base"] = "error",
    output_format: OutputFormat | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    config_from: str | os.PathLike[str] | None = None,
    prefix: str | None = None,
    trust_pickle: bool = False,
    hash_sources: bool = True,
    progress: bool | None = None,
    overwrite: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    **params: Any,
) -> MergeReport:
    """Merge checkpoints into ``output`` tensor by tensor, never holding a whole model in memory.

    Args:
        output: a folder (Hugging Face layout: sharded safetensors + index, the base's config
            and tokenizer files, ``README.md`` model card, ``merge_config.yaml``), a
            ``.safetensors`` file, or a Lightning ``.ckpt`` (held in memory to be pickled).
        base, models: paths (any format :func:`open_source` reads), modules, state dicts or sources.
        method, lam, params: a registered merge method, its lam (method default when None)
            and its parameters (``k``, ``scope``, ``sign``, ``merge``...).
        include, exclude: regexes choosing the keys to merge; others come from base.
        common_rows: merge the rows shared by tensors whose row counts differ (vocabulary
            sizes such as 32000 vs 32001); the output keeps base's shapes.
        on_mismatch: ``"error"``: one error listing every selected key a model lacks or has
            with another shape/dtype, before any tensor is read; ``"base"``: take those keys
            from base (the engine warns).
        max_shard_size: largest shard of a folder output (``"5GB"``, ``"500MiB"``, bytes).
        config_from: folder whose config/tokenizer files are copied (default: base's folder).
        prefix, trust_pickle: passed to :func:`open_source` for ``.ckpt``/pickled inputs.
        hash_sources: record each source file's sha256 in the card (hashed in the background).
        progress: a tqdm bar over tensors; None shows it only on a terminal.
        overwrite: replace an existing output (atomically; on failure it is left as it was),
            only if lightning-ties wrote it (its marker) and, for a folder, every file in it.
            An output that is, contains or lies inside an input is always refused, before any work.
        compute_dtype: ``torch.float32`` or ``torch.float64`` for the merge arithmetic.
        device: where to merge (``"cuda"``: tensors read from disk are moved to the GPU and
            merged there, the global threshold too); None: the base's device (CPU for files).
            The file written is the same on every device.
        distributed: None: merge on every rank of the job when started by ``torchrun`` (or any
            launcher setting ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) or inside an
            initialised process group of several ranks; every rank must then make the same call,
            each merges and writes its share, rank 0 publishes, and the output is the one process
            writes, byte for byte (see :mod:`lightning_ties.io.ranks`). False: this process alone
            (a call made on one rank only). True: several ranks are required.

    Returns:
        The :class:`MergeReport` (method, params, sources, merged and skipped keys, lam).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp() + "/merged.safetensors"
        >>> base = {"w": torch.zeros(4)}
        >>> report = merge_to(out, base, [{"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}], k=0.5, progress=False)
        >>> open_source(out).get("w")
        tensor([ 0., -2.,  0.,  3.])
    """
    models = model_list(models)  # before its items are taken for paths to check
    options = MergeOptions.from_keywords(method, lam, include, exclude, **params)  # every keyword checked once
    options.spec  # noqa: B018  (a method that needs data, RegMean, refuses here: before any file is opened)
    lam = options.lam
    if on_mismatch not in ("error", "base"):
        raise ValueError(f"on_mismatch must be 'error' or 'base', got {on_mismatch!r}")
    fmt = _output_format(Path(output), output_format)
    kind: Literal["file", "folder"] = "folder" if fmt == "folder" else "file"
    output = check_output(output, overwrite, inputs=[base, *models, config_from], kind=kind)
    if fmt == "folder":
        parse_size(max_shard_size)

    ranks = join_ranks(device, distributed)
    if ranks is not None and fmt == "ckpt":
        ranks.close()
        raise ValueError(
            f"{output}: a Lightning .ckpt is pickled whole by one process; under {ranks.world_size} processes "
            "write a folder or a .safetensors file (or run one process)"
        )
    args = dict(
        base=base, models=list(models), method=options.method,
        lam=lam if options.merge_method.has_lam else None, include=include, exclude=exclude,
        common_rows=common_rows, on_mismatch=on_mismatch, max_shard_size=str(max_shard_size),
        prefix=prefix, trust_pickle=trust_pickle, compute_dtype=str(compute_dtype).removeprefix("torch."),
    )

    jobs: list[_MergeJob] = []  # the one prepared, for its hashing to be stopped whatever happens

    def prepare(rank: int = 0, world_size: int = 1) -> _MergeJob:
        """Open, check and plan from the headers (every rank the same; no collectives)."""
        base_src = _open(base, "base", None, prefix, trust_pickle)
        model_srcs = [_open(m, f"model[{i}]", base_src, prefix, trust_pickle) for i, m in enumerate(models)]
        if common_rows:
            model_srcs = [CommonRowsSource(m, base_src) for m in model_srcs]
        if on_mismatch == "error":
            check_compatible(base_src, model_srcs, options.include, options.exclude)
        # The files the sources read (shards an index names, an adapter's folder) are inputs too.
        check_output(output, overwrite, inputs=_source_paths([base_src, *model_srcs]), kind=kind)
        plan = plan_merge(base_src, model_srcs, options.include, options.exclude)
        specs = {k: base_src.spec(k) for k in plan.keys}
        job = _MergeJob(base_src, model_srcs, plan, specs, _layout(fmt, specs, max_shard_size, method))
        jobs.append(job)
        if hash_sources and fmt == "folder":
            sources = [base_src, *model_srcs]
            one_file = sum(nbytes(spec) for spec in specs.values()) if len(job.layout) == 1 else 0
            hashes = None if world_size == 1 else _hashed_by(sources, rank, world_size, one_file)
            job.digests = SourceDigests(sources, hashes)
        job.report = MergeReport.from_plan(plan, method, options.method_params, [m.label for m in model_srcs], lam=lam)
        return job

    def start(job: _MergeJob, collectives: Collectives = SINGLE_PROCESS, mine: set[str] | None = None) -> _MergedStream:
        """The merger (its collectives run from here on: on W ranks, after every rank prepared) and its stream."""
        base_cached = RecentTensorCache(job.base)
        models_cached = [RecentTensorCache(m) for m in job.models]
        if mine is None or _merged_whole_on_every_rank(options.spec):
            job.merger = TaskVectorMerger(
                base_cached, models_cached, options, compute_dtype=compute_dtype, plan=job.plan, device=device
            )
        else:
            numels = {k: job.specs[k].numel for k in job.plan.merge_keys}
            job.merger = TaskVectorMerger(
                base_cached, models_cached, options, compute_dtype=compute_dtype, plan=job.plan, device=device,
                collectives=collectives, shards={k: (0, n) if k in mine else (0, 0) for k, n in numels.items()},
            )
        return _MergedStream(base_cached, job.merger, job.plan, lam, progress if collectives.rank == 0 else False, mine)

    def publish(job: _MergeJob, tmp: Path, index: bool) -> None:
        if fmt == "folder":
            if index and len(job.layout) > 1:  # as ShardedWriter.close writes it
                weight_map = {key: name for name, (shard, _) in job.layout.items() for key in shard}
                write_index(tmp, weight_map, sum(nbytes(s) for s in job.specs.values()))
            copy_model_files(config_from or getattr(job.base, "folder", None), tmp)
            recipe = _recipe(args, job.report, job.plan, job.base, job.models, job.digests)
            write_merge_config(tmp, recipe, relative_to=output.parent)
            merge_model_card(recipe, relative_to=output.parent).save(tmp / "README.md")

    try:
        if ranks is not None:
            with ranks:
                owners = functools.partial(_owners, world_size=ranks.world_size)
                job = run_on_ranks(
                    ranks,
                    prepare=lambda: prepare(ranks.rank, ranks.world_size),
                    create=lambda job: _laid_out(output, fmt, job.layout, overwrite),
                    merge=lambda job, tmp: _merge_part(
                        job, tmp, output, lambda mine: start(job, ranks.collectives, mine), owners(job), ranks.collectives
                    ),
                    publish=lambda job, tmp: publish(job, tmp, index=True),
                )
        else:
            job = prepare()
            stream = start(job)
            if fmt == "folder":
                with atomic_dir(output, overwrite=overwrite) as tmp:
                    with ShardedWriter(tmp, job.specs, max_shard_size, check_finite=True) as writer:
                        stream.run(writer.write)
                    publish(job, tmp, index=False)
            elif fmt == "safetensors":
                with atomic_open(output, overwrite) as tmp, SafetensorsWriter(
                    tmp, job.specs, {**owner_metadata(), "merge_method": method}, check_finite=True
                ) as writer:
                    stream.run(writer.write)
            else:
                merged: dict[str, torch.Tensor] = {}
                stream.run(merged.__setitem__)
                save_lightning_checkpoint(
                    {k: merged[k] for k in job.plan.keys}, output, getattr(job.base, "hyper_parameters", None),
                    prefix=getattr(job.base, "prefix", ""), overwrite=overwrite,
                )
    finally:
        for prepared in jobs:
            prepared.cancel_hashing()
    job.report.thresholds = [t.value for t in job.merger.thresholds] if job.merger.thresholds else None
    return job.report


class _MergeJob:
    """One merge_to call's opened sources, plan, output layout and merger (one rank's, on W ranks)."""

    def __init__(
        self, base: TensorSource, models: list[TensorSource], plan: MergePlan, specs: dict[str, TensorSpec], layout: Layout
    ) -> None:
        self.base, self.models, self.plan, self.specs, self.layout = base, models, plan, specs, layout
        self.digests: SourceDigests | None = None
        self.report: MergeReport
        self.merger: TaskVectorMerger

    def cancel_hashing(self) -> None:
        if self.digests is not None:
            self.digests.cancel()


def _layout(fmt: OutputFormat, specs: dict[str, TensorSpec], max_shard_size: int | str, method: str) -> Layout:
    """The output's safetensors files as the one-process writers lay them out (same bytes)."""
    if fmt == "folder":
        return {name: (shard, {"format": "pt"}) for name, shard in plan_shards(specs, max_shard_size).items()}
    return {"": (specs, {"format": "pt", **owner_metadata(), "merge_method": method})}


# Measured on bench_distributed.py's 4 x 168M (2 ranks, thread CPU time): a tensor over 32 MiB
# costs ~1.2x per byte what the 4-11 MB ones do (its passes run out of cache), and hashing the
# output costs ~6.5% of merging it (sha256 at ~1.5 GB/s against ~100 MB/s of merged output).
_LARGE_TENSOR_BYTES, _LARGE_TENSOR_WEIGHT = 32 << 20, 1.2
_HASH_WEIGHT = 0.065


def _owners(job: _MergeJob, world_size: int) -> dict[str, int]:
    """Each output tensor's rank: runs in the plan's key order, balanced by the cost of producing them.

    The plan's order is the global trim's stream order, so each rank's merged keys are one
    run of it (a rank's tie count then decides its share of the threshold's ties). A key costs
    the bytes read to produce it; rank 0 also hashes a one-file output whole (the file's start
    is its own: :class:`~lightning_ties.io.ranks.OutputHashes`), so it takes that much less.
    """
    merged = set(job.plan.merge_keys)
    reads = 1 + len(job.models)

    def cost(key: str, spec: TensorSpec) -> int:
        size = nbytes(spec)
        weight = _LARGE_TENSOR_WEIGHT if size > _LARGE_TENSOR_BYTES else 1.0
        return int(size * weight * (reads if key in merged else 0 if key in job.plan.aliases else 1))

    costs = {key: cost(key, job.specs[key]) for key in job.plan.keys}
    # several files: each rank hashes about its own bytes; with the sources hashed, the split
    # of their files gives rank 0 fewer of them instead (_hashed_by)
    hashing = 0
    if len(job.layout) == 1 and job.digests is None:
        hashing = int(sum(nbytes(spec) for spec in job.specs.values()) * reads * _HASH_WEIGHT)
    return assign_keys(costs, world_size, together=job.plan.aliases, head_start=hashing)


def _merged_whole_on_every_rank(spec: MergeSpec) -> bool:
    """normfrac/normmass over the global scope: every rank merges every key and writes its own.

    Their task norms are float sums whose rounding depends on how the entries are split, so
    the merger refuses to agree on them across ranks; computing them whole on each rank keeps
    the output identical to one process (without the speed-up).
    """
    return spec.scope == "global" and spec.sign in ("normfrac", "normmass")


@contextlib.contextmanager
def _laid_out(output: Path, fmt: OutputFormat, layout: Layout, overwrite: bool) -> Iterator[Path]:
    """Rank 0: the atomic temporary of ``output`` with every file laid out, published on a clean exit.

    Every rank writes its tensors into these files by name, so the single file is a named
    temporary (``atomic_file``: inside a private folder), not ``atomic_open``'s descriptor.
    """
    with (atomic_dir(output, overwrite=overwrite) if fmt == "folder" else atomic_file(output, overwrite)) as tmp:
        create_layout(tmp, layout)
        yield tmp


def _merge_part(
    job: _MergeJob,
    tmp: Path,
    output: Path,
    start: Callable[[set[str]], _MergedStream],
    owners: Mapping[str, int],
    collectives: Collectives,
) -> None:
    """One rank's share: merge and write its own tensors (on disk on return), hash the output files
    it starts (:class:`OutputHashes`: rank 0 publishes without reading them again), share its digests."""
    mine = {k for k, r in owners.items() if r == collectives.rank}
    stream = start(mine)
    writer = PartWriter(tmp, job.layout, mine, output)
    try:
        stream.run(writer.write)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    hashes = OutputHashes(tmp, job.layout, owners, collectives.rank)
    hashes.hash_heads()  # while the other ranks may still merge
    hashes.finish(collectives)
    if job.digests is not None:
        _share_digests(job.digests, collectives)


def _hashed_by(sources: Sequence[TensorSource], rank: int, world_size: int, output_bytes: int = 0) -> Callable[[Path], bool]:
    """Which source files this rank hashes for the card: runs balanced by size, like the tensors.

    ``output_bytes``: what rank 0 hashes of the output besides (a one-file output, whole), so
    it takes that much less of the sources.
    """
    files = {str(f): f.stat().st_size for source in sources for f in source_files(source)}
    owners = assign_keys(files, world_size, head_start=output_bytes)
    return lambda f: owners.get(str(f)) == rank


def _share_digests(digests: SourceDigests, collectives: Collectives) -> None:
    """Every rank's sha256 digests to every rank (one all_gather of 32 bytes per file)."""
    files = digests.files
    here = digests.hashed_here()
    rows = torch.zeros(len(files), 33, dtype=torch.uint8)  # a flag, then the digest
    for i, f in enumerate(files):
        if f in here:
            rows[i, 0] = 1
            rows[i, 1:] = torch.frombuffer(bytearray.fromhex(here[f]), dtype=torch.uint8)
    gathered = collectives.all_gather(rows)
    digests.add({f: bytes(row[1:].tolist()).hex() for rank_rows in gathered for f, row in zip(files, rank_rows) if row[0]})


def _recipe(
    args: dict[str, Any],
    report: MergeReport,
    plan: MergePlan,
    base: TensorSource,
    models: Sequence[TensorSource],
    digests: SourceDigests | None,
) -> dict[str, Any]:
    """What ``merge_config.yaml`` holds (:func:`~lightning_ties.io.card.merge_config` writes it)."""

    def describe(source: TensorSource) -> dict[str, Any]:
        return digests.describe(source) if digests else {"source": source.label, "files": {}}

    def as_given(value: Any, source: TensorSource) -> Any:  # a path as given; an in-memory model by its label
        return os.fspath(value) if isinstance(value, (str, os.PathLike)) else source.label

    return {
        "library_version": library_version(),
        "method": args["method"],
        "lam": args["lam"],
        "params": {k: _yaml_value(v) for k, v in report.params.items()},
        "paths": {
            "base": as_given(args["base"], base),
            "models": [as_given(m, src) for m, src in zip(args["models"], models)],
        },
        "options": {k: _pattern_list(args[k], k) if k in ("include", "exclude") else _yaml_value(args[k])
                    for k in _CONFIG_OPTIONS},
        "sources": {"base": describe(base), "models": [describe(m) for m in models]},
        "counts": {"merged": len(plan.merge_keys), "from_base": len(plan.keys) - len(plan.merge_keys)},
    }


#: merge_to's arguments that ``lightning-ties merge`` takes under the same name (its MergeConfig).
_CONFIG_OPTIONS = (
    "include", "exclude", "common_rows", "on_mismatch", "max_shard_size", "prefix", "trust_pickle", "compute_dtype"
)


class _PassProgress:
    """Advance a bar through a pass that reads ``keys`` in order (``RecentTensorCache.on_read``).

    The pre-pass may read every key more than once (a sample, then the selection); the bar
    shows how far into the key order the reading has gone (the bytes of the keys up to the
    one read), never moving back.
    """

    def __init__(self, bar: Any, keys: Sequence[str], sizes: Mapping[str, int]) -> None:
        self.bar = bar
        self.position = dict(zip(keys, itertools.accumulate(sizes[k] for k in keys)))

    def __call__(self, key: str) -> None:
        reached = self.position.get(key, 0)
        if reached > self.bar.n:
            self.bar.update(reached - self.bar.n)


class _MergedStream:
    """Feeds a sink every output tensor: base's unmerged entries first, then base + lam * tau_m.

    ``mine``: the keys this rank writes (None: all of them); the merger may yield others.
    """

    def __init__(
        self,
        base: TensorSource,
        merger: TaskVectorMerger,
        plan: MergePlan,
        lam: float,
        progress: bool | None,
        mine: Container[str] | None = None,
    ) -> None:
        self.base, self.merger, self.plan, self.lam = base, merger, plan, lam
        self.progress = progress
        self.mine = mine

    def run(self, put: Callable[[str, torch.Tensor], None]) -> None:
        writer = WriteBehind(put)
        try:
            self._run(writer)
            writer.wait()
        finally:
            writer.close()

    def _run(self, put: Callable[[str, torch.Tensor], None]) -> None:
        merged = set(self.plan.merge_keys)
        # tied weights (one tensor under two names) get the merged value under both names
        tied: dict[str, list[str]] = {}
        for alias, first in self.plan.aliases.items():
            if first in merged:
                tied.setdefault(first, []).append(alias)
        written_later = {alias for aliases in tied.values() for alias in aliases}
        for key in self.plan.keys:
            if key not in merged and key not in written_later and self._writes(key):
                put(key, self.base.get(key))
        disable = None if self.progress is None else not self.progress
        keys = [k for k in self.plan.merge_keys if self._writes(k)]
        spec = self.merger.spec
        # the global scope reads every tensor once before the first merged one (the trim's thresholds,
        # the norms of normfrac/normmass): counted too, the bar moves all along and its estimate holds
        prepass = spec.scope == "global" and (spec.trims or spec.sign in ("normfrac", "normmass"))
        # the bar counts bytes of merged output, not tensors: its rate and ETA hold when sizes vary
        self.sizes = {k: nbytes(self.base.spec(k)) for k in keys}
        merged_bytes = sum(self.sizes.values())
        total = merged_bytes * (2 if prepass else 1)
        desc = "thresholds" if prepass else "merging"
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable) as bar:
            if prepass and isinstance(self.base, RecentTensorCache):
                self.base.on_read = _PassProgress(bar, keys, self.sizes)
            try:
                self._merge(put, tied, bar, merged_bytes if prepass else 0)
            finally:
                if isinstance(self.base, RecentTensorCache):
                    self.base.on_read = None

    def _plus_base(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        """base + tau in tau's buffer, on the CPU (writers take CPU tensors) in base's dtype.

        Holds base's tensor no longer than this call: its reader may then reuse its buffer for
        the next key.
        """
        b = self.base.get(key)
        return tau.add_(b.to(tau.device)).to("cpu", b.dtype)

    def _writes(self, key: str) -> bool:
        return self.mine is None or key in self.mine

    def _merge(self, put: Callable[[str, torch.Tensor], None], tied: dict[str, list[str]], bar: Any, first: int) -> None:
        for i, (key, tau) in enumerate(self.merger):
            if i == 0 and first:
                if isinstance(self.base, RecentTensorCache):
                    self.base.on_read = None
                bar.set_description("merging", refresh=False)
                bar.update(first - bar.n)  # the pre-pass is over, whatever the bar had seen of it
            if not self._writes(key):
                continue
            # Same arithmetic as apply_task_vector (b + lam * tau), in place in tau's buffer;
            # multiplying by 1.0 changes no bit, so that pass over the model is skipped.
            if self.lam != 1.0:
                tau.mul_(self.lam)
            value = self._plus_base(key, tau)
            put(key, value)
            for alias in tied.get(key, ()):
                put(alias, value)
            bar.update(self.sizes[key])
