"""A .ckpt whose keys carry a LightningModule's `model.` prefix: the error names the prefix and the fix."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import save_file

from lightning_ties.io import merge_to, open_source
from lightning_ties.merging import StateDictSource, plan_merge
from lightning_ties.merging.plan import key_prefix

BASE = {"encoder.layer.0.weight": torch.zeros(2, 3), "encoder.layer.0.bias": torch.zeros(2), "pooler.weight": torch.zeros(2, 2)}


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file(BASE, "base.safetensors")
    torch.save({"state_dict": {f"model.{k}": v + 1 for k, v in BASE.items()}}, "ft.ckpt")
    return tmp_path


def test_the_error_names_the_prefix_and_the_fix_and_does_not_apply_it(files):
    with pytest.raises(ValueError, match=r"keys of .*ft\.ckpt carry the prefix 'model\.'.*prefix='model\.'.*prefix='auto'"):
        merge_to("out.safetensors", "base.safetensors", ["ft.ckpt"], "task_arithmetic", progress=False)
    for prefix in ("model.", "auto"):  # the fix it names works
        merge_to(f"out-{prefix}.safetensors", "base.safetensors", ["ft.ckpt"], "task_arithmetic", lam=1.0,
                 prefix=prefix, progress=False)
        assert torch.equal(open_source(f"out-{prefix}.safetensors").get("pooler.weight"), torch.ones(2, 2))


def test_a_base_carrying_the_prefix_is_named_too():
    base = StateDictSource({f"net.{k}": v for k, v in BASE.items()})
    with pytest.raises(ValueError, match=r"keys of base carry the prefix 'net\.'"):
        plan_merge(base, [StateDictSource(BASE, "model[0]")])


def test_unrelated_keys_keep_the_generic_hint():
    with pytest.raises(ValueError, match="check include/exclude") as err:
        plan_merge(StateDictSource(BASE), [StateDictSource({"other.w": torch.zeros(1)})])
    assert "prefix" not in str(err.value)


names = st.lists(st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True), min_size=1, max_size=8, unique=True)


@given(keys=names, prefix=st.from_regex(r"[A-Z]{1,3}", fullmatch=True))
def test_key_prefix_finds_the_prefix_it_was_given(keys, prefix):
    moved = {f"{prefix}.{k}" for k in keys}
    assert key_prefix(moved, set(keys)) == ("strip", f"{prefix}.")
    assert key_prefix(set(keys), moved) == ("add", f"{prefix}.")


def test_with_on_mismatch_base_the_engine_names_the_prefix_too(files):
    with pytest.raises(ValueError, match=r"nothing to merge.*prefix='model\.'"):
        merge_to("out.safetensors", "base.safetensors", ["ft.ckpt"], on_mismatch="base", progress=False)


def test_the_command_shows_the_prefix_hint_on_one_line(files, capsys):
    from lightning_ties.cli import main

    (files / "m.yaml").write_text("base: base.safetensors\nmodels: [ft.ckpt]\noutput: out.safetensors\n")
    assert main(["merge", "m.yaml", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "prefix='model.'" in err
