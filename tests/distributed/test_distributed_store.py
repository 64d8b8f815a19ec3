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


def task_model(name: str) -> dict[str, torch.Tensor]:
    base, _ = whole_models()
    g = torch.Generator().manual_seed(ord(name))
    return {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}


def _continue_on_ranks(rank: int, world: int, root: str, add: list[str]) -> dict:
    """A fit on ``world`` ranks continuing the store (whatever world size wrote it), adding ``add``."""
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import LocalSource, ShardedTaskStore, sharded_view

    base, _ = whole_models()
    model = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 3))
    model.load_state_dict(base)
    fully_shard(model)
    view = sharded_view(model)
    store = ShardedTaskStore(root, view, k=K)
    store.check()
    if not store.has_base():
        store.save_base(view.local_state())
    for name in add:
        rows = {key: task_model(name)[key][slice(*entry.rows)] for key, entry in view.entries.items()}
        store.add(name, LocalSource(rows, view.specs(), name), store.base_pieces())
    return {name: {key: store.source(name).get(key) for key in view.keys} for name in store.names()}


def test_a_store_written_by_w_ranks_is_continued_by_another_number_of_ranks_with_the_same_tasks(tmp_path):
    # given tasks a and b stored by 2 ranks, when 3 ranks continue the store (adding c), then 1
    root = str(tmp_path / "store")
    single = TaskVectorStore(tmp_path / "single", k=K)
    single.save_base(whole_models()[0])
    for world, add in ((2, ["a", "b"]), (3, ["c"]), (1, []), (2, ["d"])):
        for name in add:
            single.add(name, task_model(name))
        if world == 2 and add == ["d"]:  # back to 2 ranks: their folders are outdated now, and refused
            with pytest.raises(RuntimeError, match=r"rank-0-of-2 is left from an earlier run on 2 ranks.*remove the folders"):
                run_ranks(_continue_on_ranks, world, root, add)
            for folder in Path(root).glob("rank-*-of-2"):
                for path in sorted(folder.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()
                folder.rmdir()
        results = run_ranks(_continue_on_ranks, world, root, add)
        # then every rank reads its rows of every task so far, as one process's store holds them
        for name in single.names():
            expected = single.source(name)
            for key in whole_models()[0]:
                assert torch.equal(torch.cat([r[name][key] for r in results]), expected.get(key)), (world, name, key)
        assert sorted(p.name for p in Path(root).iterdir() if p.name.startswith(f"rank-") and p.name.endswith(f"of-{world}")) == [
            f"rank-{r}-of-{world}" for r in range(world)
        ]


def test_a_store_written_by_one_process_is_continued_by_ranks_and_then_refused_by_one_process(tmp_path):
    from lightning_ties.io import CheckpointError

    root = tmp_path / "store"
    one = TaskVectorStore(root, k=K)
    one.save_base(whole_models()[0])
    one.add("a", task_model("a"))
    expected_a = {key: one.source("a").get(key) for key in whole_models()[0]}

    results = run_ranks(_continue_on_ranks, 2, str(root), ["b"])

    single = TaskVectorStore(tmp_path / "single", k=K)
    single.save_base(whole_models()[0])
    for name in ("a", "b"):
        single.add(name, task_model(name))
        for key, value in {k: single.source(name).get(k) for k in expected_a}.items():
            assert torch.equal(torch.cat([r[name][key] for r in results]), value), (name, key)
    with pytest.raises(CheckpointError, match="written by a sharded fit on 2 ranks"):
        TaskVectorStore(root, k=K).check()
