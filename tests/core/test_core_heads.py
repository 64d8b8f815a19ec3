"""One head store: detection (named or differing keys), per-task caching and swapping, used by all three users."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ties.core.heads import HeadStore, copy_into, differing_keys, named_head_keys
from lightning_ties.merging import as_source, plan_merge


class Net(nn.Module):
    def __init__(self, n_out: int = 2) -> None:
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.head = nn.Linear(2, n_out)


def test_heads_named_by_regex_or_submodule_and_every_pattern_must_name_a_key():
    net = Net()
    assert named_head_keys(net, r"^head\.") == ["head.bias", "head.weight"]
    assert named_head_keys(net, net.head) == ["head.bias", "head.weight"]
    assert named_head_keys(net, [r"body\.bias$", net.head]) == ["body.bias", "head.bias", "head.weight"]
    assert named_head_keys(net, None) == []
    with pytest.raises(ValueError, match=r"heads pattern\(s\) \['classifier'\] match no key"):
        named_head_keys(net, [r"^head\.", "classifier"])
    with pytest.raises(ValueError, match="not a submodule"):
        named_head_keys(net, nn.Linear(2, 2))


def test_keys_whose_shape_or_presence_differs_are_detected_in_model_order():
    base = Net(2).state_dict()
    a, b = Net(3).state_dict(), {k: v for k, v in Net(2).state_dict().items() if k != "body.bias"}
    plan = plan_merge(as_source(base), [as_source(a, "a"), as_source(b, "b")], warn=False)
    assert differing_keys(plan, list(base)) == ["body.bias", "head.weight", "head.bias"]
    # with base_keys, a model key the base lacks is a head too
    assert differing_keys(plan, [*base, "extra"], base_keys=set(base)) == [
        "body.bias", "head.weight", "head.bias", "extra"]


def test_store_reads_each_task_once_and_swaps_heads_of_another_shape_into_the_model():
    reads = []
    a = as_source({"head.weight": torch.full((3, 2), 2.0), "head.bias": torch.arange(3.0)}, "a")

    class Counting:  # the two calls the store makes of a source
        label = "a"

        def keys(self):
            return a.keys()

        def get(self, key):
            reads.append(key)
            return a.get(key)

    store = HeadStore(["head.weight", "head.bias"], {"a": Counting()})
    net = Net(2)
    store.swap_into(net, "a")
    store.swap_into(net, "a")
    assert net.head.weight.shape == (3, 2) and net.head.bias.tolist() == [0.0, 1.0, 2.0]
    assert sorted(reads) == ["head.bias", "head.weight"]  # read once, then cached
    assert list(store.buffers()) == []  # lazy store: nothing on the owner's device
    with pytest.raises(KeyError, match="unknown task 'z'"):
        store.of("z")


def test_store_as_buffers_moves_with_its_owner_and_stays_out_of_checkpoints():
    store = HeadStore(["w"], {"a": as_source({"w": torch.ones(2)}), "b": as_source({"w": torch.zeros(2)})}, as_buffers=True)
    assert store.state_dict() == {}
    store.double()
    assert store.of("a")["w"].dtype == torch.float64 and store.of("b")["w"].tolist() == [0.0, 0.0]


def test_copy_into_copies_in_place_when_shapes_agree():
    net = Net(2)
    weight = net.body.weight
    copy_into(net, {"body.weight": torch.ones(2, 2)})
    assert net.body.weight is weight and weight.detach().eq(1).all()


def test_the_module_and_the_learned_module_use_the_one_store():
    from lightning_ties.lightning import LearnedMergeModule, MultiTaskMergeModule

    base = Net(2)
    tasks = {"a": Net(3).state_dict(), "b": Net(4).state_dict()}
    module = MultiTaskMergeModule(base.state_dict(), tasks, model=Net(2), k=1.0)
    assert isinstance(module.head_store, HeadStore) and module.head_keys == ["head.bias", "head.weight"]
    module.use_task("b")
    assert module.model.head.weight.shape == (4, 2)
    data = [(torch.randn(2), torch.tensor(0)) for _ in range(4)]
    loaders = {t: torch.utils.data.DataLoader(data, batch_size=2) for t in tasks}
    learned = LearnedMergeModule(Net(2), tasks, loaders, base=base.state_dict(), k=1.0, holdout=0.0)
    assert isinstance(learned.heads, HeadStore) and learned.head_keys == ["head.weight", "head.bias"]
    assert learned.heads.of("a")["head.weight"].shape == (3, 2)


def test_the_learned_package_loads_under_both_lightning_packages():
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    from lightning_ties.lightning.learned import LearnedMergeModule as Classic
    from lightning_ties.pytorch.learned import LearnedMergeModule as Unified

    assert issubclass(Classic, pl.LightningModule) and not issubclass(Classic, lp.LightningModule)
    assert issubclass(Unified, lp.LightningModule) and not issubclass(Unified, pl.LightningModule)
