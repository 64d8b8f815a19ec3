"""DCP (torch.distributed.checkpoint) folders as sources: specs from metadata, whole and per-row reads,
Lightning's containers stripped, and no arbitrary unpickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_ties.io import CheckpointError, open_source
from lightning_ties.io.dcp import DcpSource
from lightning_ties.merging import TensorSpec, ties_merge

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def save_dcp(state: dict, folder: Path) -> Path:
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(5, 3, generator=g), "a.bias": torch.randn(5, generator=g),
            "scale": torch.randn((), generator=g), "half": torch.randn(4, 2, generator=g).to(torch.bfloat16)}


def test_specs_come_from_the_metadata_and_reads_are_exact(tmp_path):
    state = weights(0)
    src = open_source(save_dcp(state, tmp_path / "ck"))
    assert isinstance(src, DcpSource) and src.container == ""
    assert sorted(src.keys()) == sorted(state)
    for key, tensor in state.items():
        assert src.spec(key) == TensorSpec(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(src.get(key), tensor)
    assert torch.equal(src.get_rows("a.weight", 1, 4), state["a.weight"][1:4])
    assert src.get_rows("a.weight", 5, 5).shape == (0, 3)
    assert torch.equal(src.get_rows("scale", 0, 1), state["scale"].reshape(1))


def test_lightning_containers_are_stripped_and_optimizer_state_left_out(tmp_path):
    state = weights(1)
    torch.save({"epoch": 0, "hyper_parameters": {"lr": 0.1}}, tmp_path / "meta.pt")  # Lightning's meta.pt
    folder = save_dcp({"state_dict": {f"model.{k}": v for k, v in state.items()},
                       "optimizer_0": {"state": {0: {"exp_avg": torch.ones(5, 3)}}}}, tmp_path)
    src = open_source(folder)
    assert src.container == "state_dict" and src.hyper_parameters == {"lr": 0.1}
    assert sorted(src.keys()) == sorted(f"model.{k}" for k in state)
    assert sorted(open_source(folder, prefix="auto").keys()) == sorted(state)

    fsdp = tmp_path / "fsdp"
    fsdp.mkdir()
    torch.save({"epoch": 0}, fsdp / "meta.pt")
    save_dcp({"model": {f"model.{k}": v for k, v in state.items()}, "optimizer_0": {"lr": torch.ones(1)}}, fsdp)
    src = open_source(fsdp)
    assert src.container == "model" and sorted(src.keys()) == sorted(f"model.{k}" for k in state)


def test_dcp_folders_merge_like_the_same_tensors_in_memory(tmp_path):
    base, tasks = weights(0), [weights(1), weights(2)]
    folders = [save_dcp(t, tmp_path / f"t{i}") for i, t in enumerate([base, *tasks])]
    from_files = ties_merge(folders[0], folders[1:], k=0.4, lam=0.9)
    in_memory = ties_merge(base, tasks, k=0.4, lam=0.9)
    assert all(torch.equal(from_files[k], in_memory[k]) for k in in_memory)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_needing_arbitrary_unpickling_is_refused_naming_the_global(tmp_path, monkeypatch):
    folder = save_dcp(weights(0), tmp_path / "ck")
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.storage_meta = _Boom()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.setattr(os, "system", lambda *_: pytest.fail("unpickling ran code from the file"))
    with pytest.raises(CheckpointError, match=r"refused to unpickle (posix|os)\.system.*trust_pickle=True"):
        open_source(folder)


def test_a_lightning_meta_file_obeys_weights_only(tmp_path):
    folder = save_dcp(weights(0), tmp_path)
    torch.save({"hyper_parameters": _Boom()}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        open_source(folder)


def test_missing_chunks_and_corrupt_metadata_name_the_folder(tmp_path):
    folder = save_dcp(weights(0), tmp_path / "ck")
    for data in folder.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"ck.*(truncated|corrupt)"):
        open_source(folder).get("a.weight")
    (folder / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"ck.*corrupt DCP metadata"):
        open_source(folder)
