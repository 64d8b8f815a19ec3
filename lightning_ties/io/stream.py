"""The streaming merge from files: headers checked, tau_m pulled key by key, written as it comes.

``merge_to`` opens every source lazily, checks all headers at once, then pulls ``(key, tau_m)``
from the engine's :class:`~lightning_ties.merging.TaskVectorMerger` and writes
``base + lam * tau_m`` straight into the output's pre-laid-out safetensors shards. Peak memory
is a few tensors per model, whatever the model size; the output appears atomically at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..merging import MergePlan, MergeReport, TaskVectorMerger, get_method, plan_merge
from ..merging.plan import Patterns
from ..merging.sources import TensorSource, TensorSpec, as_source
from .atomic import atomic_dir, atomic_open, check_output, library_version, owner_metadata
from .card import SourceDigests, merge_model_card, write_merge_config
from .formats import open_source
from .hf_folder import DEFAULT_MAX_SHARD_SIZE, parse_size
from .safetensors_file import SafetensorsWriter
from .sinks import ShardedWriter, copy_model_files, save_lightning_checkpoint
from .validate import CommonRowsSource, check_compatible

OutputFormat = Literal["folder", "safetensors", "ckpt"]


class RecentTensorCache:
    """Keep the last tensor read from a source, since the engine reads one key several times in a row.

    A per-tensor trim reads each key once per selection pass and once to merge; serving the
    repeats from memory turns three file reads into one. Holds one tensor per source.
    (Reading the next key ahead in a thread was tried: tensors allocated in another thread
    land in another malloc arena, and the global merge's peak RSS grew by ~0.9 GB.)
    """

    def __init__(self, source: TensorSource) -> None:
        self.source = source
        self.label = source.label
        self._key: str | None = None
        self._value: torch.Tensor | None = None
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
            self._value = self.source.get(key)
            self._key = key
        assert self._value is not None
        return self._value


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
    merge_method = get_method(method)
    spec = merge_method.build_spec(**params)
    lam = merge_method.resolve_lam(lam)
    if on_mismatch not in ("error", "base"):
        raise ValueError(f"on_mismatch must be 'error' or 'base', got {on_mismatch!r}")
    fmt = _output_format(Path(output), output_format)
    kind: Literal["file", "folder"] = "folder" if fmt == "folder" else "file"
    output = check_output(output, overwrite, inputs=[base, *models, config_from], kind=kind)
    if fmt == "folder":
        parse_size(max_shard_size)

    base_src = _open(base, "base", None, prefix, trust_pickle)
    model_srcs = [_open(m, f"model[{i}]", base_src, prefix, trust_pickle) for i, m in enumerate(models)]
    if not model_srcs:
        raise ValueError("no models to merge: pass at least one fine-tuned model")
    if common_rows:
        model_srcs = [CommonRowsSource(m, base_src) for m in model_srcs]
    if on_mismatch == "error":
        check_compatible(base_src, model_srcs, include, exclude)
    # The files the sources read (shards an index names, an adapter's folder) are inputs too.
    check_output(output, overwrite, inputs=_source_paths([base_src, *model_srcs]), kind=kind)
    plan = plan_merge(base_src, model_srcs, include, exclude)

    digests = SourceDigests([base_src, *model_srcs]) if hash_sources and fmt == "folder" else None
    base_cached = RecentTensorCache(base_src)
    merger = TaskVectorMerger(
        base_cached, [RecentTensorCache(m) for m in model_srcs], spec, compute_dtype=compute_dtype, plan=plan,
        device=device,
    )
    report = MergeReport.from_plan(
        plan, method, {**merge_method.parameters(), **params}, [m.label for m in model_srcs], lam=lam
    )
    specs = {k: base_src.spec(k) for k in plan.keys}
    stream = _MergedStream(base_cached, merger, plan, lam, progress)
    try:
        if fmt == "folder":
            args = dict(
                base=base, models=list(models), method=method, lam=lam, include=include, exclude=exclude,
                common_rows=common_rows, on_mismatch=on_mismatch, max_shard_size=max_shard_size,
                prefix=prefix, trust_pickle=trust_pickle, **params,
            )
            with atomic_dir(output, overwrite=overwrite) as tmp:
                with ShardedWriter(tmp, specs, max_shard_size, check_finite=True) as writer:
                    stream.run(writer.write)
                copy_model_files(config_from or getattr(base_src, "folder", None), tmp)
                recipe = _recipe(args, report, plan, base_src, model_srcs, digests)
                write_merge_config(tmp, recipe)
                merge_model_card(recipe, relative_to=output.parent).save(tmp / "README.md")
        elif fmt == "safetensors":
            with atomic_open(output, overwrite) as tmp, SafetensorsWriter(
                tmp, specs, {**owner_metadata(), "merge_method": method}, check_finite=True
            ) as writer:
                stream.run(writer.write)
        else:
            merged: dict[str, torch.Tensor] = {}
            stream.run(merged.__setitem__)
            save_lightning_checkpoint(
                {k: merged[k] for k in plan.keys}, output, getattr(base_src, "hyper_parameters", None),
                prefix=getattr(base_src, "prefix", ""), overwrite=overwrite,
            )
    finally:
        if digests is not None:
            digests.cancel()
    report.thresholds = [t.value for t in merger.thresholds] if merger.thresholds else None
    return report


def _recipe(
    args: dict[str, Any],
    report: MergeReport,
    plan: MergePlan,
    base: TensorSource,
    models: Sequence[TensorSource],
    digests: SourceDigests | None,
) -> dict[str, Any]:
    def describe(source: TensorSource) -> dict[str, Any]:
        return digests.describe(source) if digests else {"source": source.label, "files": {}}

    return {
        "library_version": library_version(),
        "merge": {k: _yaml_value(v) for k, v in args.items()},
        "params": {k: _yaml_value(v) for k, v in report.params.items()},
        "sources": {"base": describe(base), "models": [describe(m) for m in models]},
        "counts": {"merged": len(plan.merge_keys), "from_base": len(plan.keys) - len(plan.merge_keys)},
    }


class _PassProgress:
    """Advance a bar through a pass that reads ``keys`` in order (``RecentTensorCache.on_read``).

    The pre-pass may read every key more than once (a sample, then the selection); the bar
    shows how far into the key order the reading has gone, never moving back.
    """

    def __init__(self, bar: Any, keys: Sequence[str]) -> None:
        self.bar = bar
        self.position = {key: i + 1 for i, key in enumerate(keys)}

    def __call__(self, key: str) -> None:
        reached = self.position.get(key, 0)
        if reached > self.bar.n:
            self.bar.update(reached - self.bar.n)


class _MergedStream:
    """Feeds a sink every output tensor: base's unmerged entries first, then base + lam * tau_m."""

    def __init__(self, base: TensorSource, merger: TaskVectorMerger, plan: MergePlan, lam: float, progress: bool | None) -> None:
        self.base, self.merger, self.plan, self.lam = base, merger, plan, lam
        self.progress = progress

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
            if key not in merged and key not in written_later:
                put(key, self.base.get(key))
        disable = None if self.progress is None else not self.progress
        keys = list(self.plan.merge_keys)
        spec = self.merger.spec
        # the global scope reads every tensor once before the first merged one (the trim's thresholds,
        # the norms of normfrac/normmass): counted too, the bar moves all along and its estimate holds
        prepass = spec.scope == "global" and (spec.trims or spec.sign in ("normfrac", "normmass"))
        total = len(keys) * (2 if prepass else 1)
        desc = "thresholds" if prepass else "merging"
        with tqdm(total=total, desc=desc, unit="tensor", disable=disable) as bar:
            if prepass and isinstance(self.base, RecentTensorCache):
                self.base.on_read = _PassProgress(bar, keys)
            try:
                self._merge(put, tied, bar, len(keys) if prepass else 0)
            finally:
                if isinstance(self.base, RecentTensorCache):
                    self.base.on_read = None

    def _merge(self, put: Callable[[str, torch.Tensor], None], tied: dict[str, list[str]], bar: Any, first: int) -> None:
        for i, (key, tau) in enumerate(self.merger):
            if i == 0 and first:
                if isinstance(self.base, RecentTensorCache):
                    self.base.on_read = None
                bar.set_description("merging", refresh=False)
                bar.update(first - bar.n)  # the pre-pass is over, whatever the bar had seen of it
            b = self.base.get(key).to(tau.device)  # tau is on the merge device
            # Same arithmetic as apply_task_vector (b + lam * tau), in place in tau's buffer;
            # multiplying by 1.0 changes no bit, so that pass over the model is skipped.
            if self.lam != 1.0:
                tau.mul_(self.lam)
            value = tau.add_(b).to("cpu", b.dtype)  # writers take CPU tensors
            put(key, value)
            for alias in tied.get(key, ()):
                put(alias, value)
            bar.update()
