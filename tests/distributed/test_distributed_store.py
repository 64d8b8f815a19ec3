"""The continual task store written by W ranks (``ShardedTaskStore``), on 2 gloo processes.

Given a model sharded by ``fully_shard`` over 2 ranks (uneven rows), when each rank stores its rows of a
task vector, then the pieces put together are exactly what one process's ``TaskVectorStore`` stores
(the trim's threshold is the global one) and read back as base + tau; when one rank cannot write, every
rank raises (none waits for it) and the store does not list the task.
"""

from __future__ import annotations

import json
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


def _checked_store(root: str) -> tuple:
    """The base model sharded by ``fully_shard`` over this process group, and its checked store at ``root``."""
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import ShardedTaskStore, sharded_view

    model = nn.Sequential(nn.Linear(6, 7), nn.Linear(7, 3))
    model.load_state_dict(whole_models()[0])
    fully_shard(model)
    view = sharded_view(model)
    store = ShardedTaskStore(root, view, k=K)
    store.check()
    return view, store


def _store_on_ranks(rank: int, world: int, root: str) -> dict:
    from lightning_ties.distributed import LocalSource

    _, finetuned = whole_models()
    view, store = _checked_store(root)
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
    from lightning_ties.distributed import LocalSource

    view, store = _checked_store(root)
    if not store.has_base():
        store.save_base(view.local_state())
    for name in add:
        rows = {key: task_model(name)[key][slice(*entry.rows)] for key, entry in view.entries.items()}
        store.add(name, LocalSource(rows, view.specs(), name), store.base_pieces())
    return {name: {key: store.source(name).get(key) for key in view.keys} for name in store.names()}


def assert_same_store(root: Path, single: TaskVectorStore) -> None:
    """A store one process holds (after :func:`gather_store`) is file for file the one-process store."""
    store = TaskVectorStore(root, k=K)
    store.check()
    assert store.names() == single.names() and store.index().get("sharded") is None
    assert store.base_path.read_bytes() == single.base_path.read_bytes()
    for name in single.names():
        assert store.task_path(name).read_bytes() == single.task_path(name).read_bytes(), name


def test_a_store_is_continued_on_any_number_of_ranks_and_by_one_process_with_the_same_tasks(tmp_path):
    # given tasks a and b stored by 2 ranks, when 3 ranks continue the store (adding c), then 1, then one process
    # (adding e), then 2 ranks again (whose folders are outdated now: written again) and one process again
    from lightning_ties.distributed import gather_store

    root = str(tmp_path / "store")
    single = TaskVectorStore(tmp_path / "single", k=K)
    single.save_base(whole_models()[0])
    for world, add in ((2, ["a", "b"]), (3, ["c"]), (1, []), (None, ["e"]), (2, ["d"]), (None, [])):
        for name in add:
            single.add(name, task_model(name))
        if world is None:  # one process: the ranks' rows put together, file for file the one-process store
            store = TaskVectorStore(root, k=K)
            gather_store(store)
            for name in add:
                store.add(name, task_model(name))
            assert_same_store(Path(root), single)
            continue
        results = run_ranks(_continue_on_ranks, world, root, add)
        # then every rank reads its rows of every task so far, as one process's store holds them
        for name in single.names():
            expected = single.source(name)
            for key in whole_models()[0]:
                assert torch.equal(torch.cat([r[name][key] for r in results]), expected.get(key)), (world, name, key)
        assert sorted(p.name for p in Path(root).iterdir() if p.name.startswith(f"rank-") and p.name.endswith(f"of-{world}")) == [
            f"rank-{r}-of-{world}" for r in range(world)
        ]


def test_a_store_written_by_one_process_is_continued_by_ranks_and_then_by_one_process_again(tmp_path):
    from lightning_ties.distributed import gather_store
    from lightning_ties.io import CheckpointError

    root = tmp_path / "store"
    one = TaskVectorStore(root, k=K)
    one.save_base(whole_models()[0])
    one.add("a", task_model("a"))

    results = run_ranks(_continue_on_ranks, 2, str(root), ["b"])

    single = TaskVectorStore(tmp_path / "single", k=K)
    single.save_base(whole_models()[0])
    for name in ("a", "b"):
        single.add(name, task_model(name))
        for key, value in {k: single.source(name).get(k) for k in whole_models()[0]}.items():
            assert torch.equal(torch.cat([r[name][key] for r in results]), value), (name, key)
    # the store as it is now is the ranks': read directly by one process, it is refused, naming what to do
    as_is = TaskVectorStore(root, k=K)
    for use in (as_is.check, lambda: as_is.source("a"), lambda: as_is.merge(), as_is.base_state,
                lambda: as_is.add("c", task_model("c")), lambda: as_is.save_base(whole_models()[0])):
        with pytest.raises(CheckpointError, match=r"written by a sharded fit on 2 ranks.*gather_store"):
            use()
    assert as_is.names() == ["a", "b"]  # nothing was added to the sharded store's index
    # a file of the store's one-process layout that someone changed since is refused, not replaced
    (root / "tasks" / "a.safetensors").write_bytes(b"edited by someone")
    with pytest.raises(Exception, match=r"tasks/a\.safetensors"):
        gather_store(TaskVectorStore(root, k=K))
    (root / "tasks" / "a.safetensors").write_bytes(single.task_path("a").read_bytes())
    # then laid out for one process: the one-process store's files, rewritten where they are ours
    gather_store(TaskVectorStore(root, k=K))
    assert_same_store(root, single)


def test_one_process_names_what_is_missing_from_a_damaged_sharded_store_and_ranks_record_the_shapes(tmp_path):
    from lightning_ties.distributed import gather_store
    from lightning_ties.io import CheckpointError

    root = tmp_path / "store"
    run_ranks(_continue_on_ranks, 2, str(root), ["a"])
    index = json.loads((root / "index.json").read_text())
    assert index["sharded"] == {"world_size": 2, "shapes": {k: list(v.shape) for k, v in whole_models()[0].items()}}
    # a rank's folder gone: named
    (root / "rank-1-of-2").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=r"written by 2 ranks but \['rank-1-of-2'\] is missing"):
        gather_store(TaskVectorStore(root, k=K))
    (tmp_path / "moved").rename(root / "rank-1-of-2")
    # an index without the global shapes (as an earlier lightning-ties wrote it): what to do
    TaskVectorStore(root, k=K).update_index(sharded={"world_size": 2})  # as we wrote it then
    with pytest.raises(CheckpointError, match="records no global shapes.*continue it once under the sharded strategy"):
        gather_store(TaskVectorStore(root, k=K))
    assert not (root / "base.safetensors").exists()  # nothing was written
    # continued once on ranks, the store records them, and one process can take it over
    run_ranks(_continue_on_ranks, 2, str(root), [])
    assert json.loads((root / "index.json").read_text())["sharded"] == index["sharded"]
    gather_store(TaskVectorStore(root, k=K))
    assert TaskVectorStore(root, k=K).names() == ["a"]


def _continue_with_another_model(rank: int, world: int, root: str) -> str:
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import ShardedTaskStore, sharded_view

    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))  # the store holds Linear(6, 7) weights
    fully_shard(model)
    with pytest.raises(Exception) as err:
        ShardedTaskStore(root, sharded_view(model), k=K).check()
    return str(err.value)


def test_a_sharded_store_of_another_model_is_refused_naming_the_key_and_both_shapes(tmp_path):
    root = str(tmp_path / "store")
    run_ranks(_continue_on_ranks, 2, root, ["a"])
    message = run_ranks(_continue_with_another_model, 2, root)[0]
    assert "'0.weight' is stored with shape [7, 6], the module's is [5, 6]" in message
    assert "use a new store folder" in message
