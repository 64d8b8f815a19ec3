"""Sharding a model for a merge: FSDP2 ``fully_shard`` block by block, as a ``configure_model`` would.

Example (inside a process group; ``mesh`` a 1-D device mesh over the ranks)::

    shard_blocks(model, mesh)   # each block of every nn.ModuleList, then the model itself
"""

from __future__ import annotations

from typing import Any

from torch import nn


def shard_blocks(model: nn.Module, mesh: Any) -> None:
    """``fully_shard`` each block of ``model`` (every element of an ``nn.ModuleList`` that holds parameters,
    innermost first), then ``model`` itself, over ``mesh``.

    Blocks are the units FSDP2 gathers one at a time in a forward: a transformer's layers, so that no rank
    holds more than one whole layer at once; what is outside them (embeddings, heads) is the root's group.
    A model already sharded is left as it is (Lightning calls ``configure_model`` once per stage).
    """
    from torch.distributed.fsdp import fully_shard

    if is_fully_sharded(model):
        return
    blocks = {id(block) for module in model.modules() if isinstance(module, nn.ModuleList) for block in module}
    for module in reversed(list(model.modules())):  # descendants before their ancestors
        if id(module) in blocks and any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules (by any ``shard_fn``).

    Not "holds a DTensor parameter": after a forward, FSDP2 leaves the root's parameters gathered (plain
    tensors) until its next backward or ``state_dict()``.
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


__all__ = ["is_fully_sharded", "shard_blocks"]
