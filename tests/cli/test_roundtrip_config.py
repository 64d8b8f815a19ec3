"""merge_config.yaml, written beside every folder merge, re-runs with `lightning-ties merge` as is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lightning_ties.cli import main
from lightning_ties.io import merge_to


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(4, 6, generator=g), "layer.bias": torch.randn(4, generator=g)}
    save_file(base, "base.safetensors")
    for i in (1, 2):
        save_file({k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}, f"ft{i}.safetensors")
    return tmp_path


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method, params", [("ties", {"k": 0.5, "sign": "count", "lam": 1.3}), ("tsv", {}), ("average", {})])
def test_the_written_config_reruns_with_the_command_into_identical_tensors(inputs, method, params):
    merge_to("runs/merged", "base.safetensors", ["ft1.safetensors", "ft2.safetensors"], method, progress=False, **params)
    config = Path("runs/merged/merge_config.yaml")
    written = yaml.safe_load(config.read_text())
    assert written["method"]["name"] == method and "lam" not in written  # the command's schema: method.lam
    assert main(["merge", str(config), "output=runs/again", "--quiet"]) == 0  # no edit needed
    a, b = folder_tensors(Path("runs/merged")), folder_tensors(Path("runs/again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_written_config_holds_no_absolute_path_and_records_provenance(inputs):
    merge_to("runs/merged", "base.safetensors", ["ft1.safetensors", "ft2.safetensors"], k=0.5, progress=False)
    text = Path("runs/merged/merge_config.yaml").read_text()
    assert str(inputs) not in text and os.sep + "tmp" not in text
    written = yaml.safe_load(text)
    assert written["base"] == "base.safetensors" and written["models"] == ["ft1.safetensors", "ft2.safetensors"]
    assert "output" not in written  # the same file wherever the merge went; the command asks for output=
    provenance = written["provenance"]
    assert provenance["counts"] == {"merged": 2, "from_base": 0}
    assert list(provenance["sources"]["models"][0]["files"]) == ["ft1.safetensors"]


def test_a_rerun_without_output_asks_for_one_before_any_work(inputs, capsys):
    merge_to("merged", "base.safetensors", ["ft1.safetensors", "ft2.safetensors"], k=0.5, progress=False)
    assert main(["merge", "merged/merge_config.yaml", "--quiet"]) == 2
    assert "missing required value for key 'output'" in capsys.readouterr().err


@pytest.mark.parametrize("exclude", [r"\.bias$", [r"\.bias$"], __import__("re").compile(r"\.bias$")])
def test_include_and_exclude_given_as_a_string_or_compiled_are_written_as_the_commands_list(inputs, exclude):
    merge_to("merged", "base.safetensors", ["ft1.safetensors", "ft2.safetensors"], k=0.5, exclude=exclude,
             include=r"^layer\.", progress=False)
    written = yaml.safe_load(Path("merged/merge_config.yaml").read_text())
    assert written["exclude"] == [r"\.bias$"] and written["include"] == [r"^layer\."]
    assert main(["merge", "merged/merge_config.yaml", "output=again", "--quiet"]) == 0
    a, b = folder_tensors(Path("merged")), folder_tensors(Path("again"))
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(a["layer.bias"], load_file("base.safetensors")["layer.bias"])
