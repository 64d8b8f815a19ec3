"""Clear, early errors (issue 18): JSON nesting bombs in every reader, config type errors naming the
key, search grids too large to be meant. Every test here fails on the code before issue 18.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_ties.cli import main
from lightning_ties.config import ConfigError, SearchConfig, load_config
from lightning_ties.io import CheckpointError, TaskVectorStore, open_source

DEPTHS = [100, 100_000]  # past the bound; past Python's recursion limit


def bomb(depth: int) -> str:
    return "[" * depth + "]" * depth


def safetensors_with_header(path: Path, header: str) -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_nesting_bomb_in_a_safetensors_header_is_one_error_naming_the_file(tmp_path, depth):
    path = safetensors_with_header(tmp_path / "m.safetensors", '{"a": ' + bomb(depth) + "}")
    with pytest.raises(CheckpointError, match=rf"{path}: JSON nested more than 64 levels deep"):
        open_source(path)


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_nesting_bomb_in_an_hf_index_or_adapter_config_is_one_error_naming_the_file(tmp_path, depth):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + bomb(depth) + "}")
    with pytest.raises(CheckpointError, match=rf"{index}.*JSON nested more than 64 levels deep"):
        open_source(folder)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.w.lora_A.weight": torch.ones(1, 2)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + bomb(depth) + "}")
    with pytest.raises(CheckpointError, match=r"adapter_config.json.*JSON nested more than 64 levels deep"):
        open_source(adapter, base={"w": torch.zeros(2)})


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_nesting_bomb_in_a_task_store_index_is_one_error_naming_the_file(tmp_path, depth):
    root = tmp_path / "store"
    root.mkdir()
    (root / "index.json").write_text('{"format": "lightning-ties-task-store", "tasks": ' + bomb(depth) + "}")
    with pytest.raises(CheckpointError, match=r"index.json.*JSON nested more than 64 levels deep"):
        TaskVectorStore(root)


def test_the_command_reports_a_nesting_bomb_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    safetensors_with_header(tmp_path / "base.safetensors", '{"a": ' + bomb(100_000) + "}")
    save_file({"a": torch.ones(2)}, "ft.safetensors")
    Path("m.yaml").write_text("base: base.safetensors\nmodels: [ft.safetensors]\noutput: out.safetensors\n")
    assert main(["merge", "m.yaml"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "RecursionError" not in err, err
    assert "base.safetensors" in err and "JSON nested more than 64 levels deep" in err


# ---- configs --------------------------------------------------------------------------------------------
def search_yaml(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "s.yaml"
    cfg = {"base": "b", "tasks": {"a": "a", "b": "b"}, "model": {"target": "x:y"}, "data": {"target": "x:y"},
           "output_dir": "runs/x", **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_list_where_a_mapping_is_expected_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"s.yaml: key 'tasks': .*list"):
        load_config(SearchConfig, search_yaml(tmp_path, tasks=["a", "b"]))
    with pytest.raises(ConfigError, match=r"key 'search.k'"):
        load_config(SearchConfig, search_yaml(tmp_path), ["search.k={a: 1}"])


def test_a_search_grid_past_the_bound_is_refused_and_can_be_confirmed(tmp_path):
    lam = [round(0.001 * i, 3) for i in range(1, 5001)]
    path = search_yaml(tmp_path, search={"k": [0.1, 0.2, 0.3], "lam": lam})
    with pytest.raises(ConfigError, match=r"15000 candidates, more than search.max_candidates=10000.*search.max_candidates=15000 to confirm"):
        load_config(SearchConfig, path)
    assert len(load_config(SearchConfig, path, ["search.max_candidates=15000"]).search.lam) == 5000
    methods = search_yaml(tmp_path, search={"methods": ["ties", "task_arithmetic"], "lam": lam[:3000]})
    with pytest.raises(ConfigError, match="12000 candidates"):  # ties: 3 k x 3000 lam, task arithmetic: 3000 lam
        load_config(SearchConfig, methods)


def test_an_error_quotes_a_long_override_cut_short(tmp_path):
    lam = "search.lam=[" + ",".join(str(round(0.001 * i, 3)) for i in range(1, 12001)) + "]"
    with pytest.raises(ConfigError) as err:  # past omegaconf's node limit for one override
        load_config(SearchConfig, search_yaml(tmp_path), [lam])
    assert len(str(err.value)) < 700 and "override 'search.lam=[0.001,0.002," in str(err.value)
    with pytest.raises(ConfigError) as err:  # a grid past the bound, from overrides
        lam_5999 = "search.lam=[" + ",".join(str(round(0.001 * i, 3)) for i in range(1, 6000)) + "]"
        load_config(SearchConfig, search_yaml(tmp_path), ["search.k=[0.1,0.2]", lam_5999])
    assert len(str(err.value)) < 400 and "11998 candidates" in str(err.value)
