"""What the merging callback asks of the Trainer beyond its hooks: checkpoints written atomically, the fit's data.

- :func:`save_checkpoint_atomically`: ``trainer.save_checkpoint`` beside the target, renamed over it;
- :func:`resave_last_checkpoints`: ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` rewritten
  with the search's progress (without ``save_dir`` the checkpoint is its only record);
- :func:`on_rank_zero`: a step on global rank 0 whose value, or failure, every rank gets;
- :func:`save_progress`: a search's progress after each candidate, in ``save_dir`` or ``last.ckpt``;
- :func:`keep_finetuned_in_checkpoint`: a checkpoint taken mid-merge holds the fine-tuned weights;
- :func:`fit_has_val_data`: whether ``fit`` was given validation data, before its loop loads it;
- :func:`reconnect`: the fit's module back in the Trainer after a merge validated another module.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..core.resume import PROGRESS_FILE, write_progress
from ..io.atomic import atomic_file
from ..io.errors import CheckpointError
from ..io.tempfiles import create_temp_dir
from ..core.search import SearchResult
from ._compat import TrainerFn, pl

T = TypeVar("T")


def save_checkpoint_atomically(trainer: pl.Trainer, path: Path, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` into :func:`~lightning_ties.io.atomic.atomic_file`'s private temporary.

    Rank zero opens the temporary (unpredictable, in a ``0o700`` folder: a planted symlink cannot
    redirect it) and broadcasts its name; every rank calls ``save_checkpoint`` (a collective
    under DDP), rank zero writes; on success the file is renamed over ``path`` and recorded in
    the folder's manifest, so a later run may replace it. A kill leaves no half checkpoint.
    """
    if not trainer.is_global_zero:
        trainer.save_checkpoint(trainer.strategy.broadcast(None), weights_only=weights_only)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        trainer.save_checkpoint(trainer.strategy.broadcast(str(tmp)), weights_only=weights_only)


def resave_last_checkpoints(trainer: pl.Trainer) -> None:
    """Rewrite every ``ModelCheckpoint(save_last=True)``'s last checkpoint with the current state, atomically.

    A kill during the write leaves the previous ``last.ckpt`` whole (the new one is written beside it and
    renamed over it). Symlinked last checkpoints (``save_last="link"``) point at other checkpoints and are
    left alone.
    """
    for callback in trainer.checkpoint_callbacks:
        path = getattr(callback, "last_model_path", "") or ""
        if getattr(callback, "save_last", None) is not True or not path or os.path.islink(path):
            continue
        if "://" in str(path):  # remote storage: no rename; write in place as ModelCheckpoint itself does
            trainer.save_checkpoint(path)
            continue
        save_in_private_temporary(trainer, Path(path))


def save_in_private_temporary(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` into a new private (0o700, unpredictable) folder beside ``path``, then renamed over it.

    For a file that is not ours to manifest (``ModelCheckpoint``'s ``last.ckpt``): a predictable
    temporary name could be planted as a link that redirects the write. Every rank calls it (a
    collective under DDP); rank zero creates the folder, writes and renames.
    """
    private = trainer.strategy.broadcast(str(create_temp_dir(path)) if trainer.is_global_zero else None)
    try:
        trainer.save_checkpoint(Path(private) / path.name)
        if trainer.is_global_zero:
            os.replace(Path(private) / path.name, path)
    finally:
        if trainer.is_global_zero:
            shutil.rmtree(private, ignore_errors=True)


def on_rank_zero(trainer: pl.Trainer, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on global rank 0 only; every rank returns its value, or raises when it failed (one broadcast),
    so no rank waits in a collective for a rank that raised. ``what``: the other ranks' error begins with it."""
    value: Any = None
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - raised below, once the other ranks know
            error = err
    value, failed = trainer.strategy.broadcast((value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if failed is not None:
        raise CheckpointError(f"{what}: global rank 0 failed: {failed}")
    return value


def save_progress(trainer: pl.Trainer, progress: SearchResult, save_dir: str | None, in_fit_loop: bool) -> None:
    """Record a search's finished candidates: in ``save_dir`` when there is one, else in the Trainer's ``last.ckpt``.

    Without ``save_dir`` the checkpoint is the only record: ``ModelCheckpoint`` wrote ``last.ckpt``
    before the fit-end search started, so a crash now would resume with no candidate finished
    unless it is rewritten. A merge asked for mid-fit leaves ``last.ckpt`` to ``ModelCheckpoint``.
    """
    if save_dir is not None:  # a failed write stops every rank (no rank left waiting in the next collective)
        on_rank_zero(trainer, lambda: write_progress(save_dir, progress), str(Path(save_dir) / PROGRESS_FILE))
    elif not in_fit_loop:
        resave_last_checkpoints(trainer)


def keep_finetuned_in_checkpoint(
    checkpoint: dict[str, Any], finetuned: Mapping[str, torch.Tensor], module: pl.LightningModule, saved_from: Any
) -> None:
    """Make ``checkpoint`` hold ``module``'s fine-tuned weights and hyper-parameters, not the merge being scored.

    ``saved_from`` is the module the Trainer saved: the search's own module when the checkpoint
    was written from inside its validation loop, whose hyper-parameters are not the fit's.
    """
    checkpoint["state_dict"] = dict(finetuned)
    if saved_from is module:
        return
    for key in (module.CHECKPOINT_HYPER_PARAMS_NAME, module.CHECKPOINT_HYPER_PARAMS_KEY,
                module.CHECKPOINT_HYPER_PARAMS_TYPE):
        checkpoint.pop(key, None)
    if module.hparams:
        if getattr(module, "_hparams_name", None):
            checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
        checkpoint[module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(module.hparams)


def fit_has_val_data(trainer: pl.Trainer) -> bool:
    """Whether the running fit has validation data, known at ``setup`` (before its loop loads the dataloaders).

    Lightning has no public way to ask this before the first validation run, so this reads the
    fit loop's data source, falling back to the loaded dataloaders if that private attribute moves.
    """
    source = getattr(getattr(trainer.fit_loop.epoch_loop, "val_loop", None), "_data_source", None)
    try:
        return bool(source is not None and source.is_defined())
    except AttributeError:  # private Lightning API moved: fall back to the fit-end check
        return trainer.val_dataloaders is not None


def reconnect(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Give the fit back its module after a merge ran ``trainer.validate`` on its evaluation module."""
    if trainer.lightning_module is not pl_module:
        trainer.strategy.connect(pl_module)
        trainer.state.fn = TrainerFn.FITTING


__all__ = ["fit_has_val_data", "keep_finetuned_in_checkpoint", "on_rank_zero", "reconnect", "resave_last_checkpoints",
           "save_checkpoint_atomically", "save_progress"]
