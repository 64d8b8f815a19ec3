"""File sources: every format opens lazily, reads back what was saved, and fails with the file's name."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from lightning_ties import CheckpointError, open_source, ties_merge
from lightning_ties.io import CommonRowsSource, MergeInputError, check_compatible, merge_to
from lightning_ties.merging import StateDictSource


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config)


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale if v.is_floating_point() else v.clone() for k, v in state.items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def read_all(path: Path | str, **kw) -> dict[str, torch.Tensor]:
    src = open_source(path, **kw)
    return {k: src.get(k) for k in src.keys()}


# ---- formats ---------------------------------------------------------------------------------
def test_safetensors_file_reads_specs_from_header_and_values_on_demand(tmp_path):
    state = {"w": torch.randn(3, 4), "h": torch.randn(2).to(torch.bfloat16), "n": torch.tensor(7), "m": torch.tensor([True, False])}
    save_file(state, tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    assert src.spec("w").shape == (3, 4) and src.spec("h").dtype == torch.bfloat16
    assert src.spec("n").shape == () and src.spec("m").dtype == torch.bool
    same_tensors(read_all(tmp_path / "m.safetensors"), state)


def test_sharded_hf_folder_reads_the_same_as_the_unsharded_one(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) >= 2
    single, sharded = read_all(tmp_path / "single"), read_all(tmp_path / "sharded")
    same_tensors(single, sharded)
    same_tensors(read_all(tmp_path / "sharded" / "model.safetensors.index.json"), single)


def test_pytorch_model_bin_folder_single_and_sharded(tmp_path):
    state = tiny_bert().state_dict()
    (tmp_path / "single").mkdir()
    torch.save(state, tmp_path / "single" / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    same_tensors(read_all(tmp_path / "single"), dict(state))
    same_tensors(read_all(sharded), dict(state))


def test_plain_state_dict_files_keep_their_keys(tmp_path):
    state = {"model.a": torch.ones(2), "model.b": torch.zeros(3)}
    for suffix in (".pt", ".pth", ".bin"):
        torch.save(state, tmp_path / f"sd{suffix}")
        assert sorted(open_source(tmp_path / f"sd{suffix}").keys()) == ["model.a", "model.b"]


def test_lightning_checkpoint_keeps_its_keys_unless_a_prefix_is_given_or_auto(tmp_path):
    sd = {"model.enc.weight": torch.ones(2, 2), "model.enc.bias": torch.zeros(2)}
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, tmp_path / "run.ckpt")
    kept = open_source(tmp_path / "run.ckpt")
    assert sorted(kept.keys()) == ["model.enc.bias", "model.enc.weight"] and kept.prefix == ""
    assert kept.hyper_parameters == {"lr": 0.1}
    detected = open_source(tmp_path / "run.ckpt", prefix="auto")
    assert sorted(detected.keys()) == ["enc.bias", "enc.weight"] and detected.prefix == "model."
    assert sorted(open_source(tmp_path / "run.ckpt", prefix="").keys()) == ["model.enc.bias", "model.enc.weight"]
    assert sorted(open_source(tmp_path / "run.ckpt", prefix="model.enc.").keys()) == ["bias", "weight"]
    with pytest.raises(CheckpointError, match=r"run\.ckpt.*no key starts with prefix 'net\.'.*'model\.'"):
        open_source(tmp_path / "run.ckpt", prefix="net.")


def test_checkpoint_with_two_attributes_keeps_keys(tmp_path):
    sd = {"backbone.w": torch.ones(2), "head.w": torch.zeros(1)}
    torch.save({"state_dict": sd}, tmp_path / "two.ckpt")
    assert sorted(open_source(tmp_path / "two.ckpt").keys()) == ["backbone.w", "head.w"]
    assert sorted(open_source(tmp_path / "two.ckpt", prefix="auto").keys()) == ["backbone.w", "head.w"]


# ---- safety and broken files ------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it writes the marker file named in its argument."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_planted_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    for path in (tmp_path / "evil.pt",):
        with pytest.raises(CheckpointError, match=r"evil\.pt.*refused.*trust_pickle=True"):
            open_source(path)
        with pytest.raises(CheckpointError):
            ties_merge({"w": torch.zeros(2)}, [path])
    assert not marker.exists()
    # The payload is real: opting in runs it (and the file then is not a state dict).
    with pytest.raises(CheckpointError, match="not a state dict"):
        open_source(tmp_path / "evil.pt", trust_pickle=True)
    assert marker.read_text() == "pwned"


def test_truncated_safetensors_names_the_file(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated file"):
        open_source(tmp_path / "cut.safetensors")


def test_corrupt_safetensors_header_names_the_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: corrupt safetensors header"):
        open_source(tmp_path / "junk.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"short\.safetensors: not a safetensors file"):
        open_source(tmp_path / "short.safetensors")


def test_truncated_torch_file_and_missing_paths_name_the_file(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or truncated"):
        open_source(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"nothere\.safetensors: no such file"):
        open_source(tmp_path / "nothere.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir: not a model folder"):
        open_source(tmp_path / "empty_dir")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format"):
        open_source(tmp_path / "x.onnx")


def test_missing_shard_of_an_index_is_named(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard file\(s\) missing: .*{victim.name}"):
        open_source(tmp_path / "m")


# ---- the engine takes paths -------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_merge_from_files_equals_in_memory_bit_for_bit(tmp_path, scope):
    base = dict(tiny_bert().state_dict())
    fts = [perturbed(base, s) for s in (1, 2, 3)]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, ft in enumerate(fts):
        torch.save({"state_dict": {f"model.{k}": v for k, v in ft.items()}}, tmp_path / f"ft{i}.ckpt")
        paths.append(tmp_path / f"ft{i}.ckpt")
    # a .ckpt keeps its "model." keys as saved: strip them to match the base's
    from_files = ties_merge(str(tmp_path / "base.safetensors"), [open_source(p, prefix="model.") for p in paths], k=0.2, scope=scope)
    in_memory = ties_merge(base, fts, k=0.2, scope=scope)
    same_tensors(dict(from_files), dict(in_memory))


# ---- validation -------------------------------------------------------------------------------
def test_mismatch_error_lists_every_bad_key_before_any_read(tmp_path):
    base = {"emb": torch.zeros(10, 4), "w": torch.zeros(3), "v": torch.zeros(2), "step": torch.tensor(1)}
    ft_a = {"emb": torch.ones(11, 4), "w": torch.ones(3), "v": torch.ones(2), "step": torch.tensor(2)}
    ft_b = {"emb": torch.ones(10, 4), "w": torch.ones(4), "v": torch.ones(2, dtype=torch.int64)}
    for name, sd in {"base": base, "a": ft_a, "b": ft_b}.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
    with pytest.raises(MergeInputError) as info:
        merge_to(tmp_path / "out", tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], progress=False)
    msg = str(info.value)
    assert msg.startswith("3 key(s) cannot be merged")
    assert "emb: base (10, 4) vs " + str(tmp_path / "a.safetensors") + " (11, 4): row counts differ" in msg
    assert "common_rows=True" in msg
    assert "w: base (3,) vs " + str(tmp_path / "b.safetensors") + " (4,)" in msg
    assert "v: " + str(tmp_path / "b.safetensors") + " stores it as torch.int64" in msg
    assert not (tmp_path / "out").exists()


def test_missing_key_is_listed_and_exclude_or_on_mismatch_base_lets_it_through(tmp_path):
    base = StateDictSource({"w": torch.zeros(2), "head": torch.zeros(3)}, "base")
    ft = StateDictSource({"w": torch.ones(2)}, "ft.ckpt")
    with pytest.raises(MergeInputError, match=r"head: missing from ft\.ckpt"):
        check_compatible(base, [ft])
    check_compatible(base, [ft], exclude="head")
    with pytest.warns(UserWarning, match="head"):
        merge_to(tmp_path / "o.safetensors", base, [ft], on_mismatch="base", progress=False)
    assert torch.equal(open_source(tmp_path / "o.safetensors").get("head"), torch.zeros(3))


def test_common_rows_merges_the_shared_rows_and_keeps_base_shape(tmp_path):
    base = {"emb": torch.zeros(4, 2), "w": torch.zeros(2)}
    longer = {"emb": torch.arange(10.0).reshape(5, 2), "w": torch.ones(2)}  # one extra token
    shorter = {"emb": -torch.ones(3, 2), "w": torch.ones(2)}  # one token fewer
    sources = [CommonRowsSource(StateDictSource(m, f"m{i}"), StateDictSource(base)) for i, m in enumerate((longer, shorter))]
    assert sources[0].aligned == ["emb"] and sources[1].spec("emb").shape == (4, 2)
    merged = merge_to(tmp_path / "o.safetensors", base, [longer, shorter], "task_arithmetic", lam=1.0, common_rows=True, progress=False)
    assert merged.merged_keys == ["emb", "w"]
    emb = open_source(tmp_path / "o.safetensors").get("emb")
    # rows 0..2: both models; row 3: only the longer one (the shorter one's task vector is 0 there)
    expected = torch.arange(8.0).reshape(4, 2) + torch.tensor([[-1.0], [-1.0], [-1.0], [0.0]])
    assert torch.equal(emb, expected)
