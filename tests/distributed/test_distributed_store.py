"""The continual task store written by W ranks (``ShardedTaskStore``), on 2 gloo processes.

Given a model sharded by ``fully_shard`` over 2 ranks (uneven rows), when each rank stores its rows of a
task vector, then the pieces put together are exactly what one process's ``TaskVectorStore`` stores
(the trim's threshold is the global one) and read back as base + tau; when one rank cannot write, every
rank raises (none waits for it) and the store does not list the task.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_harness import run_ranks
from lightning_ties.io.task_store import TaskVectorStore

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

K = 0.3


def whole_models() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base and one fine-tuned model, whole (every rank builds the same and keeps its rows)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 3)).state_dict()
    g = torch.Generator().manual_seed(1)
    return dict(base), {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}


def _store_on_ranks(rank: int, world: int, root: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import LocalSource, ShardedTaskStore, sharded_view

    base, finetuned = whole_models()
    model = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 3))
    model.load_state_dict(base)
    fully_shard(model)
    view = sharded_view(model)
    store = ShardedTaskStore(root, view, k=K)
    store.check()
    assert not store.has_base()
    store.save_base(view.local_state())
    rows = {key: finetuned[key][slice(*entry.rows)] for key, entry in view.entries.items()}
    store.add("a", LocalSource(rows, view.specs(), "a"), store.base_pieces())
    got = {key: store.source("a").get(key) for key in view.keys}
    if rank == 1:  # a file of another tool where rank 1 would write task b: refused there
        (Path(root) / "rank-1-of-2" / "tasks" / "b.safetensors").write_bytes(b"not ours")
    try:
        store.add("b", LocalSource(rows, view.specs(), "b"), store.base_pieces())
        error = None
    except Exception as err:  # noqa: BLE001 - what each rank raised is the result
        error = f"{type(err).__name__}: {err}"
    return {"rows": {k: e.rows for k, e in view.entries.items()}, "a": got, "error": error, "names": store.names()}


def test_each_rank_stores_its_rows_of_the_one_process_store_and_a_failing_rank_stops_every_rank(tmp_path):
    results = run_ranks(_store_on_ranks, 2, str(tmp_path / "sharded"))
    base, finetuned = whole_models()
    single = TaskVectorStore(tmp_path / "single", k=K)
    single.save_base(base)
    single.add("a", finetuned)
    expected = single.source("a")
    for key in base:
        pieces = [r["a"][key] for r in results]
        assert [tuple(r["rows"][key]) for r in results][0][0] == 0
        assert torch.equal(torch.cat(pieces), expected.get(key)), key
    assert "rank-1-of-2/tasks/b.safetensors" in results[1]["error"]  # rank 1 says why
    assert results[0]["error"] == f"CheckpointError: {tmp_path / 'sharded'}: 1 other rank(s) failed on the task store; see their errors"
    assert [r["names"] for r in results] == [["a"], ["a"]]  # b is not listed: not every rank stored it


def _store_under_hsdp(rank: int, world: int, root: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import ShardedTaskStore, UnsupportedShardingError, sharded_view

    model = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 3))
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
    with pytest.raises(UnsupportedShardingError) as err:
        ShardedTaskStore(root, sharded_view(model), k=K)
    return str(err.value)


def test_a_store_under_hsdp_is_refused_naming_what_is_supported(tmp_path):
    message = run_ranks(_store_under_hsdp, 2, str(tmp_path / "store"))[0]
    assert "under HSDP (the parameters sharded over 1 of 2 ranks) is not supported" in message
    assert "FSDPStrategy" in message and not (tmp_path / "store").exists()
