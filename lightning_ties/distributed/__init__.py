"""Ranks, collectives and sharded views: the merge of a model sharded over W processes.

No Lightning here (the Lightning layer calls it): :mod:`.collectives` (sums and gathers over a
process group), :mod:`.views` (how a rank sees its slice of an FSDP2/FSDP1 module and of each
task's weights), :mod:`.merge` (tau_m on each rank's shards, applied in place), :mod:`.fit` (what
the merging callbacks keep across a fit: the base's rows, the merge at fit end, gathered writes),
:mod:`.store` (the continual task store written by W ranks, each its own rows; :func:`gather_store` puts
them together for one process), :mod:`.shard` (FSDP2 ``fully_shard`` block by block, as a ``configure_model`` would).

Example (on every rank, inside a process group, after ``fully_shard(model)``)::

    from lightning_ties.distributed import merge_sharded_, sharded_view
    view = sharded_view(model)
    base = view.local_state()          # this rank's rows of the base, on the CPU
    ...                                # fine-tune
    merge_sharded_(view, base, ["task_a.safetensors", view.source(label="this run")], k=0.2, lam=1.0)
"""

from .collectives import TorchCollectives, shard_collectives
from .fit import ShardedFitMerge, full_state, save_full_safetensors
from .merge import ShardedMerge, merge_sharded_
from .shard import is_fully_sharded, shard_blocks
from .store import ShardedTaskStore, StoredRows, gather_store
from .views import (
    LocalSource,
    RowsSource,
    ShardedView,
    UnsupportedShardingError,
    chunk_rows,
    read_rows,
    sharded_view,
)

__all__ = [
    "LocalSource",
    "RowsSource",
    "ShardedFitMerge",
    "ShardedMerge",
    "ShardedTaskStore",
    "ShardedView",
    "StoredRows",
    "TorchCollectives",
    "UnsupportedShardingError",
    "chunk_rows",
    "full_state",
    "gather_store",
    "is_fully_sharded",
    "merge_sharded_",
    "read_rows",
    "save_full_safetensors",
    "shard_blocks",
    "shard_collectives",
    "sharded_view",
]
