"""The merge of an FSDP2-sharded module on W ranks is the single-process ``ties_merge``, bit for bit.

Given a tiny model with uneven row counts (some ranks hold short or empty shards), a buffer, a
tied weight, and task vectors quantised so that trim thresholds tie and sign elections are
contested (score exactly 0), when each rank merges only its own shards with
``merge_sharded_``, then the gathered weights equal ``ties_merge`` in one process exactly, for
the applied lam and for another lam re-applied from the same tau_m.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_harness import run_ranks
from lightning_ties.merging import ties_merge

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

K, LAM, LAM2 = 0.3, 0.7, 1.3


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 5)
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 1)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight  # tied


def base_model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    model.norm.running_mean.normal_()
    with torch.no_grad():  # on a 1/64 grid: base + delta - base is delta exactly
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_((value * 64).round() / 64)
    return model


def task_states() -> list[dict[str, torch.Tensor]]:
    """Three tasks; deltas are multiples of 0.25 (ties at every threshold), task 1 opposes task 0 on
    ``hidden.weight``'s first row (exactly contested signs), tied names share one tensor."""
    base = base_model().state_dict()
    g = torch.Generator().manual_seed(1)
    tasks = []
    for t in range(3):
        state = {}
        for key, value in base.items():
            if key == "out.weight":
                continue
            if not value.is_floating_point():
                state[key] = value.clone()
                continue
            delta = torch.randint(-5, 4, value.shape, generator=g).float() * 0.25  # mostly negative: contested -> -1
            state[key] = value + delta
        state["out.weight"] = state["emb.weight"]
        tasks.append(state)
    contested = tasks[0]["hidden.weight"][0] - base["hidden.weight"][0]
    tasks[1]["hidden.weight"][0] = base["hidden.weight"][0] - contested
    tasks[2]["hidden.weight"][0] = base["hidden.weight"][0]
    return tasks


def _merge_on_ranks(rank: int, world: int, folder: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import merge_sharded_, sharded_view

    model = base_model()
    fully_shard(model)
    view = sharded_view(model)
    base = view.local_state()
    # task 0 from a safetensors file (read per row range), the others as whole state dicts
    tasks = [Path(folder) / "task0.safetensors", *task_states()[1:]]
    merged = merge_sharded_(view, base, tasks, k=K, lam=LAM)
    first = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
    merged.apply_(LAM2)
    second = {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
    return {"first": first, "second": second, "tau_keys": sorted(merged.tau),
            "local_numel": sum(t.numel() for t in merged.tau.values())}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_sharded_merge_equals_single_process_ties_merge_bit_for_bit(world, tmp_path):
    from lightning_ties.io import save_safetensors

    tasks = task_states()
    save_safetensors({k: v for k, v in tasks[0].items() if k != "out.weight"} | {"out.weight": tasks[0]["emb.weight"].clone()},
                     tmp_path / "task0.safetensors")
    base = base_model().state_dict()
    expected = ties_merge(base, tasks, k=K, lam=LAM)
    expected2 = ties_merge(base, tasks, k=K, lam=LAM2)
    # the contested row really is contested in one process: task 0 and task 1 cancel
    assert torch.equal(tasks[0]["hidden.weight"][0] - base["hidden.weight"][0],
                       -(tasks[1]["hidden.weight"][0] - base["hidden.weight"][0]))
    results = run_ranks(_merge_on_ranks, world, str(tmp_path))
    for r in results:
        for key in expected:
            assert torch.equal(r["first"][key], expected[key]), key
            assert torch.equal(r["second"][key], expected2[key]), key
    # each rank held only its rows of tau_m: together exactly one copy of the merged entries
    merged_numel = sum(v.numel() for k, v in base.items() if v.is_floating_point() and k != "out.weight")
    assert sum(r["local_numel"] for r in results) == merged_numel


def _merge_hsdp(rank: int, world: int, folder: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_ties.distributed import merge_sharded_, sharded_view

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = base_model()
    fully_shard(model, mesh=mesh)
    view = sharded_view(model)
    merge_sharded_(view, view.local_state(), [Path(folder) / "task0.safetensors", *task_states()[1:]], k=K, lam=LAM)
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}


def test_hsdp_merges_each_replica_once_and_every_replica_ends_the_same(tmp_path):
    from lightning_ties.io import save_safetensors

    tasks = task_states()
    save_safetensors({k: v for k, v in tasks[0].items() if k != "out.weight"} | {"out.weight": tasks[0]["emb.weight"].clone()},
                     tmp_path / "task0.safetensors")
    expected = ties_merge(base_model().state_dict(), tasks, k=K, lam=LAM)
    for r in run_ranks(_merge_hsdp, 4, str(tmp_path)):  # 2 replicas x 2 shards
        for key in expected:
            assert torch.equal(r[key], expected[key]), key
