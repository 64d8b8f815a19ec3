"""Which strategies shard the module, found with ``isinstance`` (subclasses included), and where the shards are.

- ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in ``configure_model``, tensor_parallel_size=1):
  the LightningModule's own state dict holds DTensors;
- ``FSDPStrategy`` (FSDP1): the strategy's wrapper (``strategy.model``) gives the sharded state dict;
- ``DeepSpeedStrategy``: refused (see :data:`DEEPSPEED_REFUSAL`).

The merge itself is :class:`lightning_ties.distributed.fit.ShardedFitMerge` (no Lightning there); this
module only finds the strategy and calls it from :class:`~lightning_ties.pytorch.callback.TiesMerging`'s hooks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

from torch import nn

from ..core.keys import match_to_module
from ..core.recipe import fixed_choice
from ..core.resume import write_results
from ..core.search import SearchResult
from ..distributed.fit import ShardedFitMerge, save_full_safetensors
from ..merging import MergeOptions, get_method
from ._compat import pl

#: Written under ``save_dir`` after an ``apply="merged"`` merge (as the unsharded callback's ``merged.ckpt``).
MERGED_CHECKPOINT = "merged.ckpt"

#: Why DeepSpeed is refused: its ZeRO-3 partitions are flat slices of flattened parameter groups, and its
#: optimizer keeps fp32 master copies that the next step (or a checkpoint) writes back over the module; a merge
#: must update both, and DeepSpeed does not install on this CPU-only CI, so it could not be tested.
DEEPSPEED_REFUSAL = (
    "TiesMerging does not support DeepSpeedStrategy: ZeRO partitions (and the optimizer's fp32 master weights) "
    "would both have to be merged, which is not implemented. Train with ModelParallelStrategy (FSDP2, "
    "data_parallel_size=W, tensor_parallel_size=1), FSDPStrategy or DDP, or merge the saved checkpoints "
    "offline with lightning_ties.merge_to"
)


def sharding_kind(strategy: Any) -> str | None:
    """``"fsdp2"``, ``"fsdp1"`` for the sharded strategies the merge supports, None for unsharded ones.

    Raises for DeepSpeed (any stage) with :data:`DEEPSPEED_REFUSAL`.
    """
    strategies = pl.strategies
    if isinstance(strategy, strategies.DeepSpeedStrategy):
        raise RuntimeError(DEEPSPEED_REFUSAL)
    if isinstance(strategy, strategies.ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, strategies.FSDPStrategy):
        return "fsdp1"
    return None


def sharded_module(trainer: pl.Trainer) -> nn.Module | None:
    """The module whose state dict holds the shards (after the strategy's setup), None when unsharded."""
    kind = sharding_kind(trainer.strategy)
    if kind == "fsdp1":
        return trainer.strategy.model
    if kind == "fsdp2":
        return trainer.lightning_module
    return None


def sharded_merging(
    callback: Any, trainer: pl.Trainer, has_val_data: Callable[[pl.Trainer], bool]
) -> ShardedMerging | None:
    """The sharded merge of ``callback`` under ``trainer``'s strategy, checked; None when the module is whole.

    Raises for DeepSpeed and for what the sharded merge refuses (see :meth:`ShardedMerging.check`).
    """
    if sharding_kind(trainer.strategy) is None:
        return None
    merging = ShardedMerging(callback)
    merging.check(trainer, has_val_data(trainer))
    return merging


class ShardedMerging:
    """:class:`~lightning_ties.pytorch.callback.TiesMerging`'s setup / fit-start / fit-end work on a sharded module.

    Each rank keeps its own rows of the base (CPU) and of tau_m; the merge is the single-process merge,
    bit for bit (:mod:`lightning_ties.distributed`). Supported: a fixed (k, lam), or the paper's recipe
    when a search has no validation data; ``apply="merged"`` and ``apply="keep"`` (``merged.safetensors``
    gathered one tensor at a time by rank 0). Refused with a message: methods that need data (RegMean),
    a scored k/lam search, ``every_n_val_epochs``, resuming without ``base=`` as a file.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.fit: Any = None

    def check(self, trainer: pl.Trainer, has_val_data: bool) -> None:
        """Refuse at setup what the sharded merge does not do (before any training step)."""
        cb = self.callback
        name = type(trainer.strategy).__name__
        needs_data = [m for m in cb.methods if get_method(m).needs_data]
        if needs_data:
            raise ValueError(
                f"method(s) {needs_data} need each task's data on whole weights, which no rank holds under {name}; "
                "choose a data-free method (ties, task_arithmetic, dare_ties, tsv...)"
            )
        if cb.every_n_val_epochs is not None:
            raise ValueError(f"every_n_val_epochs is not supported under {name} (sharded); leave it None")
        if cb.searching and (cb.val_dataloaders or has_val_data):
            raise ValueError(
                f"a scored k/lam/method search is not supported under {name} (sharded) yet: give one method, one k and "
                "one lam (or no validation data, for the paper's recipe k=0.2, lam=1.0)"
            )

    def capture_base(self, trainer: pl.Trainer) -> None:
        """At fit start: this rank's rows of the base (the module's shards, or ``base=``'s rows)."""
        cb = self.callback
        if cb.base is None and trainer.ckpt_path is not None:
            raise ValueError(
                f"resuming a fit under {type(trainer.strategy).__name__} needs TiesMerging(base=<the pretrained "
                "weights' file>): each rank captured only its shards of the base, and the checkpoint does not hold them"
            )
        self.fit = ShardedFitMerge(sharded_module(trainer))
        base = match_to_module(cb.base, self.fit.keys, label="base") if cb.base is not None else None
        self.fit.capture_base(base)
        if cb._base_ref is None:
            cb._base_ref = cb._record_base(trainer)  # a base file is referenced; a captured one is not written

    def merge(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """At fit end (collective): merge on every rank's shards, apply per ``apply``; the result to record."""
        cb = self.callback
        # a search without validation data (the only one allowed here, see check): the paper's recipe
        k, lam, reason = fixed_choice(cb.options, some_data=False)
        reason = f"{reason} (sharded over {type(trainer.strategy).__name__})"
        options = MergeOptions(cb.method, k=k, lam=lam, params=dict(cb.method_params), include=cb.include,
                               exclude=cb.exclude)
        keys = self.fit.keys
        tasks = {name: match_to_module(value, keys, label=name) for name, value in cb.tasks.items()}
        merged = self.fit.merge(tasks, cb.task, options, apply=cb.apply == "merged")
        result = SearchResult(method=cb.method, reason=reason, chosen=(k, lam))
        self._finish(trainer, merged, result)
        return result

    def _finish(self, trainer: pl.Trainer, merged: Any, result: SearchResult) -> None:
        cb = self.callback
        lam = result.lam
        if cb.save_dir is not None and trainer.is_global_zero:
            write_results(cb.save_dir, result)
        if cb.apply == "keep":  # the module keeps its fine-tuned shards; the merge is written, not applied
            save_full_safetensors(merged.view, Path(cb.save_dir) / "merged.safetensors", trainer.is_global_zero,
                                  lambda key: merged.piece(key, lam))
            return
        cb._merged_at_step = trainer.global_step
        if cb.save_dir is not None:
            save_merged_checkpoint(trainer, Path(cb.save_dir) / MERGED_CHECKPOINT)


def save_merged_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` beside ``path`` (a DCP folder under sharded strategies), then renamed over it.

    Every rank writes its shards; the rename waits for all of them. A previous checkpoint at ``path`` (a
    folder, which ``os.replace`` cannot overwrite) is moved aside first and deleted after.
    """
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(tmp)
    trainer.strategy.barrier("ties_merged_checkpoint_written")
    if trainer.is_global_zero:
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()

