"""Outputs whose parent folders do not exist are created (as mkdir -p), then written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

from lightning_ties.cli import main
from lightning_ties.io import merge_lora_adapters, merge_to


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"w": torch.zeros(3, 4)}
    save_file(base, "base.safetensors")
    save_file({"w": torch.arange(12.0).view(3, 4)}, "ft.safetensors")
    return tmp_path


@pytest.mark.parametrize("output", ["a/b/merged", "a/b/merged.safetensors", "a/b/merged.ckpt"])
def test_merge_to_creates_missing_parents(inputs, output):
    merge_to(output, "base.safetensors", ["ft.safetensors"], "task_arithmetic", lam=1.0, progress=False)
    assert Path(output).exists() and sorted(p.name for p in Path("a").iterdir()) == ["b"]


def test_a_refused_merge_creates_no_folder(inputs):
    with pytest.raises(ValueError):
        merge_to("a/b/merged", "base.safetensors", [], progress=False)
    assert not Path("a").exists()


@pytest.mark.parametrize("output", ["new/deeper/merged.safetensors", "new/deeper/folder"])
def test_the_command_creates_missing_parents_of_the_output_and_its_config(inputs, output):
    config = Path("merge.yaml")
    config.write_text("base: base.safetensors\nmodels: [ft.safetensors]\nmethod: task_arithmetic\n")
    assert main(["merge", str(config), f"output={output}", "--quiet"]) == 0
    assert Path(output).exists()
    sidecar = Path(output + ".config.yaml") if output.endswith(".safetensors") else Path(output) / "config.yaml"
    assert sidecar.is_file()


def test_merge_lora_adapters_creates_missing_parents(tmp_path):
    def tiny_bert() -> BertModel:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, max_position_embeddings=8))

    folders = [tmp_path / "a1", tmp_path / "a2"]
    for seed, folder in enumerate(folders, start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(init_lora_weights=False, r=2, lora_alpha=4, target_modules=["query"])
        get_peft_model(tiny_bert(), lora).save_pretrained(folder)
    base = {k: v.detach().clone() for k, v in tiny_bert().state_dict().items()}
    merge_lora_adapters(tmp_path / "x" / "y" / "merged", base, folders, "task_arithmetic", lam=0.5)
    assert "lora_A" in " ".join(load_file(tmp_path / "x" / "y" / "merged" / "adapter_model.safetensors"))
