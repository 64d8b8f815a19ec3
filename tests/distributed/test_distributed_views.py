"""How a rank sees its slice of a sharded module (FSDP2, HSDP, FSDP1), and DCP folders read per rank.

Given W gloo processes on the CPU, when a tiny model is sharded, then each rank's pieces are exactly
its rows of the global tensors, writing pieces back changes exactly those rows, and tensor
parallel placements are refused with a message naming what is supported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_harness import run_ranks
from lightning_ties.distributed import LocalSource, RowsSource, chunk_rows, read_rows
from lightning_ties.merging.sources import StateDictSource, TensorSpec

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


class Tiny(nn.Module):
    """Uneven rows (5, 1), a buffer, and a tied weight (``out.weight`` is ``emb.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 5)
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 1)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    model.norm.running_mean.normal_()
    return model


# ---- single process -----------------------------------------------------------------------------
def test_chunk_rows_splits_like_torch_chunk_with_short_and_empty_tails():
    for rows in range(0, 9):
        for parts in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(parts) if rows else ()
            spans = [chunk_rows(rows, parts, i) for i in range(parts)]
            expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.numel()]
            assert [s for s in spans if s[1] > s[0]] == expected
            assert spans[-1][1] == rows and all(a <= b for a, b in spans)


def test_read_rows_of_safetensors_reads_only_the_rows(tmp_path, monkeypatch):
    from lightning_ties.io import SafetensorsSource, save_safetensors

    save_safetensors({"w": torch.arange(12.0).reshape(4, 3), "s": torch.tensor(7.0)}, tmp_path / "m.safetensors")
    src = SafetensorsSource([tmp_path / "m.safetensors"])
    monkeypatch.setattr(SafetensorsSource, "get", lambda *a: pytest.fail("read the whole tensor"))
    assert read_rows(src, "w", 1, 3).tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert read_rows(src, "w", 4, 4).shape == (0, 3)
    assert read_rows(src, "s", 0, 1).tolist() == [7.0] and read_rows(src, "s", 1, 1).numel() == 0


def test_rows_source_keeps_global_specs_and_returns_local_rows():
    src = RowsSource(StateDictSource({"w": torch.arange(6.0).reshape(3, 2)}), {"w": (2, 3)})
    assert src.spec("w") == TensorSpec((3, 2), torch.float32)
    assert src.get("w").tolist() == [[4.0, 5.0]]
    local = LocalSource({"w": torch.ones(0, 2)}, {"w": TensorSpec((3, 2), torch.float32)}, "rank")
    assert local.get("w").shape == (0, 2) and local.spec("w").shape == (3, 2)


# ---- FSDP2 ----------------------------------------------------------------------------------------
def _fsdp2_view(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import sharded_view

    model = tiny()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model)
    view = sharded_view(model)
    pieces = view.local_state()
    # write back: every merged entry becomes its global flat index (a value that says where it went)
    marks = {}
    for key, entry in view.entries.items():
        if not entry.spec.is_floating:
            continue
        start, stop = entry.flat
        marks[key] = torch.arange(start, stop, dtype=entry.spec.dtype).reshape(-1)
    view.write_(marks)
    after = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}
    return {"rows": view.rows, "shards": view.shards, "pieces": pieces, "full": full, "after": after,
            "aliases": view.aliases, "kind": view.kind, "world": view.collectives.world_size}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_view_holds_each_ranks_rows_and_writes_them_back(world):
    results = run_ranks(_fsdp2_view, world)
    full = results[0]["full"]
    assert all(r["kind"] == "fsdp2" and r["world"] == world for r in results)
    assert results[0]["aliases"] == {"out.weight": "emb.weight"}
    for key, tensor in full.items():
        rows = [r["rows"][key] for r in results]
        if key.startswith("norm.") and key != "norm.weight" and key != "norm.bias":
            # buffers: every rank holds them whole; rank 0 merges them, the others own no row
            assert rows[0] == (0, tensor.shape[0] if tensor.dim() else 1)
            assert all(r[0] == r[1] for r in rows[1:])
        else:
            assert rows == [chunk_rows(tensor.shape[0], world, i) for i in range(world)], key
        if tensor.is_floating_point():
            pieces = torch.cat([r["pieces"][key].reshape(-1) for r in results])
            assert torch.equal(pieces, tensor.reshape(-1)), key
            for r in results:  # every rank ends with the same whole tensor: its global flat index
                expected = torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape)
                assert torch.equal(r["after"][key], expected), key
    # 3 ranks, 1 row: two ranks hold an empty shard of head.weight
    if world == 3:
        assert [r["rows"]["head.weight"] for r in results] == [(0, 1), (1, 1), (1, 1)]


def _tensor_parallel_refused(rank: int, world: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_ties.distributed import UnsupportedShardingError, sharded_view

    mesh = init_device_mesh("cpu", (world,))
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(1)]))
    model.bias = nn.Parameter(distribute_tensor(model.bias.detach(), mesh, [Shard(0)]))
    with pytest.raises(UnsupportedShardingError) as err:
        sharded_view(model)
    return str(err.value)


def test_tensor_parallel_placements_are_refused_naming_what_is_supported():
    message = run_ranks(_tensor_parallel_refused, 2)[0]
    assert "'weight'" in message and "Shard(dim=1)" in message
    assert "supported: FSDP2 fully_shard" in message and "tensor_parallel_size=1" in message


def _hsdp_view(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import sharded_view

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = tiny()
    fully_shard(model, mesh=mesh)
    view = sharded_view(model)
    return {"world": view.collectives.world_size, "rank": view.collectives.rank, "rows": view.rows["hidden.weight"]}


def test_hsdp_merges_over_the_shard_dimension_only():
    results = run_ranks(_hsdp_view, 4)
    assert [r["world"] for r in results] == [2, 2, 2, 2]
    assert [(r["rank"], r["rows"]) for r in results] == [(0, (0, 3)), (1, (3, 5)), (0, (0, 3)), (1, (3, 5))]


# ---- FSDP1 ----------------------------------------------------------------------------------------
def _fsdp1_view(rank: int, world: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_ties.distributed import sharded_view

    model = tiny()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    view = sharded_view(wrapped)
    pieces = view.local_state()
    view.write_({k: torch.arange(*e.flat, dtype=e.spec.dtype) for k, e in view.entries.items() if e.spec.is_floating})
    after = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    return {"rows": view.rows, "pieces": pieces, "full": full, "after": after, "kind": view.kind,
            "aliases": view.aliases}


def test_fsdp1_view_reads_and_writes_the_sharded_state_dict():
    results = run_ranks(_fsdp1_view, 2)
    full = results[0]["full"]
    assert results[0]["kind"] == "fsdp1"
    assert results[0]["aliases"] == {"out.weight": "emb.weight"}
    for key, tensor in full.items():
        if not tensor.is_floating_point():
            continue
        pieces = torch.cat([r["pieces"][key].reshape(-1) for r in results])
        assert torch.equal(pieces, tensor.reshape(-1)), key
        expected = torch.arange(tensor.numel(), dtype=tensor.dtype).reshape(tensor.shape)
        assert torch.equal(results[0]["after"][key], expected), key


# ---- DCP folders written by W ranks, read per rank and whole --------------------------------------
def _save_and_read_dcp(rank: int, world: int, folder: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import sharded_view
    from lightning_ties.io.dcp import DcpSource

    model = tiny()
    fully_shard(model)
    dcp.save({"state_dict": model.state_dict()}, checkpoint_id=folder)
    view = sharded_view(model)
    torch.distributed.barrier()
    src = DcpSource(folder)  # the "state_dict" container is stripped, as Lightning nests it
    rows = RowsSource(src, view.rows)
    return {"read": {k: rows.get(k) for k in rows.keys()}, "pieces": view.local_state()}


def test_dcp_folder_of_a_sharded_model_reads_whole_and_per_rank(tmp_path: Path):
    from lightning_ties.io import open_source

    folder = tmp_path / "ckpt"
    results = run_ranks(_save_and_read_dcp, 2, str(folder))
    for r in results:
        for key, piece in r["pieces"].items():
            assert torch.equal(r["read"][key], piece), key
    whole = open_source(folder)
    full = tiny().state_dict()
    assert sorted(whole.keys()) == sorted(full)
    for key, tensor in full.items():
        assert whole.spec(key) == TensorSpec(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(whole.get(key), tensor), key


def test_distributed_imports_only_merging_and_io_and_never_lightning():
    import ast
    import subprocess
    import sys

    import lightning_ties.distributed as package

    for path in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert (node.module or "").split(".")[0] in ("merging", "io"), f"{path.name}: imports ..{node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path.name
    code = "import sys, lightning_ties.distributed; print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_source_matched_to_the_modules_keys_is_still_read_per_row_range(tmp_path, monkeypatch):
    from lightning_ties.io import SafetensorsSource, save_safetensors
    from lightning_ties.core.keys import match_to_module

    save_safetensors({"0.weight": torch.arange(12.0).reshape(4, 3)}, tmp_path / "m.safetensors")
    matched = match_to_module(str(tmp_path / "m.safetensors"), ["model.0.weight"], label="task")
    monkeypatch.setattr(SafetensorsSource, "get", lambda *a: pytest.fail("read the whole tensor"))
    assert RowsSource(matched, {"model.0.weight": (3, 4)}).get("model.0.weight").tolist() == [[9.0, 10.0, 11.0]]


def _fingerprints(rank: int, world: int) -> list[str]:
    """The base fingerprint of Tiny sharded over ``world`` ranks: as built, one bit flipped, two entries swapped."""
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import sharded_view
    from lightning_ties.distributed.fit import rows_fingerprint

    out = []
    for change in ("none", "bit", "swap"):
        model = tiny()
        with torch.no_grad():
            w = model.hidden.weight
            if change == "bit":  # the lowest mantissa bit of one entry
                w.view(-1)[7:8].view(torch.int32).bitwise_xor_(1)
            if change == "swap":  # the same values, two of them in each other's place
                w.view(-1)[[2, 11]] = w.view(-1)[[11, 2]].clone()
        fully_shard(model)
        view = sharded_view(model)
        out.append(rows_fingerprint(view, view.local_state()))
    return out


def test_the_base_fingerprint_is_the_same_on_any_number_of_ranks_and_sees_one_bit_and_one_swap():
    on = {world: run_ranks(_fingerprints, world) for world in (1, 2, 3)}
    # every rank of every world size agrees on each fingerprint
    assert len({tuple(r) for results in on.values() for r in results}) == 1
    same, bit, swap = on[1][0]
    assert len({same, bit, swap}) == 3
