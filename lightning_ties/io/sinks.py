"""Sinks: a merged model written as safetensors, a Hugging Face folder, a Lightning checkpoint,
or loaded into a module. Every file output is atomic (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from torch import nn

from ..merging.sources import TensorSource, TensorSpec, as_source
from .atomic import MARKER, OWNER_KEY, atomic_dir, atomic_open, check_output, library_version, owner_metadata
# DEFAULT_MAX_SHARD_SIZE, parse_size and plan_shards are also imported from here by older callers.
from .hf_folder import DEFAULT_MAX_SHARD_SIZE, parse_size, plan_shards, write_index  # noqa: F401
from .safetensors_file import SafetensorsWriter, check_finite_tensor, nbytes

#: Files copied from the base model's folder next to the merged weights.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
class ShardedWriter:
    """Write a Hugging Face weights layout (``model.safetensors`` or shards + index) in any tensor order.

    Every shard's header is written up front from the specs, so tensors go straight to disk
    as they arrive and the merged model is never held in memory.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> specs = {"a": TensorSpec((2,), torch.float32), "b": TensorSpec((2,), torch.float32)}
        >>> with ShardedWriter(folder, specs, max_shard_size=8) as w:
        ...     w.write("b", torch.ones(2)); w.write("a", torch.zeros(2))
        >>> sorted(p.name for p in folder.iterdir())
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """

    def __init__(
        self,
        folder: Path,
        specs: Mapping[str, TensorSpec],
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        check_finite: bool = False,
    ) -> None:
        self.folder = Path(folder)
        shards = plan_shards(specs, max_shard_size)
        self._writers: list[SafetensorsWriter] = []
        self._where: dict[str, SafetensorsWriter] = {}
        self.weight_map: dict[str, str] = {}
        try:
            for name, shard in shards.items():
                writer = SafetensorsWriter(self.folder / name, shard, check_finite=check_finite)
                self._writers.append(writer)
                for key in shard:
                    self._where[key] = writer
                    self.weight_map[key] = name
        except BaseException:
            self.abort()
            raise
        self.total_size = sum(nbytes(s) for s in specs.values())

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._where[key].write(key, tensor)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if len(self._writers) > 1:
            write_index(self.folder, self.weight_map, self.total_size)

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def copy_model_files(source_folder: str | os.PathLike[str] | None, folder: Path) -> list[str]:
    """Copy config and tokenizer/processor files of the base folder (those that exist)."""
    if source_folder is None:
        return []
    copied = []
    for name in MODEL_FILES:
        src = Path(source_folder) / name
        if src.is_file():
            shutil.copy2(src, folder / name)
            copied.append(name)
    return copied


def _specs(source: TensorSource) -> dict[str, TensorSpec]:
    return {k: source.spec(k) for k in source.keys()}


def save_safetensors(
    state_dict: Any,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
    check_finite: bool = True,
) -> Path:
    """Write a state dict (or module, or any source) to one ``.safetensors`` file, atomically.

    ``overwrite`` replaces only a file lightning-ties wrote and nobody changed since (its folder's
    manifest lists it with the same size and sha256): never an input, never another tool's file.
    ``check_finite`` refuses a float tensor holding inf or NaN (an fp16 overflow of a merge),
    naming the key.

    Example:
        >>> import tempfile
        >>> path = save_safetensors({"w": torch.ones(2)}, tempfile.mkdtemp() + "/m.safetensors")
        >>> path.name
        'm.safetensors'
    """
    path = check_output(path, overwrite, inputs=[state_dict], kind="file")
    source = as_source(state_dict, "state_dict")
    check_output(path, overwrite, inputs=getattr(source, "files", []), kind="file")  # shards an index named
    with atomic_open(path, overwrite) as f, SafetensorsWriter(
        f, _specs(source), {**owner_metadata(), **(metadata or {})}, check_finite=check_finite
    ) as writer:
        for key in source.keys():
            writer.write(key, source.get(key))
    return path


def save_hf_folder(
    state_dict: Any,
    folder: str | os.PathLike[str],
    config_from: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    *,
    card: ModelCard | None = None,
    extra_files: Mapping[str, str] | None = None,
    check_finite: bool = True,
) -> Path:
    """Write a Hugging Face model folder: sharded safetensors (+ index) and the base's config files.

    ``config_from`` is the folder whose ``config.json`` and tokenizer/processor files are
    copied, so ``AutoModel.from_pretrained(folder)`` works. ``card`` is written as
    ``README.md`` (build it with :func:`~lightning_ties.io.build_model_card`), and
    ``extra_files`` (file name -> text) next to it; all of it appears at once, atomically.
    The folder gets a ``.lightning-ties.json`` manifest (each file's size and sha256):
    ``overwrite`` replaces only such folders whose files are all listed and unchanged.
    ``check_finite`` as in :func:`save_safetensors`.

    Example:
        >>> import tempfile
        >>> out = save_hf_folder({"w": torch.ones(2)}, tempfile.mkdtemp() + "/merged")
        >>> sorted(p.name for p in out.iterdir())
        ['.lightning-ties.json', 'model.safetensors']
    """
    folder = check_output(folder, overwrite, inputs=[state_dict, config_from], kind="folder")
    source = as_source(state_dict, "state_dict")
    check_output(folder, overwrite, inputs=getattr(source, "files", []), kind="folder")
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        with ShardedWriter(tmp, _specs(source), max_shard_size, check_finite) as writer:
            for key in source.keys():
                writer.write(key, source.get(key))
        copy_model_files(config_from, tmp)
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in (".", "..", MARKER):
                raise ValueError(f"extra_files: {name!r} must be a plain file name inside the folder")
            (tmp / name).write_text(text)
        if card is not None:
            card.save(tmp / "README.md")
    return folder


def lightning_version() -> str:
    """The installed Lightning version, read from package metadata (io does not import Lightning)."""
    return importlib.metadata.version("pytorch-lightning")


def save_lightning_checkpoint(
    state_dict: Any,
    path: str | os.PathLike[str],
    hyper_parameters: Mapping[str, Any] | None = None,
    prefix: str = "",
    overwrite: bool = True,
    check_finite: bool = True,
) -> Path:
    """Write a ``.ckpt`` that ``YourModule.load_from_checkpoint(path)`` loads, atomically.

    ``prefix`` is the module attribute holding the weights (``"model."`` for a LightningModule
    that stores its network in ``self.model``); ``hyper_parameters`` are the module's
    ``__init__`` arguments. The file holds only tensors and plain types, so it loads with
    ``weights_only=True``. ``overwrite`` and ``check_finite`` as in :func:`save_safetensors`.

    Example:
        >>> import tempfile
        >>> path = save_lightning_checkpoint({"w": torch.ones(1)}, tempfile.mkdtemp() + "/m.ckpt", prefix="net.")
        >>> list(torch.load(path, weights_only=True)["state_dict"])
        ['net.w']
    """
    path = check_output(path, overwrite, inputs=[state_dict], kind="file")
    source = as_source(state_dict, "state_dict")
    check_output(path, overwrite, inputs=getattr(source, "files", []), kind="file")
    state = {k: source.get(k).contiguous() for k in source.keys()}
    if check_finite:
        for key, tensor in state.items():
            check_finite_tensor(path, key, tensor)
    checkpoint = {
        "state_dict": {prefix + k: t for k, t in state.items()},
        "pytorch-lightning_version": lightning_version(),
        "hyper_parameters": dict(hyper_parameters or {}),
        "epoch": 0,
        "global_step": 0,
        OWNER_KEY: library_version(),
    }
    with atomic_open(path, overwrite) as f:
        _torch_save(checkpoint, f)
    return path


def _torch_save(obj: Any, f: Any) -> None:
    """``torch.save`` into a file object we close ourselves, reporting the OS error of a failed write.

    Given a path, torch's zip writer keeps the (deleted) temporary open when a write fails,
    holding its disk space; and either way it reports a full disk only as ``RuntimeError:
    [enforce fail at inline_container.cc] unexpected pos``. Writing through this shim keeps
    the first ``OSError`` (ENOSPC, EFBIG...) and raises it instead.
    """
    failures: list[OSError] = []

    class _Recording:
        def write(self, data: bytes) -> int:
            try:
                return f.write(data)
            except OSError as err:
                failures.append(err)
                raise

        def flush(self) -> None:
            f.flush()

    try:
        torch.save(obj, _Recording())
        f.flush()
    except RuntimeError as err:
        if failures:
            raise failures[0] from err
        raise


@dataclass
class LoadReport:
    """What ``load_into`` did: keys loaded, and those missing from / unexpected by the module."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(module: nn.Module, weights: Any, strict: bool = True, **open_kwargs: Any) -> LoadReport:
    """Load merged weights (a path, state dict or source) into ``module`` and report the key match.

    With ``strict=True`` a mismatch raises one error listing the missing and unexpected keys
    before anything is copied; with ``strict=False`` the matching keys are loaded.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> load_into(net, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}).missing
        []
    """
    source = as_source(weights, "weights", **open_kwargs)
    own = module.state_dict()
    keys = list(source.keys())
    report = LoadReport(
        loaded=[k for k in keys if k in own],
        missing=[k for k in own if k not in set(keys)],
        unexpected=[k for k in keys if k not in own],
    )
    bad_shapes = [f"{k}: module {tuple(own[k].shape)} vs {tuple(source.spec(k).shape)}" for k in report.loaded if tuple(own[k].shape) != source.spec(k).shape]
    if bad_shapes or (strict and (report.missing or report.unexpected)):
        raise ValueError(
            f"cannot load {source.label} into {type(module).__name__}:"
            + (f"\n  missing from the weights: {report.missing}" if report.missing else "")
            + (f"\n  not in the module: {report.unexpected}" if report.unexpected else "")
            + (f"\n  shapes differ: {bad_shapes}" if bad_shapes else "")
            + ("\npass strict=False to load the keys that match" if not bad_shapes else "")
        )
    module.load_state_dict({k: source.get(k) for k in report.loaded}, strict=False)
    return report
