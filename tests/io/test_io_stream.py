"""merge_to: a merge from files into a folder/file/checkpoint equals the in-memory merge, bit for bit."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModel, BertConfig, BertModel

from lightning_ties import merge, ties_merge
from lightning_ties.io import SafetensorsWriter, merge_to, open_source

K = 0.3


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny BERT base folder and three fine-tuned folders (base + noise), plus their state dicts."""
    root = tmp_path_factory.mktemp("ckpts")
    model = tiny_bert()
    model.save_pretrained(root / "base")
    src = open_source(root / "base")
    base = {k: src.get(k) for k in src.keys()}
    fts = []
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        ft = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base.items()}
        folder = root / f"ft{seed}"
        folder.mkdir()
        save_file(ft, folder / "model.safetensors")
        fts.append(ft)
    return root, base, fts


def folder_state(path) -> dict[str, torch.Tensor]:
    src = open_source(path)
    return {k: src.get(k) for k in src.keys()}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_folder_merge_equals_in_memory_merge_and_loads_with_auto_model(checkpoints, tmp_path, scope):
    root, base, fts = checkpoints
    models = [root / f"ft{s}" for s in (1, 2, 3)]
    report = merge_to(tmp_path / "out", root / "base", models, k=K, scope=scope, lam=1.2, progress=False)
    expected = ties_merge(base, fts, k=K, scope=scope, lam=1.2)
    assert_same(folder_state(tmp_path / "out"), dict(expected))
    assert report.merged_keys == expected.report.merged_keys and report.lam == 1.2
    loaded = AutoModel.from_pretrained(tmp_path / "out")
    for k, v in expected.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_card_and_config_record_and_reproduce_the_recipe(checkpoints, tmp_path):
    root, _, _ = checkpoints
    models = [str(root / f"ft{s}") for s in (1, 2)]
    merge_to(tmp_path / "out", str(root / "base"), models, k=K, sign="count", lam=0.9, progress=False)
    recipe = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert recipe["method"] == {"name": "ties", "k": K, "scope": "global", "sign": "count", "merge": "mean", "lam": 0.9}
    digest = hashlib.sha256((root / "ft1" / "model.safetensors").read_bytes()).hexdigest()
    assert recipe["provenance"]["sources"]["models"][0]["files"] == {"model.safetensors": digest}
    card = (tmp_path / "out" / "README.md").read_text()
    assert digest in card and "sign='count'" in card and "lam=0.9" in card
    method = dict(recipe["method"])
    merge_to(tmp_path / "again", recipe["base"], recipe["models"], method.pop("name"), **method, progress=False)
    assert_same(folder_state(tmp_path / "again"), folder_state(tmp_path / "out"))


def test_card_is_a_hub_model_card_naming_sources_relatively_with_their_sha256(checkpoints, tmp_path):
    from huggingface_hub import ModelCard

    root, _, _ = checkpoints
    out = root.parent / f"{tmp_path.name}-out"  # beside the inputs: they are named relative to it
    merge_to(out, root / "base", [root / "ft1", str(tmp_path / ".." / root.name / "ft2")], k=K, progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == f"{root.name}/base"
    assert card.data.library_name == "lightning-ties" and card.data.tags == ["merge", "lightning-ties", "ties"]
    digest = hashlib.sha256((root / "ft1" / "model.safetensors").read_bytes()).hexdigest()
    assert card.data.sources[1] == {"role": "model", "name": f"{root.name}/ft1", "sha256": {"model.safetensors": digest}}
    assert f"| model | `{root.name}/ft1` | `model.safetensors` | `{digest}` |" in card.text
    assert card.data.sources[2]["name"] == f"{root.name}/ft2"  # "x/../y" normalised first
    text = (out / "README.md").read_text()
    assert str(root.parent) not in text and str(tmp_path) not in text  # no absolute local path
    # the recipe, which must reproduce the merge, keeps the paths as given
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["base"] == str(root / "base")


def test_sharded_inputs_merge_like_unsharded_ones_and_output_shards(checkpoints, tmp_path):
    root, base, fts = checkpoints
    sharded = []
    for i, ft in enumerate(fts):
        model = tiny_bert()
        model.load_state_dict(ft, strict=False)
        model.save_pretrained(tmp_path / f"sharded{i}", max_shard_size="20KB")
        assert (tmp_path / f"sharded{i}" / "model.safetensors.index.json").is_file()
        sharded.append(tmp_path / f"sharded{i}")
    merge_to(tmp_path / "a", root / "base", [root / f"ft{s}" for s in (1, 2, 3)], k=K, progress=False, max_shard_size="10KB")
    merge_to(tmp_path / "b", root / "base", sharded, k=K, progress=False)
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    assert_same(folder_state(tmp_path / "a"), folder_state(tmp_path / "b"))


def test_other_methods_and_single_file_output(checkpoints, tmp_path):
    root, base, fts = checkpoints
    merge_to(tmp_path / "ta.safetensors", root / "base", [root / "ft1", root / "ft2"], "task_arithmetic", lam=0.5, progress=False)
    assert_same(folder_state(tmp_path / "ta.safetensors"), dict(merge(base, fts[:2], "task_arithmetic", lam=0.5)))
    with pytest.raises(ValueError, match="has no lam to set"):
        merge_to(tmp_path / "avg", root / "base", [root / "ft1"], "average", lam=0.5)
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['density'\]"):
        merge_to(tmp_path / "x", root / "base", [root / "ft1"], density=0.2)


def test_lightning_checkpoints_in_and_out(tmp_path):
    import pytorch_lightning as pl

    class Net(pl.LightningModule):
        def __init__(self, width: int = 4):
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 2))

    base = {k: v.clone() for k, v in Net().model.state_dict().items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.items()}, "hyper_parameters": {"width": 4}}, tmp_path / "base.ckpt")
    fts = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        ft = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        torch.save({"state_dict": {f"model.{k}": v for k, v in ft.items()}}, tmp_path / f"ft{seed}.ckpt")
        fts.append(ft)
    merge_to(tmp_path / "merged.ckpt", tmp_path / "base.ckpt", [tmp_path / "ft1.ckpt", tmp_path / "ft2.ckpt"], k=0.5, progress=False)
    loaded = Net.load_from_checkpoint(tmp_path / "merged.ckpt")
    expected = ties_merge(base, fts, k=0.5)
    for k, v in expected.items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_a_merge_killed_halfway_leaves_no_output_and_keeps_the_earlier_one(checkpoints, tmp_path, monkeypatch):
    root, _, _ = checkpoints
    models = [root / "ft1", root / "ft2"]
    merge_to(tmp_path / "out", root / "base", models, k=K, progress=False)
    before = folder_state(tmp_path / "out")
    calls = {"n": 0}
    real_write = SafetensorsWriter.write

    def write_then_die(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("killed")
        real_write(self, name, tensor)

    monkeypatch.setattr("lightning_ties.io.safetensors_file.SafetensorsWriter.write", write_then_die)
    for target in ("out", "fresh"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            merge_to(tmp_path / target, root / "base", models, k=0.5, progress=False, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "fresh").exists()
    assert_same(folder_state(tmp_path / "out"), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_bar_only_when_asked(checkpoints, tmp_path, capsys):
    root, _, _ = checkpoints
    merge_to(tmp_path / "quiet.safetensors", root / "base", [root / "ft1"], k=K, progress=False)
    assert "merging" not in capsys.readouterr().err
    merge_to(tmp_path / "auto.safetensors", root / "base", [root / "ft1"], k=K)  # stderr is not a terminal here
    assert "merging" not in capsys.readouterr().err
    merge_to(tmp_path / "loud.safetensors", root / "base", [root / "ft1"], k=K, progress=True)
    assert "merging" in capsys.readouterr().err
