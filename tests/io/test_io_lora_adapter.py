"""A merged LoRA *adapter* from LoRA adapters: PEFT loads it, and it is the full-model merge.

The oracle is the engine's full-model merge of the same adapter folders, restricted to the
target weights (``merge(base, adapters, method, include=<targets>)``); the merged adapter is
loaded with ``PeftModel.from_pretrained`` and read back through PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM,
)

import lightning_ties
from lightning_ties import merge
from lightning_ties.io import CheckpointError, LoraSource, merge_lora_adapters, open_source
from lightning_ties.merging import StateDictSource


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )
    return BertModel(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def save_adapter(make_model, folder, seed: int, **lora) -> None:
    """A LoRA adapter with random A and B (so that its update is not zero), saved with save_pretrained."""
    model = make_model()
    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(folder)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loaded_weights(make_model, folder) -> dict[str, torch.Tensor]:
    """The weights PEFT gives the base with the merged adapter applied."""
    return state(PeftModel.from_pretrained(make_model(), folder).merge_and_unload())


def target_patterns(adapter, base) -> list[str]:
    """``include`` for the oracle: exactly the weights the adapter updates."""
    return [re.escape(k) + "$" for k in LoraSource(adapter, StateDictSource(base)).targets]


@pytest.fixture
def bert_adapters(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    folders = [tmp_path / "a1", tmp_path / "a2", tmp_path / "a3"]
    for seed, folder in enumerate(folders, start=1):
        save_adapter(tiny_bert, folder, seed, **lora)
    return folders


def test_full_rank_ties_adapter_loads_in_peft_and_equals_the_full_model_merge(tmp_path, bert_adapters):
    base = state(tiny_bert())
    include = target_patterns(bert_adapters[0], base)
    report = merge_lora_adapters(tmp_path / "merged", base, bert_adapters, "ties", lam=0.8, k=0.3, rank=64)
    expected = merge(base, bert_adapters, "ties", lam=0.8, include=include, k=0.3)
    got = loaded_weights(tiny_bert, tmp_path / "merged")
    for key, value in base.items():
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-6, msg=key)
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == set(report.ranks) and len(changed) == 2 * 5 + 1  # per layer q, v and three dense; the pooler
    assert all(r == min(base[k].shape) for k, r in report.ranks.items())  # rank 64 capped by each matrix
    assert report.factorization == "svd" and report.error < 1e-6
    assert report.merge is not None and report.merge.thresholds  # the global trim ran over the targets
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 16, False)


# the oracle reads PEFT's copy of the embedding (embed_tokens.base_layer.weight) as a key base lacks
@pytest.mark.filterwarnings(r"ignore:1 key\(s\) differ across models")
def test_low_rank_adapter_reports_the_error_measured_on_what_peft_loads(tmp_path):
    base = state(tiny_llama())
    lora = dict(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "embed_tokens"])
    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, folder in enumerate(folders, start=1):
        save_adapter(tiny_llama, folder, seed, **lora)
    report = merge_lora_adapters(tmp_path / "merged", base, folders, "ties", lam=1.0, k=0.5, scope="per_tensor")
    expected = merge(base, folders, "ties", lam=1.0, include=target_patterns(folders[0], base), k=0.5, scope="per_tensor")
    got = loaded_weights(tiny_llama, tmp_path / "merged")

    lost = total = 0.0
    for key, rank in report.ranks.items():
        wanted, written = expected[key] - base[key], got[key] - base[key]
        miss, norm = torch.linalg.matrix_norm(wanted - written).item(), torch.linalg.matrix_norm(wanted).item()
        assert report.errors[key] == pytest.approx(miss / norm, rel=1e-3, abs=1e-6), key
        assert rank == min(12, *base[key].shape)  # the sum of the ranks, capped: k_proj is 8 x 16
        s = torch.linalg.svdvals(wanted.double())
        assert miss / norm == pytest.approx((s[rank:].norm() / s.norm()).item(), rel=1e-3, abs=1e-6)  # Eckart-Young
        lost, total = lost + miss**2, total + norm**2
    assert report.error == pytest.approx((lost / total) ** 0.5, rel=1e-3)
    q = [k for k in report.ranks if "q_proj" in k]
    assert min(report.errors[k] for k in q) > 0.01  # truncated for real (a TIES tau_m is not low rank)
    assert max(report.errors[k] for k in report.ranks if "k_proj" in k) < 1e-5  # full rank: exact
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) | {config["r"]} == {8, 12}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert "relative error" in str(report) and "r=12 (ranks 8-12)" in str(report)


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_linear_merges_stack_the_factors_exactly(tmp_path, method):
    base = state(tiny_bert())
    configs = [
        dict(r=2, lora_alpha=8, target_modules=["query", "value"]),
        dict(r=3, lora_alpha=4, use_rslora=True, target_modules=["query", "value"], rank_pattern={"value": 1}),
    ]
    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, (folder, lora) in enumerate(zip(folders, configs), start=1):
        save_adapter(tiny_bert, folder, seed, **lora)
    report = merge_lora_adapters(tmp_path / "merged", base, folders, method, lam=0.7 if method == "task_arithmetic" else None)
    expected = merge(base, folders, method, 0.7 if method == "task_arithmetic" else None, include=target_patterns(folders[0], base))
    got = loaded_weights(tiny_bert, tmp_path / "merged")
    for key, value in base.items():
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert report.factorization == "concat" and report.merge is None and report.error < 1e-6
    assert report.ranks == {k: 5 if "query" in k else 3 for k in report.ranks}  # 2 + 3; 2 + 1 (rank_pattern)


def test_concat_is_refused_for_a_method_that_is_not_linear(tmp_path, bert_adapters):
    with pytest.raises(ValueError, match=r"factorization='concat'.*exact only for linear methods.*'ties'.*use 'svd'"):
        merge_lora_adapters(tmp_path / "out", state(tiny_bert()), bert_adapters, "ties", factorization="concat")
    with pytest.raises(ValueError, match=r"rank must be a positive integer"):
        merge_lora_adapters(tmp_path / "out", state(tiny_bert()), bert_adapters, rank=0)
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_bases_or_targets_are_refused_before_any_output(tmp_path, bert_adapters):
    other = tmp_path / "other"
    save_adapter(tiny_bert, other, 9, r=4, target_modules=["query"])
    config_path = bert_adapters[1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    json_0 = bert_adapters[0] / "adapter_config.json"
    json_0.write_text(json.dumps({**json.loads(json_0.read_text()), "base_model_name_or_path": "org/bert-tiny"}))
    with pytest.raises(CheckpointError, match=r"(?s)different bases.*'org/bert-tiny'.*'org/other-model'.*a3.*targets other modules.*value"):
        merge_lora_adapters(tmp_path / "out", state(tiny_bert()), [*bert_adapters, other], rank=4)
    assert not (tmp_path / "out").exists()


def test_non_lora_inputs_and_saved_modules_are_refused(tmp_path, bert_adapters):
    base = state(tiny_bert())
    tiny_bert().save_pretrained(tmp_path / "full")
    with pytest.raises(CheckpointError, match=r"full: not a PEFT adapter folder.*Merge full models with merge_to"):
        merge_lora_adapters(tmp_path / "out", base, [bert_adapters[0], tmp_path / "full"])
    ia3 = json.loads((bert_adapters[1] / "adapter_config.json").read_text())
    (bert_adapters[1] / "adapter_config.json").write_text(json.dumps({**ia3, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match=r"peft_type is 'IA3'; only LoRA adapters"):
        merge_lora_adapters(tmp_path / "out", base, bert_adapters)

    torch.manual_seed(0)
    classifier = BertForSequenceClassification(tiny_bert().config)
    classifier_base = state(classifier)
    saved = tmp_path / "with_head"
    get_peft_model(classifier, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])).save_pretrained(saved)
    with pytest.raises(CheckpointError, match=r"with_head saves full modules besides its LoRA factors \(classifier.*merge_to"):
        merge_lora_adapters(tmp_path / "out", classifier_base, [saved, saved])
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_if_it_is_ours(tmp_path, bert_adapters):
    base = state(tiny_bert())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"foreign already exists and was not written by lightning-ties"):
        merge_lora_adapters(foreign, base, bert_adapters)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"is the input|contains the input|inside the input"):
        merge_lora_adapters(bert_adapters[0], base, bert_adapters)

    out = tmp_path / "merged"
    first = merge_lora_adapters(out, base, bert_adapters, rank=2)
    with pytest.raises(FileExistsError, match=r"pass overwrite=True"):
        merge_lora_adapters(out, base, bert_adapters, rank=2)
    second = merge_lora_adapters(out, base, bert_adapters, rank=4, overwrite=True)
    assert (first.rank, second.rank) == (2, 4)
    assert sorted(p.name for p in out.iterdir()) == [".lightning-ties.json", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert open_source(out / "adapter_model.safetensors").spec(
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    ).shape == (4, 16)


def test_fan_in_fan_out_conv1d_adapters_are_factored_in_peft_layout(tmp_path):
    def gpt2() -> GPT2Model:
        torch.manual_seed(0)
        return GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=8))

    base = state(gpt2())
    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, folder in enumerate(folders, start=1):
        save_adapter(gpt2, folder, seed, r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    report = merge_lora_adapters(tmp_path / "merged", base, folders, "ties", k=0.4, scope="per_tensor", rank=48)
    expected = merge(base, folders, "ties", include=target_patterns(folders[0], base), k=0.4, scope="per_tensor")
    got = loaded_weights(gpt2, tmp_path / "merged")
    for key, value in base.items():
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-6, msg=key)
    assert report.ranks == {"h.0.attn.c_attn.weight": 16, "h.0.attn.c_proj.weight": 16, "h.0.mlp.c_proj.weight": 16}
    assert lightning_ties.merge_lora_adapters is merge_lora_adapters  # reachable from the top level


def test_randomized_svd_of_wide_matrices_is_near_optimal_and_reported_as_measured(tmp_path):
    def bert64() -> BertModel:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=30, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=128, max_position_embeddings=8))

    base = state(bert64())
    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, folder in enumerate(folders, start=1):
        save_adapter(bert64, folder, seed, r=2, target_modules=["query", "value"])
    # rank 4 on 64 x 64: 4 * (4 + 10) <= 64, so "svd" takes the randomized path
    fast = merge_lora_adapters(tmp_path / "fast", base, folders, "ties", k=0.2, rank=4, factorization="svd")
    exact = merge_lora_adapters(tmp_path / "exact", base, folders, "ties", k=0.2, rank=4, factorization="exact_svd")
    got = loaded_weights(bert64, tmp_path / "fast")
    expected = merge(base, folders, "ties", include=target_patterns(folders[0], base), k=0.2)
    for key in fast.ranks:
        wanted = expected[key] - base[key]
        measured = (torch.linalg.matrix_norm(wanted - (got[key] - base[key])) / torch.linalg.matrix_norm(wanted)).item()
        assert fast.errors[key] == pytest.approx(measured, rel=1e-3), key
        assert exact.errors[key] * (1 - 1e-5) <= fast.errors[key] <= exact.errors[key] * 1.01, key
    assert fast.factorization == "svd" and exact.factorization == "exact_svd" and fast.rank == 4
    assert fast.errors != exact.errors  # two different computations (same to ~1e-5 here)
    again = merge_lora_adapters(tmp_path / "again", base, folders, "ties", k=0.2, rank=4)
    assert again.errors == fast.errors  # seeded: the same adapter every time


def test_bf16_adapters_give_bf16_factors_and_the_error_counts_their_rounding(tmp_path):
    base = state(tiny_bert())
    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, folder in enumerate(folders, start=1):
        save_adapter(tiny_bert, folder, seed, r=2, target_modules=["query"])
        weights = folder / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, {"format": "pt"})
    # lam=0.7: scaling the factors rounds in bf16 (lam=1 with scaling 8/2 would be exact)
    report = merge_lora_adapters(tmp_path / "merged", base, folders, "task_arithmetic", lam=0.7)
    written = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert 1e-4 < report.error < 1e-2  # exact in float32; bf16 keeps ~3 significant digits of B and A
    got = loaded_weights(tiny_bert, tmp_path / "merged")
    expected = merge(base, folders, "task_arithmetic", 0.7, include=target_patterns(folders[0], base))
    for key in report.ranks:
        wanted, written_update = expected[key] - base[key], got[key] - base[key]
        measured = (torch.linalg.matrix_norm(wanted - written_update) / torch.linalg.matrix_norm(wanted)).item()
        assert report.errors[key] == pytest.approx(measured, rel=1e-2), key
