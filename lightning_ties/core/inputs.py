"""The fit-end merge's inputs, checked before any training step (no Lightning here).

- :func:`check_arguments`: the callback's own options (apply, heads, save_dir, base_device...);
- :func:`check_metric_tasks`: a ``{task: metric}`` dict names only tasks of the merge;
- :func:`source_fingerprints`: what a resumed search must find unchanged (the base and every task).

Example:
    >>> check_metric_tasks({"a": None}, {"a", "b"})
    >>> check_metric_tasks({"c": None}, {"a", "b"})
    Traceback (most recent call last):
    ...
    ValueError: metrics names ['c'], which are not tasks of this merge; the tasks are ['a', 'b']
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..io.errors import UnsafeOutputError
from ..io.ownership import check_folder_outputs, check_not_an_input
from ..io.provenance import fingerprint_sources
from ..merging.plan import compile_patterns
from .base_state import BASE_FILE, check_base_device
from .keys import split_spec
from .options import check_choice, check_method_params
from .resume import PROGRESS_FILE

#: The checkpoint written after an ``apply="merged"`` merge: the merged weights in ``state_dict``.
MERGED_CHECKPOINT = "merged.ckpt"

def check_arguments(
    heads: Any, apply: str, save_dir: str | None, every_n_val_epochs: int | None, base_device: str,
    methods: Sequence[str] = (), method_params: Mapping[str, Any] | None = None,
) -> None:
    """The callback's other arguments, checked when it is built (a typo fails before any training step)."""
    check_choice("apply", apply, ("merged", "keep"))
    check_method_params(methods, method_params or {})  # each of ``methods`` gets the names it has
    if heads is not None and not isinstance(heads, torch.nn.Module):  # a malformed regex fails now
        compile_patterns([h for h in ([heads] if isinstance(heads, str) else heads) if isinstance(h, str)], "heads")
    if apply == "keep" and save_dir is None:
        raise ValueError("apply='keep' writes the merged model to save_dir; pass save_dir")
    if every_n_val_epochs is not None and every_n_val_epochs < 1:
        raise ValueError(f"every_n_val_epochs must be a positive integer, got {every_n_val_epochs}")
    check_base_device(base_device)


def _fingerprintable(source: Any) -> bool:
    """Paths, modules and state dicts have fingerprints; other sources (a custom ``TensorSource``) are not checked."""
    return isinstance(source, (str, os.PathLike, torch.nn.Module, Mapping))


def check_metric_tasks(metrics: Any, names: set[str]) -> None:
    """A ``{task: metric}`` dict may name only tasks of the merge (a typo fails before training)."""
    if isinstance(metrics, Mapping):
        unknown = sorted(set(metrics) - names)
        if unknown:
            raise ValueError(f"metrics names {unknown}, which are not tasks of this merge; the tasks are {sorted(names)}")


def save_dir_files(apply: str) -> list[str]:
    """The files a fit-end merge may write into ``save_dir`` (checked at ``setup``: a user's file there refuses the fit).

    Example:
        >>> save_dir_files("keep")[-1]
        'merged.safetensors'
    """
    return ["search.json", "search.csv", PROGRESS_FILE, MERGED_CHECKPOINT, BASE_FILE] + (
        ["merged.safetensors"] if apply == "keep" else []
    )


def default_save_dir(root: str | os.PathLike[str], task: str, state_key: str) -> Path | None:
    """Where a callback without ``save_dir`` keeps its base, progress and results: one folder per instance.

    ``<root>/ties_merging/<task>-<12 hex digits of the callback's state_key>`` (the same for the
    same configuration, so a resumed fit finds it); ``None`` for a remote ``root`` (``s3://...``),
    where the base stays in the checkpoint and ``last.ckpt`` carries the progress as before.

    Example:
        >>> default_save_dir("runs", "my task", "TiesMerging{...}").as_posix()
        'runs/ties_merging/my_task-c71b44845fd5'
        >>> default_save_dir("s3://bucket/runs", "a", "k") is None
        True
    """
    if "://" in str(root):
        return None
    digest = hashlib.sha256(state_key.encode()).hexdigest()[:12]
    return Path(root) / "ties_merging" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}-{digest}"


def prepare_output_dir(
    folder: str | os.PathLike[str] | None, apply: str, is_global_zero: bool, base: Any = None,
    tasks: Iterable[Any] = (),
) -> None:
    """Refuse a user's file where the merge will write, or a file it will write that is one of its inputs (``base``,
    ``tasks``: e.g. an earlier run's ``merged.safetensors`` merged again), before training; create the folder.

    Example:
        >>> import tempfile
        >>> prepare_output_dir(Path(tempfile.mkdtemp()) / "out", "merged", True)
    """
    if folder is None:
        return
    names = save_dir_files(apply)
    check_folder_outputs(folder, names)
    inputs = [split_spec(source)[0] for source in (base, *tasks)]
    for name in names:
        if name != BASE_FILE or base is None:  # a base given is read, not written: only a captured one is saved
            try:
                check_not_an_input(Path(folder) / name, inputs)
            except UnsafeOutputError as err:
                raise UnsafeOutputError(f"save_dir={str(folder)!r}: the merge writes {name} there, but {err} "
                                        "(another save_dir), or pass a copy of that input kept elsewhere") from None
    if is_global_zero:
        Path(folder).mkdir(parents=True, exist_ok=True)


def check_datamodules(datamodules: Mapping[str, Any] | None, val_dataloaders: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> datamodule, each with a ``val_dataloader()``; a task given data twice is refused.

    Example:
        >>> check_datamodules(None, {})
        {}
    """
    # a ``{class_path, init_args}`` dict is built here: typed as LightningDataModule, LightningCLI would build it
    # with its own instantiator, which fails for a datamodule nested in a callback (it looks for a top-level ``data``)
    datamodules = {name: _built(dm) for name, dm in (datamodules or {}).items()}
    for name, dm in datamodules.items():
        if name in val_dataloaders:
            raise ValueError(f"task {name!r} has both val_dataloaders and val_datamodules; give one")
        if not callable(getattr(dm, "val_dataloader", None)):
            raise TypeError(f"val_datamodules[{name!r}] must be a LightningDataModule with val_dataloader(), "
                            f"got {type(dm).__name__}")
    return datamodules


def _built(spec: Any) -> Any:
    """A datamodule given as ``{"class_path": "pkg.Class", "init_args": {...}}`` (YAML), built; anything else as is."""
    if hasattr(spec, "as_dict"):  # a jsonargparse Namespace
        spec = spec.as_dict()
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        return spec
    module, _, name = str(spec["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module), name)(**dict(spec.get("init_args") or {}))


def datamodule_loaders(
    datamodules: Mapping[str, Any], local_rank: int = 0, global_rank: int = 0, barrier: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Each datamodule's validation dataloaders, prepared as a Trainer prepares a datamodule.

    ``prepare_data`` (downloads, writes to disk) runs once per node (local rank 0) or, for a
    datamodule with ``prepare_data_per_node=False``, once in all (global rank 0); ``barrier``
    then holds every rank until it is done; ``setup("validate")`` and ``val_dataloader()`` run
    on every rank.

    Example:
        >>> datamodule_loaders({})
        {}
    """
    for dm in datamodules.values():
        if (local_rank if getattr(dm, "prepare_data_per_node", True) else global_rank) == 0:
            dm.prepare_data()
    if barrier is not None and datamodules:
        barrier("lightning_ties.val_datamodules.prepare_data")
    loaders = {}
    for name, dm in datamodules.items():
        dm.setup("validate")
        loaders[name] = dm.val_dataloader()
    return loaders


def source_fingerprints(base: Any, tasks: Mapping[str, Any]) -> dict[str, Any]:
    """Fingerprints of the given base and tasks (``"base"``, ``"task:<name>"``): files by content, tensors by value.

    Example:
        >>> sorted(source_fingerprints(None, {"a": {"w": torch.zeros(1)}}))
        ['task:a']
    """
    sources = {f"task:{name}": split_spec(src)[0] for name, src in tasks.items()}
    if base is not None:
        sources["base"] = split_spec(base)[0]
    return fingerprint_sources({n: s for n, s in sources.items() if _fingerprintable(s)})


__all__ = ["MERGED_CHECKPOINT", "check_arguments", "check_datamodules", "datamodule_loaders", "default_save_dir", "prepare_output_dir", "save_dir_files", "check_metric_tasks", "source_fingerprints"]
