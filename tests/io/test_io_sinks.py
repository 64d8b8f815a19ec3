"""Sinks: what we write is read back by the reference readers, and failures leave nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_ties.io import (
    ShardedWriter,
    atomic_dir,
    load_into,
    open_source,
    parse_size,
    save_hf_folder,
    save_lightning_checkpoint,
    save_safetensors,
)
from lightning_ties.io.hf_folder import plan_shards
from lightning_ties.merging import TensorSpec


def read_with_safetensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


MIXED = {
    "w": torch.randn(3, 5),
    "half": torch.randn(4).to(torch.float16),
    "bf": torch.randn(2, 2).to(torch.bfloat16),
    "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def test_save_safetensors_is_read_back_exactly_by_the_safetensors_library(tmp_path):
    save_safetensors(MIXED, tmp_path / "m.safetensors", metadata={"note": "x"})
    back = read_with_safetensors(tmp_path / "m.safetensors")
    assert set(back) == set(MIXED)
    for k, v in MIXED.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["note"] == "x"
    assert "lightning_ties" in meta  # the marker that lets overwrite=True recognise our own outputs


def test_sharded_writer_accepts_tensors_in_any_order_and_respects_the_shard_size(tmp_path):
    specs = {f"t{i}": TensorSpec((10,), torch.float32) for i in range(5)}  # 40 bytes each
    shards = plan_shards(specs, max_shard_size=100)
    assert {name: list(s) for name, s in shards.items()} == {
        "model-00001-of-00003.safetensors": ["t0", "t1"],
        "model-00002-of-00003.safetensors": ["t2", "t3"],
        "model-00003-of-00003.safetensors": ["t4"],
    }
    with ShardedWriter(tmp_path, specs, max_shard_size=100) as writer:
        for i in reversed(range(5)):
            writer.write(f"t{i}", torch.full((10,), float(i)))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    for key, shard in index["weight_map"].items():
        assert torch.equal(read_with_safetensors(tmp_path / shard)[key], torch.full((10,), float(key[1:])))


@pytest.mark.parametrize("max_shard_size", [200, "1KB"])
def test_folder_layout_is_the_one_huggingface_hub_writes(tmp_path, max_shard_size):
    """Given the same state dict and shard size, save_hf_folder and huggingface_hub's
    save_torch_state_dict write the same file names, the same index and the same tensors."""
    from huggingface_hub import save_torch_state_dict

    g = torch.Generator().manual_seed(0)
    # 120 B, 400 B (over the 200 B limit: a shard of its own), 40 B, 80 B, 16 B of float16
    state = {"a": torch.randn(30, generator=g), "big": torch.randn(100, generator=g), "b": torch.randn(10, generator=g),
             "c": torch.randn(4, 5, generator=g), "half": torch.randn(8, generator=g).half()}
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(state, tmp_path / "hub", max_shard_size=max_shard_size)
    save_hf_folder(state, tmp_path / "ours", max_shard_size=max_shard_size)
    hub_files = sorted(p.name for p in (tmp_path / "hub").iterdir())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted([*hub_files, ".lightning-ties.json"])
    # 200 B: [big] alone, [a, b], [c, half] and an index; 1KB: one model.safetensors
    assert len(hub_files) == (4 if max_shard_size == 200 else 1)
    if len(hub_files) > 1:
        index = tmp_path / "ours" / "model.safetensors.index.json"
        assert json.loads(index.read_text()) == json.loads((tmp_path / "hub" / index.name).read_text())
    for name in hub_files:
        if name.endswith(".safetensors"):
            ours, hub = read_with_safetensors(tmp_path / "ours" / name), read_with_safetensors(tmp_path / "hub" / name)
            assert list(ours) == list(hub) and all(torch.equal(ours[k], hub[k]) for k in hub), name


def test_save_hf_folder_writes_a_card_and_extra_files_in_the_same_atomic_folder(tmp_path):
    """What learned coefficients need: the one card writer with extra sections, tags and metadata."""
    from huggingface_hub import ModelCard

    from lightning_ties.io import build_model_card

    card = build_model_card(
        title="Merged model (learned coefficients)", method="ties", summary="Tasks: a, b.",
        sections=[("Coefficients", "| task | l.0 |\n|---|---|\n| a | 0.500 |")],
        tags=["learned-merging-coefficients"], metadata={"learned_groups": ["l.0"]},
    )
    folder = save_hf_folder({"w": torch.ones(2)}, tmp_path / "out", card=card, extra_files={"learned_merge.json": "{}"})
    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.tags == ["merge", "lightning-ties", "ties", "learned-merging-coefficients"]
    assert loaded.data.base_model is None and loaded.data.learned_groups == ["l.0"]  # in-memory base: no base_model
    assert "## Coefficients" in loaded.text and "| a | 0.500 |" in loaded.text
    assert (folder / "learned_merge.json").read_text() == "{}"
    marker = json.loads((folder / ".lightning-ties.json").read_text())
    assert {"README.md", "learned_merge.json"} <= set(marker["files"])
    save_hf_folder({"w": torch.zeros(2)}, folder, overwrite=True, card=card)  # ours, so it may be replaced
    with pytest.raises(ValueError, match=r"extra_files: '\.\./x' must be a plain file name"):
        save_hf_folder({"w": torch.ones(2)}, tmp_path / "bad", extra_files={"../x": ""})
    assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()


def test_an_empty_state_dict_is_one_empty_safetensors_file(tmp_path):
    folder = save_hf_folder({}, tmp_path / "empty")
    assert sorted(p.name for p in folder.iterdir()) == [".lightning-ties.json", "model.safetensors"]
    assert read_with_safetensors(folder / "model.safetensors") == {}


def test_writer_refuses_a_tensor_that_does_not_fit_its_layout(tmp_path):
    with pytest.raises(ValueError, match=r"'a' is \(3,\) torch.float32, layout says \(2,\)"):
        with ShardedWriter(tmp_path, {"a": TensorSpec((2,), torch.float32)}) as writer:
            writer.write("a", torch.zeros(3))


def test_unwritten_tensor_is_an_error_not_a_file_of_zeros(tmp_path):
    with pytest.raises(ValueError, match="never written"):
        with ShardedWriter(tmp_path, {"a": TensorSpec((2,), torch.float32)}):
            pass


def test_hf_folder_loads_with_auto_model_and_copies_config(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, max_position_embeddings=8)
    model = BertModel(config)
    model.save_pretrained(tmp_path / "base")
    weights = {k: t + 0.5 for k, t in model.state_dict().items() if t.is_floating_point()}
    save_hf_folder(weights, tmp_path / "out", config_from=tmp_path / "base", max_shard_size="4KB")
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    for k, v in weights.items():
        assert torch.equal(loaded.state_dict()[k], v), k


class TinyModule:
    """Built lazily so that importing this test file does not import Lightning."""

    @staticmethod
    def cls():
        import pytorch_lightning as pl

        class Net(pl.LightningModule):
            def __init__(self, width: int = 3):
                super().__init__()
                self.save_hyperparameters()
                self.model = nn.Linear(width, 2)

        return Net


def test_lightning_checkpoint_loads_with_load_from_checkpoint(tmp_path):
    net_cls = TinyModule.cls()
    weights = {"weight": torch.randn(2, 4), "bias": torch.randn(2)}
    save_lightning_checkpoint(weights, tmp_path / "m.ckpt", hyper_parameters={"width": 4}, prefix="model.")
    loaded = net_cls.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams.width == 4
    assert torch.equal(loaded.model.weight, weights["weight"]) and torch.equal(loaded.model.bias, weights["bias"])
    assert set(torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]) == {"model.weight", "model.bias"}


def test_a_failing_write_leaves_no_output_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    save_hf_folder({"w": torch.ones(2)}, tmp_path / "folder")

    class Boom(RuntimeError):
        pass

    def explode(*_args, **_kwargs):
        raise Boom("disk on fire")

    monkeypatch.setattr("lightning_ties.io.safetensors_file.SafetensorsWriter.write", explode)
    with pytest.raises(Boom):
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(Boom):
        save_hf_folder({"w": torch.zeros(2)}, tmp_path / "folder", overwrite=True)
    with pytest.raises(Boom):
        save_hf_folder({"w": torch.zeros(2)}, tmp_path / "new_folder")
    monkeypatch.undo()
    assert torch.equal(open_source(tmp_path / "m.safetensors").get("w"), torch.ones(2))
    assert torch.equal(open_source(tmp_path / "folder").get("w"), torch.ones(2))
    # no temporaries left; the manifest records m.safetensors as ours
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lightning-ties.json", "folder", "m.safetensors"]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    save_hf_folder({"w": torch.ones(2)}, tmp_path / "folder")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_folder({"w": torch.zeros(2)}, tmp_path / "folder")
    save_hf_folder({"w": torch.zeros(2)}, tmp_path / "folder", overwrite=True)
    assert torch.equal(open_source(tmp_path / "folder").get("w"), torch.zeros(2))


def test_atomic_dir_swaps_only_on_success(tmp_path):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("2")
            raise KeyError("stop")
    assert (tmp_path / "d" / "a").read_text() == "1"


def test_load_into_reports_keys_and_is_strict_by_default():
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"(?s)missing from the weights: \['bias'\].*not in the module: \['extra'\]"):
        load_into(net, {"weight": torch.ones(1, 2), "extra": torch.zeros(1)})
    report = load_into(net, {"weight": torch.ones(1, 2), "extra": torch.zeros(1)}, strict=False)
    assert (report.loaded, report.missing, report.unexpected) == (["weight"], ["bias"], ["extra"])
    assert torch.equal(net.weight, torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"shapes differ: \['weight: module \(1, 2\) vs \(2, 2\)'\]"):
        load_into(net, {"weight": torch.ones(2, 2), "bias": torch.zeros(1)})


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5 MiB") == 3 * 2**19 and parse_size(7) == 7
    assert parse_size("2.5 kb") == 2500 and parse_size("1TB") == 10**12 and parse_size("64") == parse_size("64B") == 64
    for bad in ("lots", "0GB", "-1GB", "5 XB", -3, True, 2.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)
