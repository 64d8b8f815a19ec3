"""LearnedMergeResult: save("folder/") loads with AutoModel.from_pretrained; print() is a short summary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, BertConfig, BertModel

from lightning_ties.core.learned.result import LearnedMergeResult, hf_base
from lightning_ties.merging import MergeReport


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))


def result_of(model: torch.nn.Module, base_folder: str | None = None, base_model: str | None = None,
              tasks: int = 3, groups: int = 40) -> LearnedMergeResult:
    state = {k: v + 0.01 for k, v in model.state_dict().items()}
    names = [f"task{i}" for i in range(tasks)]
    history = [{"epoch": e, "task0/loss": 1.0, "loss": 0.5 - 0.1 * e, "acc": 0.8 + 0.05 * e} for e in range(3)]
    report = MergeReport("learned", {"base_method": "ties", "granularity": "layer", "objective": "ce"}, names, [], {})
    return LearnedMergeResult(state, {t: {} for t in names}, torch.linspace(0, 1, tasks * groups).view(tasks, groups),
                              names, [f"layer{j}." for j in range(groups)], history, 2, 3, 12.0, report,
                              base_folder=base_folder, base_model=base_model)


def test_save_to_a_folder_copies_the_base_config_and_loads_with_from_pretrained(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    folder, name = hf_base(str(tmp_path / "base"))
    assert folder == str(tmp_path / "base") and name == "base"
    result = result_of(model, folder, name)
    out = result.save(tmp_path / "new" / "deeper" / "merged")  # missing parents are created
    loaded = AutoModel.from_pretrained(out)
    for key, value in result.state_dict.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert ModelCard.load(out / "README.md").data.base_model == "base"


def test_a_transformers_model_loaded_from_a_folder_names_its_folder(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "base")
    loaded = AutoModel.from_pretrained(tmp_path / "base")
    assert hf_base({"w": torch.zeros(1)}, loaded) == (str(tmp_path / "base"), "base")
    assert hf_base(torch.nn.Linear(2, 2)) == (None, None)


def test_save_without_a_config_warns_how_to_fix_it(tmp_path):
    result = result_of(tiny_bert())
    with pytest.warns(UserWarning, match=r"no config.json.*from_pretrained cannot load.*config_from="):
        out = result.save(tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.ckpt"])
def test_save_creates_missing_parent_folders_of_a_file_output(tmp_path, name):
    out = result_of(tiny_bert()).save(tmp_path / "a" / "b" / name)
    assert out.is_file()


def test_print_is_a_short_summary_with_tasks_shape_and_scores():
    result = result_of(tiny_bert(), tasks=12, groups=500)
    text = str(result)
    assert text == repr(result) and len(text.splitlines()) <= 6 and len(text) < 600
    assert "over ties" in text and "12 tasks x 500 groups" in text and "and 4 more" in text
    assert "best epoch: 2 (loss=0.3, acc=0.9)" in text
