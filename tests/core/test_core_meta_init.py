"""Models built without their weights (``model=`` a factory): parameters on the meta device, filled from the base.

Given a factory instead of a module, when the merger builds it, then its parameters hold no memory while its
buffers keep the constructor's values (position ids, rotary tables) and tied weights stay tied; once it runs, it
gets the base's values (the keys the merge leaves alone too) and every merge, task's weights and head equal those
of the same model built with its weights, bit for bit. What nothing would fill (a key the base lacks, a
non-persistent buffer on the meta device) is refused at construction, naming the keys. Under FSDP2 each rank
fills only its rows: tests/lightning/test_lightning_sharded_module.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties.core.merger import Merger
from lightning_ties.core.meta_init import (
    build_on_meta,
    check_fillable,
    fill_from_base,
    is_on_meta,
    parameters_on_meta,
)
from lightning_ties.merging import as_source

transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    """Blocks, a head, a persistent buffer (running statistics) and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 5)])
        self.norm = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)
        self.register_buffer("scale", torch.arange(1.0, 6.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(self.norm(x) * self.scale)


def _checkpoints() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base unlike ``Net()``'s initial weights (so a value left from the constructor would show) and two tasks."""
    g = torch.Generator().manual_seed(7)
    base = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
            for k, v in Net().state_dict().items()}
    base["norm.running_var"] = base["norm.running_var"].abs() + 0.5
    tasks = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()} for t in ("a", "b")}
    return base, tasks


def _built(base: dict[str, torch.Tensor]) -> Net:
    net = Net()
    net.load_state_dict(base)
    return net


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(a.scale, b.scale)


def _loaders() -> dict[str, list[DataLoader]]:
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    return {t: [DataLoader(TensorDataset(x, x[:, i : i + 3].argmax(1)), batch_size=4)] for i, t in enumerate("ab")}


def test_parameters_go_to_the_meta_device_and_buffers_keep_the_constructors_values() -> None:
    with parameters_on_meta():
        net = Net()
    assert all(p.is_meta for p in net.parameters())
    assert not any(b.is_meta for b in net.buffers())
    assert torch.equal(net.scale, Net().scale) and torch.equal(net.norm.running_var, torch.ones(5))
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # only inside the block


def test_hugging_face_models_keep_their_non_persistent_buffers_and_tied_weights() -> None:
    bert_config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=16, max_position_embeddings=16)
    llama_config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    for cls, config in ((transformers.BertForSequenceClassification, bert_config),
                        (transformers.LlamaForCausalLM, llama_config)):
        plain, on_meta = cls(config), build_on_meta(lambda: cls(config))  # noqa: B023
        assert all(p.is_meta for p in on_meta.parameters()), cls.__name__
        built = dict(plain.named_buffers())
        for name, buffer in on_meta.named_buffers():  # position ids, token types, rotary inverse frequencies
            assert torch.equal(buffer, built[name]), name
    assert on_meta.lm_head.weight is on_meta.model.embed_tokens.weight  # tied: one parameter, as built
    one_name = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"}  # as tied checkpoints are saved
    check_fillable(on_meta, as_source(one_name, "base"))
    fill_from_base(on_meta, as_source(one_name, "base"), torch.device("cpu"))
    assert on_meta.lm_head.weight is on_meta.model.embed_tokens.weight  # still one once filled
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_meta.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def test_a_parameter_registered_under_two_names_stays_one() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Parameter(torch.zeros(3))
            self.a, self.b = shared, shared

    twice = build_on_meta(Twice)
    assert twice.a.is_meta and twice.a is twice.b
    fill_from_base(twice, as_source({"a": torch.ones(3)}, "base"), torch.device("cpu"))
    assert twice.a is twice.b and torch.equal(twice.b, torch.ones(3))


@pytest.mark.parametrize("method", ["ties", "tsv"])
def test_a_factorys_model_merges_as_the_model_built_with_its_weights(method) -> None:
    base, tasks = _checkpoints()
    lazy = Merger(base, tasks, model=Net, heads=r"^head\.", method=method, exclude=r"^blocks\.0\.bias$")
    built = Merger(base, tasks, model=_built(base), heads=r"^head\.", method=method, exclude=r"^blocks\.0\.bias$")
    assert is_on_meta(lazy.model) and all(p.is_meta for p in lazy.model.parameters())
    for merger in (lazy, built):
        merger.apply_merge(k=0.3, lam=0.9)
        merger.use_task("b")
    assert not is_on_meta(lazy.model)
    _assert_same_state(lazy.model, built.model)
    assert torch.equal(lazy.model.blocks[0].bias, base["blocks.0.bias"])  # left alone by the merge: the base's
    for merger in (lazy, built):
        merger.load_task("a")
    _assert_same_state(lazy.model, built.model)


def test_its_first_score_fills_it_on_the_cpu() -> None:
    base, tasks = _checkpoints()
    lazy, built = Merger(base, tasks, model=Net), Merger(base, tasks, model=_built(base))
    assert lazy.score(_loaders()) == built.score(_loaders())
    assert not is_on_meta(lazy.model) and next(lazy.model.parameters()).device.type == "cpu"
    _assert_same_state(lazy.model, built.model)


def test_heads_the_base_lacks_come_from_each_task() -> None:
    base, tasks = _checkpoints()
    headless = {k: v for k, v in base.items() if not k.startswith("head.")}
    lazy = Merger(headless, tasks, model=Net, heads=r"^head\.")
    built = Merger(headless, tasks, model=_built(base), heads=r"^head\.")
    for task in ("a", "b"):
        for merger in (lazy, built):
            merger.apply_merge(k=0.5, lam=1.0)
            merger.use_task(task)
        _assert_same_state(lazy.model, built.model)
        assert torch.equal(lazy.model.head.weight, tasks[task]["head.weight"])


def test_a_buffer_shared_by_two_blocks_stays_shared_and_a_real_parameter_keeps_its_values() -> None:
    class Block(nn.Module):
        def __init__(self, mask: torch.Tensor) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("mask", mask, persistent=False)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mask = torch.tril(torch.ones(4, 4))  # one causal mask for every block
            self.blocks = nn.ModuleList([Block(mask), Block(mask)])
            with torch.device("meta"):
                self.proj = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.full((2,), 2.0), requires_grad=False)  # in no checkpoint

    plain = Shared()
    state = {k: v for k, v in plain.state_dict().items() if not k.startswith(("proj.", "scale"))}
    state.update({"proj.weight": torch.ones(2, 4), "proj.bias": torch.zeros(2)})
    built_by_user = Shared()  # partly on the meta device: proj; scale is real
    fill_from_base(built_by_user, as_source(state, "base"), torch.device("cpu"))
    assert torch.equal(built_by_user.scale, torch.full((2,), 2.0)) and torch.equal(built_by_user.proj.weight, torch.ones(2, 4))
    assert built_by_user.blocks[0].mask is built_by_user.blocks[1].mask
    assert torch.equal(built_by_user.blocks[1].mask, torch.tril(torch.ones(4, 4)))


def test_a_head_the_base_holds_in_another_shape_comes_from_each_task() -> None:
    # a pretrained 2-label head in the base, tasks with 3 labels: the model's head is each task's
    class Labels(nn.Module):
        def __init__(self, labels: int = 3) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, labels)

    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v.shape, generator=g) for k, v in Labels(2).state_dict().items()}
    tasks = {t: {k: torch.randn(v.shape, generator=g) for k, v in Labels(3).state_dict().items()} for t in "ab"}
    lazy, built = Merger(base, tasks, model=Labels, heads=r"^head\."), Merger(base, tasks, model=Labels(), heads=r"^head\.")
    for merger in (lazy, built):
        merger.apply_merge(k=0.5, lam=1.0)
        merger.use_task("b")
    for key, value in built.model.state_dict().items():
        assert torch.equal(lazy.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"other shapes: head.weight: base \(2, 4\) vs model \(3, 4\)"):
        Merger(base, {t: {k: v for k, v in s.items() if k != "head.weight"} for t, s in tasks.items()}, model=Labels)


def test_what_nothing_would_fill_is_refused_at_construction() -> None:
    base, tasks = _checkpoints()
    def without(state):
        return {k: v for k, v in state.items() if k != "blocks.1.bias"}

    with pytest.raises(ValueError, match=r"lacks 1 of its key\(s\), e.g. \['blocks.1.bias'\]"):
        Merger(without(base), {t: without(s) for t, s in tasks.items()}, model=Net)
    no_stats = {k: v for k, v in base.items() if k != "norm.running_mean"}  # a buffer keeps the constructor's value
    assert torch.equal(Merger(no_stats, tasks, model=Net).model.norm.running_mean, torch.zeros(5))
    headless = {k: v for k, v in base.items() if not k.startswith("head.")}
    one_head = {"a": tasks["a"], "b": {k: v for k, v in tasks["b"].items() if not k.startswith("head.")}}
    with pytest.raises(ValueError, match=r"e.g. \['head.weight', 'head.bias'\]"):  # a head one task lacks
        Merger(headless, one_head, model=Net, heads=r"^head\.")
    with pytest.raises(TypeError, match="returned dict; pass an nn.Module or a function of no arguments"):
        Merger(base, tasks, model=lambda: base)
    with pytest.raises(TypeError, match="model= must be an nn.Module or a function .* got str 'model.ckpt'"):
        Merger(base, tasks, model="model.ckpt")

    class ReadsItsWeights(Net):
        def __init__(self) -> None:
            super().__init__()
            self.gain = float(self.head.weight.abs().max())  # a value: nothing to read on the meta device

    with pytest.raises(RuntimeError, match="factory failed with its parameters on the meta device .* Pass the model built"):
        Merger(base, tasks, model=ReadsItsWeights)
    with torch.device("meta"):
        on_meta = Net()  # built by the user on the meta device: its non-persistent buffer has no values
    with pytest.raises(ValueError, match=r"non-persistent buffer\(s\) \['scale'\] are on the meta device"):
        Merger(base, tasks, model=on_meta)


def test_a_module_the_user_built_on_the_meta_device_is_filled_from_the_base() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5))
    base = {k: v + 1 for k, v in nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5)).state_dict().items()}
    merger = Merger(base, {t: {k: v + i for k, v in base.items()} for i, t in enumerate("ab")}, model=net)
    merger.apply_merge(k=1.0, lam=0.0)  # lam 0: the base itself
    for key, value in base.items():
        assert torch.equal(net.state_dict()[key], value), key


def test_fill_from_base_writes_every_key_the_base_holds() -> None:
    base, _ = _checkpoints()
    with parameters_on_meta():
        net = Net()
    fill_from_base(net, as_source(base, "base"), torch.device("cpu"))
    _assert_same_state(net, _built(base))
