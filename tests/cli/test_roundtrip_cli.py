"""The command: method parameters given at the top level get a hint; --help loads no heavy library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ties.cli import main
from lightning_ties.config import ConfigError, MergeConfig, SearchConfig, load_config

REQUIRED = ["base=b.safetensors", "models=[a.safetensors]", "output=out.safetensors"]


@pytest.mark.parametrize("override, hint", [
    ("lam=1.2", "did you mean method.lam=1.2?"),
    ("k=0.3", "did you mean method.k=0.3?"),
    ("sign=count", "did you mean method.sign=count?"),
    ("k=[0.1,0.2]", "did you mean method.k=[0.1,0.2]?"),
])
def test_a_method_parameter_at_the_top_level_gets_the_method_hint(override, hint):
    with pytest.raises(ConfigError, match="not a top-level key") as err:
        load_config(MergeConfig, overrides=[*REQUIRED, override])
    assert hint in str(err.value) and f"override {override!r}" in str(err.value)


def test_in_a_file_and_for_search_the_hint_names_both_places(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("lam: 1.2\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: 'lam' is not a top-level key; did you mean method\.lam=1\.2\?.*search\.lam=\[\.\.\.\]"):
        load_config(SearchConfig, config)


def test_an_unknown_key_that_is_no_method_parameter_keeps_omegaconfs_error():
    with pytest.raises(ConfigError, match="not in 'MergeConfig'"):
        load_config(MergeConfig, overrides=[*REQUIRED, "colour=red"])


def test_the_command_prints_the_hint_on_one_line(tmp_path, capsys):
    config = tmp_path / "m.yaml"
    config.write_text("base: b.safetensors\nmodels: [a.safetensors]\noutput: out.safetensors\n")
    assert main(["merge", str(config), "lam=1.2", "--quiet"]) == 2  # before any file is opened
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean method.lam=1.2?" in err


HEAVY = ("lightning", "pytorch_lightning", "transformers", "matplotlib", "torchmetrics", "scipy", "lightning_ties.io")


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["search", "--help"], ["demo", "--help"]])
def test_help_loads_no_lightning_transformers_matplotlib_or_io(argv):
    code = (
        "import sys\nfrom lightning_ties.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "usage:" in out and out.strip().endswith("LOADED []"), out[-300:]


def test_a_config_error_loads_no_lightning_transformers_matplotlib_or_io(tmp_path):
    code = (
        "import sys\nfrom lightning_ties.cli import main\n"
        f"assert main(['merge', {str(tmp_path / 'none.yaml')!r}, 'lam=1.2']) == 2\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().endswith("LOADED []"), out[-300:]
