"""Collectives over ``torch.distributed``: how W ranks agree on the few global quantities of a merge.

The merge engine (:mod:`lightning_ties.merging`) needs two reductions and nothing else: an
elementwise sum over ranks (the trim's counts, the sign election's global majority) and a
gather in rank order (threshold tie counts, to keep ties in one process's key/flat order).
:class:`TorchCollectives` (one implementation, in :mod:`lightning_ties.io.ranks`, shared with
``merge_to`` on W processes) provides them over a process group; sums run in int64 or float64,
so counts never overflow and float sums of a handful of ranks are exact; a failed peer is a
:class:`~lightning_ties.io.ranks.RankFailedError`.

Under HSDP (``(Replicate(), Shard(0))`` placements) every replica holds a whole copy of the
model split over the shard dimension of the mesh: the merge must run over that dimension
only, so that each entry is counted once (:func:`shard_collectives`).
"""

from __future__ import annotations

from typing import Any

from ..io.ranks import TorchCollectives


def shard_collectives(mesh: Any, shard_dim: int | str | None = None) -> TorchCollectives:
    """Collectives over the dimension of ``mesh`` (a DeviceMesh) that shards the parameters.

    A 1-D mesh (FSDP) is its own shard dimension. A 2-D HSDP mesh ``(replicate, shard)`` gives
    the group of its last dimension unless ``shard_dim`` (index or name) says otherwise: every
    replica group then merges its own copy, each entry counted once per copy, and all copies
    end identical because their inputs are.

    Example (inside an initialised process group)::

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        coll = shard_collectives(mesh)  # world_size 2: the ranks of one replica
    """
    if mesh.ndim == 1:
        return TorchCollectives(mesh.get_group())
    if shard_dim is None:
        shard_dim = mesh.ndim - 1
    return TorchCollectives(mesh.get_group(shard_dim))


__all__ = ["TorchCollectives", "shard_collectives"]
