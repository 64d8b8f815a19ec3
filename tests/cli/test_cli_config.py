"""Configs: the typed schema, overrides, the registry-driven method section, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_ties.cli import build_parser, main
from lightning_ties.config import (
    ConfigError,
    DemoConfig,
    EvaluateConfig,
    MergeConfig,
    SearchConfig,
    load_config,
    method_defaults,
    to_dict,
    to_yaml,
)
from lightning_ties.merging import METHODS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MERGE_REQUIRED = ["base=b.safetensors", "models=[a.safetensors]", "output=o.safetensors"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- errors name the key and where it came from ---------------------------------------------------
def test_unknown_key_in_a_file_names_the_key_and_the_file(tmp_path):
    cfg = write(tmp_path / "bad.yaml", "base: b\nmodels: [a]\noutput: o\nlamda: 0.3\n")
    with pytest.raises(ConfigError) as err:
        load_config(MergeConfig, cfg)
    assert str(cfg) in str(err.value) and "'lamda'" in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_type_in_an_override_names_the_key_and_the_override():
    with pytest.raises(ConfigError, match=r"override 'seed=abc': key 'seed'"):
        load_config(DemoConfig, overrides=["seed=abc"])
    with pytest.raises(ConfigError, match=r"key 'pretrain.epochs'"):
        load_config(DemoConfig, overrides=["pretrain.epochs=many"])


def test_missing_required_value_names_the_key_and_the_file(tmp_path):
    cfg = write(tmp_path / "m.yaml", "base: b\nmodels: [a]\n")
    with pytest.raises(ConfigError, match=r"m\.yaml.*missing required value for key 'output'"):
        load_config(MergeConfig, cfg)


def test_unknown_method_and_unknown_method_parameter_are_named():
    with pytest.raises(ConfigError, match=r"unknown merge method 'tiez'"):
        load_config(MergeConfig, overrides=[*MERGE_REQUIRED, "method=tiez"])
    with pytest.raises(ConfigError, match=r"method\.p is not a parameter of method 'ties'"):
        load_config(MergeConfig, overrides=[*MERGE_REQUIRED, "method.p=0.5"])
    with pytest.raises(ConfigError, match=r"method\.k=.*wrong type"):
        load_config(MergeConfig, overrides=[*MERGE_REQUIRED, "method.k=high"])


def test_learned_method_is_refused_by_merge_with_a_pointer_to_search():
    with pytest.raises(ConfigError, match="use `lightning-ties search`"):
        load_config(MergeConfig, overrides=[*MERGE_REQUIRED, "method=learned"])


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    bad = write(tmp_path / "broken.yaml", "base: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not a valid YAML"):
        load_config(MergeConfig, bad)
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(MergeConfig, tmp_path / "nope.yaml")


def test_bad_search_grid_and_logger_are_refused():
    with pytest.raises(ConfigError, match=r"search\.lam="):
        load_config(DemoConfig, overrides=["search.lam=[]"])
    with pytest.raises(ConfigError, match=r"search\.k="):
        load_config(DemoConfig, overrides=["search.k=lots"])
    with pytest.raises(ConfigError, match=r"key 'logger': Invalid value 'wandb', expected one of \[csv, tensorboard, none\]"):
        load_config(DemoConfig, overrides=["logger=wandb"])


def _nested(dotted: str, value: str) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


@pytest.mark.parametrize(
    "schema, override, choices",
    [
        ("demo", "search.strategy=random", "grid, coarse_to_fine"),
        ("merge", "on_mismatch=skip", "error, base"),
        ("merge", "output_format=bin", "folder, safetensors, ckpt"),
        ("merge", "compute_dtype=float16", "float32, float64"),
    ],
)
def test_fixed_choices_are_checked_by_their_enum_type_in_one_line(tmp_path, schema, override, choices):
    key, _, value = override.partition("=")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_nested(key, value)))
    merge_keys = ["base=b.safetensors", "models=[a.safetensors]", "output=o.safetensors"]
    cls, extra = (DemoConfig, []) if schema == "demo" else (MergeConfig, merge_keys)
    with pytest.raises(ConfigError) as err:  # from the file: the message names the file and the key
        load_config(cls, path, extra)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    assert f"key '{key}'" in message and repr(value) in message and f"[{choices}]" in message


def test_choices_compare_print_and_save_as_plain_strings():
    cfg = load_config(MergeConfig, overrides=["base=b", "models=[a]", "output=o", "on_mismatch=base"])
    assert cfg.on_mismatch == "base" and f"{cfg.on_mismatch}" == "base" and str(cfg.compute_dtype) == "float32"
    assert to_dict(cfg)["on_mismatch"] == "base" and type(to_dict(cfg)["on_mismatch"]) is str
    assert "on_mismatch: base" in to_yaml(cfg)


# ---- overrides and the method section ---------------------------------------------------------------
def test_method_override_replaces_the_whole_section_with_the_registry_defaults(tmp_path):
    cfg = write(tmp_path / "m.yaml", "base: b\nmodels: [a]\noutput: o\nmethod: {name: ties, k: 0.1}\n")
    ties = load_config(MergeConfig, cfg)
    assert ties.method == {**method_defaults("ties"), "k": 0.1}
    ta = load_config(MergeConfig, cfg, ["method=task_arithmetic"])
    assert ta.method == {"name": "task_arithmetic", "lam": 0.4}  # no stale k from the file
    tuned = load_config(MergeConfig, cfg, ["method.lam=1.5", "method.sign=count"])
    assert (tuned.method["k"], tuned.method["lam"], tuned.method["sign"]) == (0.1, 1.5, "count")


def test_a_method_named_by_string_reads_methods_yaml_beside_the_config(tmp_path):
    (tmp_path / "methods").mkdir()
    write(tmp_path / "methods" / "dare.yaml", "p: 0.5\nseed: 7\nlam: 0.3\n")
    cfg = write(tmp_path / "m.yaml", "base: b\nmodels: [a]\noutput: o\nmethod: dare\n")
    assert load_config(MergeConfig, cfg).method == {"name": "dare", "p": 0.5, "seed": 7, "lam": 0.3}


def test_every_registered_method_is_reachable_without_cli_changes():
    for name, method in METHODS.items():
        cfg = load_config(MergeConfig, overrides=[*MERGE_REQUIRED, f"method={name}"])
        assert cfg.method["name"] == name
        assert set(cfg.method) - {"name", "lam"} == set(method.parameters())


def test_dotlist_overrides_reach_nested_dataclass_fields():
    cfg = load_config(DemoConfig, overrides=["finetune.lr=0.01", "tasks=[parity_flip,ge5_invert]", "search.k=[0.3]"])
    assert cfg.finetune.lr == 0.01 and cfg.tasks == ["parity_flip", "ge5_invert"] and cfg.search.k == [0.3]


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(DemoConfig, overrides=["seed=5", "methods=[ties]"])
    saved = write(tmp_path / "config.yaml", to_yaml(cfg))
    assert load_config(DemoConfig, saved) == cfg


# ---- the shipped configs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,schema",
    [
        ("merge", MergeConfig),
        ("search", SearchConfig),
        ("evaluate", EvaluateConfig),
        ("demo", DemoConfig),
        ("continual", DemoConfig),
    ],
)
def test_shipped_configs_load_with_their_schema(name, schema):
    cfg = load_config(schema, CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, schema)


def test_demo_yaml_is_the_embedded_default_that_make_demo_runs():
    assert load_config(DemoConfig, CONFIGS / "demo.yaml") == DemoConfig()


def test_there_is_one_method_yaml_per_registry_method_with_its_parameters():
    files = {p.stem for p in (CONFIGS / "methods").glob("*.yaml")}
    assert set(METHODS) <= files
    for name in [*METHODS, "learned"]:
        section = yaml.safe_load((CONFIGS / "methods" / f"{name}.yaml").read_text()) or {}
        assert set(section) == set(method_defaults(name)) - {"name"}, name


# ---- the command's error handling ------------------------------------------------------------------------
def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    cfg = write(tmp_path / "bad.yaml", "base: b\nmodels: [a]\noutput: o\nlamda: 0.3\n")
    assert main(["merge", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-ties: error:") and "lamda" in err
    assert "Traceback" not in err


def test_debug_shows_the_exception(tmp_path):
    cfg = write(tmp_path / "bad.yaml", "base: b\nmodels: [a]\noutput: o\nlamda: 0.3\n")
    with pytest.raises(ConfigError):
        main(["merge", str(cfg), "--debug"])


def test_missing_checkpoint_is_named_before_any_work(tmp_path, capsys):
    cfg = write(
        tmp_path / "m.yaml", f"base: {tmp_path}/nope.safetensors\nmodels: [a]\noutput: {tmp_path}/o.safetensors\n"
    )
    assert main(["merge", str(cfg)]) == 2
    assert "base=" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("command", ["merge", "search", "evaluate", "demo"])
def test_help_of_every_subcommand_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"lightning-ties {command}" in out


def test_top_level_help_lists_the_registry_methods(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS) and "learned" in out


@pytest.mark.parametrize(
    "module",
    [
        "lightning_ties.config",
        "lightning_ties.report",
        "lightning_ties.demo",
        "lightning_ties.demo.data",
        "lightning_ties.demo.models",
        "lightning_ties.cli.main",
        "lightning_ties.evaluation",
        "lightning_ties.evaluation.batches",
        "lightning_ties.evaluation.metrics",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_fast_mode_beats_the_file_and_the_command_line_beats_fast_mode(tmp_path, monkeypatch):
    import lightning_ties.cli.demo as demo_command

    seen = []
    monkeypatch.setattr(demo_command, "run_demo_command", lambda cfg, console, path: seen.append(cfg) or 0)
    assert main(["demo", str(CONFIGS / "demo.yaml"), "--fast", "finetune.epochs=3"]) == 0
    assert main(["demo", "fast=true"]) == 0
    file_fast, flag_fast = seen
    assert file_fast.fast and file_fast.pretrain.epochs == 4 and file_fast.finetune.epochs == 3
    assert flag_fast.fast and flag_fast.search.k == [0.2] and flag_fast.model.hidden == 16


def test_the_config_a_fast_run_saves_reruns_that_run(tmp_path, monkeypatch):
    # config.yaml holds the mode's values and the command line's together (fast: true); applying
    # the mode over that file again turned search.lam=[0.6,1.4] back into the mode's [0.4,1.0]
    import lightning_ties.cli.demo as demo_command

    seen = []
    monkeypatch.setattr(demo_command, "run_demo_command", lambda cfg, console, path: seen.append(cfg) or 0)
    assert main(["demo", "--fast", "search.lam=[0.6,1.4]"]) == 0
    saved = write(tmp_path / "config.yaml", to_yaml(seen[0]))  # what the run saves beside its outputs
    assert main(["demo", str(saved)]) == 0
    assert seen[1] == seen[0] and seen[1].fast and seen[1].search.lam == [0.6, 1.4]
    # a file's own fast: true fills what the file leaves out; fast=true on the command line beats the file
    assert main(["demo", str(write(tmp_path / "small.yaml", "fast: true\npretrain: {epochs: 5}\n"))]) == 0
    assert (seen[2].pretrain.epochs, seen[2].finetune.epochs, seen[2].model.hidden) == (5, 2, 16)
    assert main(["demo", str(saved), "fast=true"]) == 0
    assert seen[3].search.lam == [0.4, 1.0]


def test_the_command_starts_without_lightning_until_a_workflow_needs_it():
    import subprocess
    import sys

    code = (
        "import sys; from lightning_ties.cli import main; main(['merge', 'no/such.yaml']); "
        "print(any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and "no/such.yaml" in out.stderr


def test_the_config_and_the_search_accept_the_same_grids():
    # one validator (lightning_ties.merging.grids) for both: 'paper' is no longer accepted by
    # the config and then refused by the search after scoring started
    from lightning_ties.core.search import k_grid, lam_grid

    cfg = load_config(DemoConfig, overrides=["search.k=paper", "search.lam=[0.5,1.5]"])
    assert k_grid(cfg.search.k) == [0.1, 0.2, 0.3]
    assert lam_grid("ties", cfg.search.lam) == [0.5, 1.5]
    for override in ("search.k=best", "search.lam=best", "search.k=[]"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(DemoConfig, overrides=[override])


def test_the_demo_refuses_a_search_over_methods_in_one_line():
    with pytest.raises(ConfigError, match=r"search\.methods: the demo runs every method of `methods`"):
        load_config(DemoConfig, overrides=["search.methods=[ties,tsv]"])
