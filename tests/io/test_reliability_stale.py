"""Stale or wrong results refused (issue 18): fp16 overflows caught when written, unmergeable dtypes
named at open, and the pure pieces resume and key matching use (every source's fingerprint,
coverage on both sides). Every test here fails on the code before issue 18.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lightning_ties.io import CheckpointError, merge_to, open_source, save_safetensors

BIG = 60000.0  # near float16's largest finite value, 65504


@pytest.fixture
def fp16_inputs(tmp_path):
    save_file({"w": torch.tensor([BIG, 1.0]).half(), "b": torch.zeros(2).half()}, tmp_path / "base.safetensors")
    save_file({"w": torch.tensor([BIG + 4000, 1.0]).half(), "b": torch.ones(2).half()}, tmp_path / "ft.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


@pytest.mark.parametrize("suffix", [".safetensors", "", ".ckpt"])
def test_an_fp16_merge_that_overflows_is_refused_naming_the_key_and_the_fixes(tmp_path, fp16_inputs, suffix):
    base, ft = fp16_inputs
    out = tmp_path / f"merged{suffix}"
    with pytest.raises(OverflowError, match=r"tensor 'w' has 1 inf/NaN value\(s\) in torch.float16.*smaller lam.*float32 or bfloat16"):
        merge_to(out, base, [ft], "task_arithmetic", lam=2.0, progress=False)
    assert not out.exists()
    merge_to(out, base, [ft], "task_arithmetic", lam=1.0, progress=False)  # fits: written


def test_the_sinks_refuse_non_finite_weights_unless_told_otherwise(tmp_path):
    with pytest.raises(OverflowError, match="tensor 'w'"):
        save_safetensors({"w": torch.tensor([float("inf")])}, tmp_path / "m.safetensors")
    save_safetensors({"mask": torch.tensor([float("-inf")])}, tmp_path / "m.safetensors", check_finite=False)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_base_is_one_clear_error_at_open(tmp_path, dtype):
    save_file({"w": torch.ones(4).to(dtype)}, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(4).to(dtype)}, tmp_path / "ft.safetensors")
    with pytest.raises(CheckpointError, match=r"base.safetensors: tensors of a dtype lightning-ties cannot merge: w \(torch.float8"):
        merge_to(tmp_path / "out.safetensors", tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"], progress=False)


def test_complex_and_integer_only_checkpoints_are_one_clear_error_at_open(tmp_path):
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c.pt.*w \(torch.complex64\).*convert the checkpoint"):
        open_source(tmp_path / "c.pt")
    save_file({"w": torch.ones(4, dtype=torch.int8), "scale": torch.ones(1, dtype=torch.int32)}, tmp_path / "q.safetensors")
    with pytest.raises(CheckpointError, match=r"q.safetensors: holds no floating-point tensor .*Dequantize"):
        open_source(tmp_path / "q.safetensors")
    save_file({"w": torch.ones(2), "ids": torch.arange(2)}, tmp_path / "ok.safetensors")
    assert open_source(tmp_path / "ok.safetensors").keys()  # integer buffers beside float weights are fine


# ---- the pure pieces resume and key matching call ----------------------------------------------------
def test_a_changed_task_file_is_named_when_a_resumed_search_checks_its_sources(tmp_path):
    from lightning_ties.io.provenance import StaleResultError, check_fingerprints, fingerprint_sources

    save_file({"w": torch.zeros(2)}, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "b").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "b" / "model.safetensors")
    sources = {"base": tmp_path / "base.safetensors", "a": tmp_path / "a.safetensors", "b": tmp_path / "b"}
    saved = fingerprint_sources(sources)
    check_fingerprints(saved, fingerprint_sources(sources), "the search progress")  # unchanged: fine
    save_file({"w": torch.full((2,), 2.0)}, tmp_path / "a.safetensors")  # the task was fine-tuned again
    save_file({"w": torch.full((2,), 3.0)}, tmp_path / "b" / "model.safetensors")
    with pytest.raises(StaleResultError, match=r"changed since: a \(.*a.safetensors\), b \(.*b\)"):
        check_fingerprints(saved, fingerprint_sources(sources), "the search progress")


def test_key_coverage_is_measured_on_both_sides():
    from lightning_ties.io.validate import coverage_problem

    # 12 keys of another model, 10 of which share names with a 100-key module: 83% of the source, 10% of the module
    problem = coverage_problem("task 'a' (other.ckpt)", matched=10, source_keys=12, module_keys=100)
    assert problem is not None and "10 of the module's 100 float keys (10%)" in problem and "other.ckpt" in problem
    assert coverage_problem("task 'a'", matched=95, source_keys=100, module_keys=100) is None


def test_the_command_reports_an_overflow_in_one_line(tmp_path, fp16_inputs, monkeypatch, capsys):
    from lightning_ties.cli import main

    base, ft = fp16_inputs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text(f"base: {base}\nmodels: [{ft}]\noutput: out.safetensors\nmethod: {{name: task_arithmetic, lam: 2.0}}\n")
    assert main(["merge", "m.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "tensor 'w'" in err and "smaller lam" in err
