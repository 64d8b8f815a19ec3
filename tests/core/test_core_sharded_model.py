"""The Merger on a model's rows (``use_shards``), in one process: what W ranks do, with one rank holding every row.

Given a model with per-task heads and base/task checkpoints, when the merger hands its merges to
:class:`ShardedModel` (the view of a whole module: one rank, every row), then every merge, task's weights and
head it writes equal the whole-tensor merger's bit for bit, the weights already in place stay valid across the
switch, and what cannot be written into fixed shards (heads of other shapes) or merged on rows (RegMean) is
refused by name. The same path on 2 real ranks: tests/lightning/test_lightning_sharded_module.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ties.core.merger import Merger
from lightning_ties.distributed import sharded_view


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _tasks(base: dict[str, torch.Tensor], head_rows: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tasks = {}
    for t in ("a", "b"):
        state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        state["2.weight"] = torch.randn(head_rows, 5, generator=g)
        state["2.bias"] = torch.randn(head_rows, generator=g)
        tasks[t] = state
    return tasks


def _pair(**kwargs) -> tuple[Merger, Merger]:
    base = {k: v.clone() for k, v in _net().state_dict().items()}
    tasks = _tasks(base)
    whole = Merger(base, tasks, model=_net(), heads=r"^2\.", **kwargs)
    rows = Merger(base, tasks, model=_net(), heads=r"^2\.", **kwargs)
    rows.use_shards(lambda: sharded_view(rows.model))
    return whole, rows


def _assert_same_model(a: Merger, b: Merger) -> None:
    for (key, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), key


@pytest.mark.parametrize("method", ["ties", "tsv", "task_arithmetic"])
def test_merges_task_weights_and_heads_on_rows_equal_the_whole_tensor_merger(method) -> None:
    whole, rows = _pair(method=method)
    assert rows.sharded is not None and whole.sharded is None
    for merger in (whole, rows):
        merger.apply_merge(k=0.3, lam=0.9)
        merger.use_task("b")
    _assert_same_model(whole, rows)
    assert rows.current == whole.current == ((0.3 if method == "ties" else None), 0.9)
    for merger in (whole, rows):
        merger.apply_merge(k=0.3, lam=1.4)  # the same tau_m, another lam
    _assert_same_model(whole, rows)
    for merger in (whole, rows):
        merger.load_task("a")  # task a's own weights and head
    _assert_same_model(whole, rows)
    assert torch.equal(rows.model.state_dict()["0.weight"], rows.task_sources[0].get("0.weight"))


def test_the_weights_in_place_stay_valid_when_the_merger_moves_to_rows() -> None:
    base = {k: v.clone() for k, v in _net().state_dict().items()}
    merger = Merger(base, _tasks(base), model=_net(), heads=r"^2\.")
    merger.apply_merge(k=0.2, lam=1.0)
    merger.use_task("a")
    merger.use_shards(lambda: sharded_view(merger.model))  # e.g. configure_model sharded the model meanwhile
    assert merger.current == (0.2, 1.0) and merger.head_task == "a"  # no re-merge of another (k, lam)


def test_heads_of_another_shape_and_methods_that_need_data_are_refused_on_rows() -> None:
    base = {k: v.clone() for k, v in _net().state_dict().items()}
    tasks = _tasks(base)
    tasks["b"] = _tasks(base, head_rows=4)["b"]  # task b has 4 classes
    merger = Merger(base, tasks, model=_net(), heads=r"^2\.")
    with pytest.raises(ValueError, match=r"task 'b': its head '2\.bias' has shape \(4,\), the sharded model's \(3,\)"):
        merger.use_shards(lambda: sharded_view(merger.model))
    _, rows = _pair(method="regmean")
    with pytest.raises(ValueError, match="'regmean' needs each task's data on whole weights.*sharded"):
        rows.apply_merge(lam=1.0)
