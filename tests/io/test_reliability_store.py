"""Reliability of the task-vector store: damage is reported by file, writes are crash-safe,
tied weights are stored, and ``check()`` finds a damaged store before any training.

Every test here fails on the code before issue 10.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from lightning_ties.io import CheckpointError, tempfiles
from lightning_ties.io.task_store import TaskVectorStore


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path) -> TaskVectorStore:
    """A store with a base and two tasks, one sparse (k=0.25) and one dense entry each."""
    store = TaskVectorStore(tmp_path / "store", k=0.25)
    store.save_base({"w": torch.zeros(8), "v": torch.zeros(2, 2)})
    store.add("a", {"w": torch.arange(8.0), "v": torch.ones(2, 2)})
    store.add("b", {"w": -torch.arange(8.0), "v": torch.ones(2, 2)})
    return store


def truncate(path, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


def test_a_garbage_index_is_named_at_open(store):
    index = store.root / "index.json"
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{index}: unreadable task store index .*delete the store folder"):
        TaskVectorStore(store.root)
    index.write_text(json.dumps({"format": "lightning-ties-task-store", "version": 1, "tasks": "a"}))
    with pytest.raises(CheckpointError, match=rf"{index}: corrupt task list 'a'"):
        TaskVectorStore(store.root)
    index.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=rf"{index} is not a lightning-ties-task-store index"):
        TaskVectorStore(store.root)


@pytest.mark.parametrize("name", ["a\n", "a/b", "", "a b", "\u00e9"])
def test_a_task_name_that_is_not_a_plain_file_name_is_refused_before_anything_is_written(store, name):
    files = sorted(store.root.rglob("*"))
    with pytest.raises(ValueError, match="must be letters, digits"):
        store.add(name, {"w": torch.ones(8), "v": torch.ones(2, 2)})
    assert sorted(store.root.rglob("*")) == files and store.names() == ["a", "b"]


def test_a_truncated_task_file_is_named(store):
    path = store.task_path("a")
    truncate(path, 4)
    with pytest.raises(CheckpointError, match=rf"{path}: truncated file .*add the task"):
        store.check()
    with pytest.raises(CheckpointError, match=rf"{path}: truncated file"):
        store.merge(k=0.25)


def test_a_truncated_base_file_is_named(store):
    truncate(store.base_path, 4)
    with pytest.raises(CheckpointError, match=rf"{store.base_path}: truncated file .*save the base"):
        store.check()
    with pytest.raises(CheckpointError, match=rf"{store.base_path}: truncated file"):
        store.base_state()


def test_corrupt_task_metadata_is_named(store):
    path = store.task_path("b")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["shapes"] = "{broken"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # same header length: the offsets stay valid
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt task metadata 'shapes'"):
        store.check()
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt task metadata 'shapes'"):
        store.source("b")


@pytest.mark.parametrize("file", ["task", "base"])
def test_an_unknown_dtype_is_an_error_naming_the_file_and_tensor_not_a_silent_float32(store, file):
    """The store reads its files with the one safetensors reader (one dtype table): a dtype it
    does not know is refused by name, where an earlier reader of its own read it as float32."""
    path = store.task_path("a") if file == "task" else store.base_path
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    header[name]["dtype"] = "Q32"  # same length: offsets stay valid, only the dtype is unknown
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    path.write_bytes(raw[:8] + new + raw[8 + n :])
    expected = rf"{path}: corrupt header entry for tensor '{name}' \(unknown dtype"
    with pytest.raises(CheckpointError, match=expected):
        store.check()
    with pytest.raises(CheckpointError, match=expected):
        store.merge(k=0.25)


def test_check_finds_a_missing_task_file_and_a_task_of_another_base(store):
    store.check()  # a healthy store passes
    other = TaskVectorStore(store.root.parent / "other", k=0.25)
    other.save_base({"w": torch.zeros(3), "v": torch.zeros(2, 2)})
    other.add("a", {"w": torch.ones(3), "v": torch.ones(2, 2)})
    os.replace(other.task_path("a"), store.task_path("a"))
    with pytest.raises(CheckpointError, match=r"a\.safetensors: shapes of \['w'\] differ from the base's"):
        store.check()
    store.task_path("a").unlink()
    with pytest.raises(CheckpointError, match=r"task 'a' is in .*index\.json but its file is missing"):
        store.check()


def test_save_base_and_add_store_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(4, 3)
            self.out = torch.nn.Linear(3, 4, bias=False)
            self.out.weight = self.emb.weight  # one tensor, two names

    torch.manual_seed(0)
    base, ft = Tied(), Tied()
    store = TaskVectorStore(tmp_path, k=None)
    store.save_base(base)
    state = store.base_state()
    assert torch.equal(state["emb.weight"], base.emb.weight) and torch.equal(state["out.weight"], base.emb.weight)
    store.add("t", ft)
    src = store.source("t")
    # base + (ft - base), rounded at the base's ulp: absolute, not relative, error (an entry near zero is not exact)
    torch.testing.assert_close(src.get("out.weight"), ft.emb.weight.detach(), rtol=0, atol=1e-6)


def test_a_failed_add_leaves_no_temporary_and_stale_ones_are_cleaned(store, monkeypatch):
    tasks = store.root / "tasks"
    stale = tasks / f".z.safetensors.lightning-ties-{tempfiles.HOST}-{dead_pid()}-0badc0de.tmp"
    stale.write_bytes(b"\0" * 4096)  # what a SIGKILL during add("z") leaves

    def disk_full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("lightning_ties.io.safetensors_file.os.pwrite", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*c\.safetensors: No space left on device"):
        store.add("c", {"w": torch.ones(8), "v": torch.ones(2, 2)})
    monkeypatch.undo()
    assert store.names() == ["a", "b"]
    # the failed write cleaned the dead run's temporary before starting, and left none of its own
    assert sorted(p.name for p in tasks.iterdir()) == [".lightning-ties.json", "a.safetensors", "b.safetensors"]
    stale.write_bytes(b"\0" * 4096)
    store = TaskVectorStore(store.root, k=0.25)  # opening the store cleans too
    assert not stale.exists()
    store.add("c", {"w": torch.ones(8), "v": torch.ones(2, 2)})
    assert sorted(p.name for p in tasks.iterdir()) == [".lightning-ties.json", "a.safetensors", "b.safetensors", "c.safetensors"]


def test_a_callback_with_a_damaged_store_fails_at_setup_before_any_training_step(tmp_path):
    from conftest import Classifier, quiet_trainer, task_data

    from lightning_ties.lightning import ContinualTiesMerging

    torch.manual_seed(0)
    store = TaskVectorStore(tmp_path / "store", k=0.2)
    store.save_base(Classifier().state_dict())
    store.add("a", {k: v + 0.1 for k, v in Classifier().state_dict().items()})
    truncate(store.task_path("a"), 16)

    class CountSteps(Classifier):
        steps = 0

        def training_step(self, batch, batch_idx):
            CountSteps.steps += 1
            return super().training_step(batch, batch_idx)

    merging = ContinualTiesMerging(task="b", store=str(tmp_path / "store"), k=0.2, lam=1.0)
    with pytest.raises(CheckpointError, match="a.safetensors|truncated|corrupt"):
        quiet_trainer(max_epochs=1, callbacks=[merging]).fit(CountSteps(), task_data(0))
    assert CountSteps.steps == 0


def test_put_reads_a_task_made_on_demand_one_key_at_a_time_and_writes_what_a_dict_gives(tmp_path):
    import gc
    import weakref
    from collections.abc import Mapping

    # given a task with a sparse key, a dense key and an all-zero key, stored from a dict
    g = torch.Generator().manual_seed(0)
    tau = {"a": torch.where(torch.rand(400, generator=g) < 0.1, torch.randn(400, generator=g), 0.0),
           "b": torch.randn(5, 6, generator=g), "c": torch.zeros(3)}
    full = {"step": torch.tensor([7])}
    TaskVectorStore(tmp_path / "dict", k=0.1).put("t", tau, full)

    class OnDemand(Mapping):  # each value made when asked, as gather_store's: none may outlive the next
        def __init__(self):
            self.alive = []

        def __getitem__(self, key):
            gc.collect()
            assert all(ref() is None for ref in self.alive), "a key made earlier is still held"
            value = tau[key].clone()
            self.alive.append(weakref.ref(value))
            return value

        def __iter__(self):
            return iter(tau)

        def __len__(self):
            return len(tau)

    # when the same task is stored from a mapping that makes each key on demand
    counts = TaskVectorStore(tmp_path / "lazy", k=0.1).put("t", OnDemand(), full)
    # then the file is the same, byte for byte, and the counts are the task's
    assert (tmp_path / "lazy" / "tasks" / "t.safetensors").read_bytes() == \
        (tmp_path / "dict" / "tasks" / "t.safetensors").read_bytes()
    assert counts["numel"] == 433 and counts["stored"] == int((tau["a"] != 0).sum()) + 30
