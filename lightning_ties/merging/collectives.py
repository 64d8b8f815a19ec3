"""How W ranks agree on the few global quantities of a merge, without gathering task vectors.

The merge core is pure torch and knows nothing of process groups: a caller on W ranks injects
an object with two collectives (:class:`Collectives`), e.g. one wrapping ``torch.distributed``
(gloo, NCCL) or a test's in-process fake. One process uses :data:`SINGLE_PROCESS`.

What crosses ranks (see ``TaskVectorMerger``): the trim's histogram counts (all_sum, a few
hundred KB per task per pass), the bracket's sample (all_gather, 2**17 magnitudes per task in
all), per-key tie counts (all_gather, ``[keys, N]`` int64), the sum of elected signs (all_sum,
one int64), each rank's flat ranges (all_gather, ``[keys, 2]`` int64, once), and for the SVD
methods the pieces of the one tensor being factored. :class:`ShardLayout` records the ranges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Collectives(Protocol):
    """The two collectives a merge on W ranks needs; every rank calls them in the same order.

    ``all_sum(t)``: the elementwise sum of ``t`` over ranks (same shape and dtype on every
    rank; int64 or float64, so that the sum is exact or order-independent enough), returned as
    a tensor (``t`` itself may be reused). ``all_gather(t)``: ``(world_size, *t.shape)``, every
    rank's ``t`` in rank order (same shape and dtype on every rank).
    """

    rank: int
    world_size: int

    def all_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...


class _SingleProcess:
    """Rank 0 of 1: both collectives are the identity."""

    rank = 0
    world_size = 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0)

    def __repr__(self) -> str:
        return "SINGLE_PROCESS"


#: The collectives of one process (rank 0 of 1): what every merge uses unless told otherwise.
SINGLE_PROCESS: Collectives = _SingleProcess()


class ShardLayout:
    """Every rank's flat range of every merged key, gathered once and checked.

    Built from this rank's ranges (``local[j] = (start, stop)`` of ``keys[j]``); on W ranks
    one all_gather tells each rank everyone's. For every key the non-empty ranges must tile
    ``[0, numel)`` exactly (no gap, no overlap), else every rank raises the same ValueError.

    Example:
        >>> layout = ShardLayout(["w"], [4], [(0, 4)], SINGLE_PROCESS)
        >>> layout.holders(0), layout.split(0)
        ([0], False)
    """

    def __init__(
        self, keys: Sequence[str], numels: Sequence[int], local: Sequence[tuple[int, int]], collectives: Collectives
    ) -> None:
        self.keys = list(keys)
        self.rank = collectives.rank
        self.world_size = collectives.world_size
        mine = torch.tensor([list(r) for r in local], dtype=torch.int64).reshape(len(self.keys), 2)
        gathered = collectives.all_gather(mine) if self.world_size > 1 else mine.unsqueeze(0)
        #: ranges[r][j] = (start, stop) of key j on rank r
        self.ranges: list[list[tuple[int, int]]] = [[(int(a), int(b)) for a, b in rank] for rank in gathered.tolist()]
        for j, (key, numel) in enumerate(zip(self.keys, numels)):
            self._check_tiling(key, j, numel)

    def _check_tiling(self, key: str, j: int, numel: int) -> None:
        pieces = sorted((self.ranges[r][j], r) for r in range(self.world_size) if self.ranges[r][j][1] != self.ranges[r][j][0])
        end = 0
        for (start, stop), _ in pieces:
            if start != end or stop < start:
                break
            end = stop
        else:
            if end == numel:
                return
        shown = ", ".join(f"rank {r}: [{a}, {b})" for r in range(self.world_size) for a, b in [self.ranges[r][j]])
        raise ValueError(
            f"shards of {key!r} do not tile its {numel} entries exactly ({shown}); give each rank a contiguous "
            "flat range, together covering [0, numel) without overlap ((0, 0) where a rank holds none)"
        )

    def holders(self, j: int) -> list[int]:
        """The ranks holding a non-empty range of key ``j``, in flat order."""
        held = [r for r in range(self.world_size) if self.ranges[r][j][1] > self.ranges[r][j][0]]
        return sorted(held, key=lambda r: self.ranges[r][j][0])

    def split(self, j: int) -> bool:
        """Whether key ``j`` is spread over more than one rank (its per-tensor quantities need collectives)."""
        return len(self.holders(j)) > 1

    def ranks_before(self, j: int, rank: int | None = None) -> list[int]:
        """The ranks whose range of key ``j`` comes before ``rank``'s (this rank's) in flat order."""
        rank = self.rank if rank is None else rank
        start = self.ranges[rank][j][0]
        return [r for r in self.holders(j) if self.ranges[r][j][0] < start and r != rank]


__all__ = ["Collectives", "SINGLE_PROCESS", "ShardLayout"]
