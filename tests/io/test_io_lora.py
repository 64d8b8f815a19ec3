"""LoRA adapter folders as task vectors; PEFT's merge_and_unload() is the oracle."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2Model

from lightning_ties import ties_merge
from lightning_ties.io import CheckpointError, LoraSource, open_source
from lightning_ties.merging import StateDictSource


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3,
    )
    return BertForSequenceClassification(config)


def adapt(model, folder, seed: int, **lora):
    """Wrap ``model`` with a LoRA adapter with random (non-zero) A and B, save it, return merged weights."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # "train" the saved copies of modules_to_save, so that they differ from base
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_classifier(seed).state_dict().items()}


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"]),
        dict(
            r=4, lora_alpha=16, use_rslora=True, target_modules=["query", "key", "dense"],
            rank_pattern={"key": 2}, alpha_pattern={"query": 3},
        ),
    ],
    ids=["embedding+modules_to_save", "rslora+patterns"],
)
def test_lora_task_vector_equals_merge_and_unload_minus_base(tmp_path, lora):
    base = base_state()
    expected = adapt(tiny_classifier(), tmp_path / "adapter", seed=1, **lora)
    source = open_source(tmp_path / "adapter", base=base)
    assert isinstance(source, LoraSource) and source.targets
    for key, value in base.items():
        got = source.get(key)
        assert got.shape == value.shape
        torch.testing.assert_close(got - value, expected[key] - value, rtol=0, atol=1e-6, msg=key)
    changed = {k for k in base if not torch.equal(expected[k], base[k])}
    assert changed == set(source.targets) | ({"classifier.weight", "classifier.bias"} if "modules_to_save" in lora else set())


def test_fan_in_fan_out_conv1d_adapter(tmp_path):
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=8))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    expected = adapt(model, tmp_path / "adapter", seed=2, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    source = open_source(tmp_path / "adapter", base=base)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"]
    for key in source.targets:
        torch.testing.assert_close(source.get(key), expected[key], rtol=0, atol=1e-6)


def test_ties_merge_of_adapter_folders_equals_merge_of_merged_models(tmp_path):
    base = base_state()
    tmp_path.joinpath("base").mkdir()
    tiny_classifier().save_pretrained(tmp_path / "base")
    merged = []
    for seed in (1, 2):
        merged.append(adapt(tiny_classifier(), tmp_path / f"a{seed}", seed=seed, r=2, target_modules=["query", "value"]))
    from_adapters = ties_merge(str(tmp_path / "base"), [tmp_path / "a1", tmp_path / "a2"], k=0.5)
    from_full = ties_merge(base, merged, k=0.5)
    for key, value in from_full.items():
        torch.testing.assert_close(from_adapters[key], value, rtol=0, atol=1e-6, msg=key)
    assert len(from_adapters.report.merged_keys) == len(from_full.report.merged_keys)


def test_adapter_needs_a_base_and_refuses_dora(tmp_path):
    adapt(tiny_classifier(), tmp_path / "adapter", seed=1, r=2, target_modules=["query"])
    with pytest.raises(CheckpointError, match=r"adapter: a LoRA adapter needs its base model"):
        open_source(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"use_dora is set.*merge_and_unload"):
        open_source(tmp_path / "adapter", base=base_state())


def test_adapter_that_does_not_fit_the_base_lists_the_modules(tmp_path):
    adapt(tiny_classifier(), tmp_path / "adapter", seed=1, r=2, target_modules=["query"])
    wrong = StateDictSource({k: v for k, v in base_state().items() if "query" not in k}, "other base")
    with pytest.raises(CheckpointError, match=r"(?s)adapter does not fit its base model:.*layer\.0\.attention\.self\.query\.weight: no matching key.*layer\.1"):
        open_source(tmp_path / "adapter", base=wrong)
