"""The command's one-line promise under bad input, and environment interpolation only when asked for.

Given a config or override a careful (or clumsy) user could write, when ``lightning-ties`` runs it,
then it exits 2 (bad config) or 1 (bad inputs at run time) with one line that names the key, file
or value and what to do, before any work; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightning_ties.cli import main
from lightning_ties.config import ConfigError, DemoConfig, SearchConfig, load_config, to_dict, to_yaml


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    """base, a, b (4x4 body + 2x4 head) and ``no_head`` (lacks the head), and ``m.yaml`` merging a and b."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g), "head.weight": torch.randn(2, 4, generator=g)}
    save_file(base, "base.safetensors")
    for name in ("a", "b"):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"{name}.safetensors")
    save_file({"w": base["w"] + 0.1}, "no_head.safetensors")
    (tmp_path / "m.yaml").write_text("base: base.safetensors\nmodels: [a.safetensors, b.safetensors]\noutput: out.safetensors\n")
    return tmp_path


def error_line(capsys, *argv: str, code: int = 2) -> str:
    assert main(list(argv)) == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert not Path("out.safetensors").exists()  # refused before any work
    return err


# ---- bad YAML: in an override, as a tag, duplicate keys -------------------------------------------
def test_bad_override_syntax_is_one_line_naming_the_override(inputs, capsys):
    err = error_line(capsys, "merge", "m.yaml", "models=[a,")
    assert "override 'models=[a,'" in err and "not valid YAML" in err and "close its brackets" in err


def test_a_yaml_tag_in_an_override_or_a_file_is_refused_in_one_line(inputs, capsys):
    err = error_line(capsys, "merge", "m.yaml", "base=!!python/object/apply:os.system")
    assert "override 'base=!!python/object/apply:os.system'" in err and "YAML tags" in err
    (inputs / "tag.yaml").write_text("base: !!python/object/apply:os.getcwd []\nmodels: [a.safetensors]\noutput: o\n")
    err = error_line(capsys, "merge", "tag.yaml")
    assert "tag.yaml" in err and "YAML tags" in err and "line 1" in err


def test_duplicate_keys_name_the_key_and_the_file(inputs, capsys):
    (inputs / "dup.yaml").write_text("base: base.safetensors\nmodels: [a.safetensors]\nbase: b.safetensors\noutput: o\n")
    err = error_line(capsys, "merge", "dup.yaml")
    assert "dup.yaml" in err and "key 'base' is given twice" in err and "line 3" in err


def test_a_bad_include_regex_is_a_config_error_naming_the_pattern(inputs, capsys):
    err = error_line(capsys, "merge", "m.yaml", "include=[(]")
    assert "include[0]='('" in err and "not a valid regular expression" in err
    with pytest.raises(ConfigError, match=r"heads\[1\]='\[' is not a valid regular expression"):
        load_config(SearchConfig, overrides=["base=b", "tasks={a: a}", "output_dir=o", "model.target=m:f",
                                           "data.target=d:f", "heads=[ok, '[']"])


# ---- runtime errors: the one line says what is wrong ---------------------------------------------
def test_key_mismatch_errors_name_the_keys_in_their_one_line(inputs, capsys):
    err = error_line(capsys, "merge", "m.yaml", "models=[a.safetensors,no_head.safetensors]", code=1)
    assert "1 key(s) cannot be merged: head.weight: missing from no_head.safetensors" in err
    assert "on_mismatch='base'" in err  # and what to do
    err = error_line(capsys, "merge", "m.yaml", "models=[no_head.safetensors]", "include=[^head]",
                     "on_mismatch=base", code=1)
    assert "keys selected by include cannot be merged: head.weight: missing from no_head.safetensors" in err


# ---- lam: a finite number in a sane range, in the method section and in search grids ---------------
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("file: .nan", "method.lam must be a finite number, got nan"),
        ("file: .inf", "method.lam must be a finite number, got inf"),
        ("file: 1.0e+39", "out of range"),
        ("file: '1.0'", "method.lam must be a real number"),
        ("override: .nan", "method.lam must be a finite number"),
        ("override: 1e39", "out of range"),
        ("override: true", "method.lam must be a real number"),
    ],
)
def test_lam_that_is_not_a_sane_number_is_a_config_error(inputs, capsys, where, message):
    kind, value = where.split(": ")
    if kind == "file":
        (inputs / "lam.yaml").write_text(
            f"base: base.safetensors\nmodels: [a.safetensors]\noutput: out.safetensors\nmethod: {{name: ties, lam: {value}}}\n"
        )
        err = error_line(capsys, "merge", "lam.yaml")
        assert "lam.yaml" in err
    else:
        err = error_line(capsys, "merge", "m.yaml", f"method.lam={value}")
    assert message in err


@pytest.mark.parametrize("grid", ["[1.0,.nan]", "[0.5,.inf]", "[1e39]", ".nan"])
def test_a_search_grid_with_a_non_finite_or_huge_lam_is_refused(grid):
    with pytest.raises(ConfigError, match=r"override 'search.lam=.*search\.lam"):
        load_config(DemoConfig, overrides=[f"search.lam={grid}"])
    with pytest.raises(ConfigError, match=r"search\.k=.*outside \(0, 1\]"):
        load_config(DemoConfig, overrides=["search.k=[0.2,.nan]"])


# ---- --debug and the process itself --------------------------------------------------------------
def test_debug_shows_the_traceback_instead(inputs):
    with pytest.raises(ConfigError, match="not valid YAML"):
        main(["merge", "m.yaml", "models=[a,", "--debug"])


def test_the_process_prints_one_line_and_exits_2(inputs):
    proc = subprocess.run([sys.executable, "-m", "lightning_ties", "merge", "m.yaml", "models=[a,"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "models=[a," in proc.stderr, proc.stderr


# ---- environment interpolation: off unless asked for; never saved resolved -------------------------
def test_environment_interpolation_is_off_by_default(inputs, capsys, monkeypatch):
    monkeypatch.setenv("LT_SECRET", "s3cr3t")
    (inputs / "env.yaml").write_text(
        "base: base.safetensors\nmodels: [a.safetensors]\noutput: out-${oc.env:LT_SECRET}.safetensors\n"
    )
    err = error_line(capsys, "merge", "env.yaml")
    assert "env.yaml" in err and "key 'output'" in err and "--allow-env" in err and "s3cr3t" not in err
    err = error_line(capsys, "merge", "m.yaml", "output=${oc.env:LT_SECRET}.safetensors")
    assert "--allow-env" in err
    assert not list(inputs.glob("*s3cr3t*"))


def test_allowed_environment_interpolation_is_saved_unresolved(inputs, capsys, monkeypatch):
    monkeypatch.setenv("LT_OUT", str(inputs / "s3cr3t"))
    (inputs / "s3cr3t").mkdir()
    (inputs / "env.yaml").write_text(
        "base: base.safetensors\nmodels: [a.safetensors]\noutput: ${oc.env:LT_OUT}/merged.safetensors\n"
    )
    assert main(["merge", "env.yaml", "--allow-env", "--quiet"]) == 0
    saved = (inputs / "s3cr3t" / "merged.safetensors.config.yaml").read_text()
    assert "${oc.env:LT_OUT}/merged.safetensors" in saved and "s3cr3t" not in saved
    cfg = load_config(DemoConfig, overrides=["output_dir=${oc.env:LT_OUT}"], allow_env=True)
    assert cfg.output_dir == str(inputs / "s3cr3t")  # used resolved, recorded unresolved
    assert to_dict(cfg)["output_dir"] == "${oc.env:LT_OUT}" and "s3cr3t" not in to_yaml(cfg)
