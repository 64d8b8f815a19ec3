"""Collectives over ``torch.distributed``: how W ranks agree on the few global quantities of a merge.

The merge engine (:mod:`lightning_ties.merging`) needs two reductions and nothing else: an
elementwise sum over ranks (the trim's counts, the sign election's global majority) and a
gather in rank order (threshold tie counts, to keep ties in one process's key/flat order).
:class:`TorchCollectives` provides them over a process group; sums run in int64 or float64,
so counts never overflow and float sums of a handful of ranks are exact.

Under HSDP (``(Replicate(), Shard(0))`` placements) every replica holds a whole copy of the
model split over the shard dimension of the mesh: the merge must run over that dimension
only, so that each entry is counted once (:func:`shard_collectives`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class TorchCollectives:
    """Sum and gather over a ``torch.distributed`` process group (None: the default group).

    Tensors travel on the backend's device (CPU for gloo, the current CUDA device for NCCL)
    and come back on the caller's device. ``all_sum`` returns int64 for integer and bool
    inputs and float64 for floating ones (the widened sum, never rounded back).

    Example (inside an initialised process group)::

        coll = TorchCollectives()
        total = coll.all_sum(torch.tensor([coll.rank]))  # tensor([0 + 1 + ... + W-1])
        rows = coll.all_gather(torch.tensor([coll.rank]))  # tensor([[0], [1], ...])
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCollectives needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, or a Lightning strategy's setup)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def __repr__(self) -> str:
        return f"TorchCollectives(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``t`` over the group's ranks (int64 or float64), on ``t``'s device."""
        wide = torch.float64 if t.is_floating_point() else torch.int64
        buf = t.detach().to(self.device, wide, copy=True)
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
        dist.all_gather(list(out.unbind(0)), local, group=self.group)
        return out.to(t.device)


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
