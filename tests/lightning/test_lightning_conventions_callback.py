"""The merging callback follows Lightning's own callback conventions, under both Lightning packages.

Given a user of ``pytorch_lightning`` or of the unified ``lightning`` package, then: every typo fails
before the first training step; LightningCLI lists and enforces the string choices; several instances
coexist in one Trainer and each resumes its own state; checkpoints stay small and reference the base
by path and sha256; the merged weights get a checkpoint that ``load_from_checkpoint`` loads alone.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import BOTH, PACKAGES, QUIET, data, load, net_class, trainer


def _tasks(pl) -> dict[str, dict[str, torch.Tensor]]:
    """Two other tasks' fine-tuned weights (one short fit each from the same init as the runs below)."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = net_class(pl)()
        trainer(pl).fit(model, data(seed))
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


# ---- options are validated before training ---------------------------------------------------------
@BOTH
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(search_strategy="coarse"), "search_strategy must be one of"),
    (dict(objective="normalised"), "objective must be"),
    (dict(mode="maximize"), "mode must be one of"),
    (dict(apply="merge"), "apply must be one of"),
    (dict(heads="(unclosed"), "heads"),
])
def test_typos_fail_at_construction(package: str, kwargs: dict, message: str) -> None:
    _, layer = load(package)
    with pytest.raises(ValueError, match=message):
        layer.TiesMerging(tasks={"a": {}}, task="c", **kwargs)


@BOTH
def test_strategy_is_not_an_argument_it_would_clash_with_the_trainers(package: str) -> None:
    # the 0.1 alias strategy= is gone: in a LightningCLI config it clashed with trainer.strategy
    _, layer = load(package)
    with pytest.raises(TypeError, match="strategy"):
        layer.TiesMerging(tasks={"a": {}}, task="c", strategy="coarse_to_fine")
    assert layer.TiesMerging(tasks={"a": {}}, task="c", search_strategy="coarse_to_fine").search_strategy == "coarse_to_fine"


@BOTH
def test_a_heads_regex_that_names_no_key_fails_at_setup_before_any_step(package: str) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)
    model = net_class(pl)()
    merging = layer.TiesMerging(tasks=tasks, task="c", heads=r"^classifier\.", val_dataloaders={})
    with pytest.raises(ValueError, match=r"classifier.*match no key"):
        trainer(pl, callbacks=[merging]).fit(model, data(3))
    assert model.steps == 0


# ---- several instances -----------------------------------------------------------------------------
@BOTH
def test_two_instances_coexist_and_each_resumes_its_own_state(package: str, tmp_path: Path) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)

    def pair():
        ties = layer.TiesMerging(tasks=tasks, task="c", method="ties", apply="keep", save_dir=str(tmp_path / "ties"))
        ta = layer.TiesMerging(tasks=tasks, task="c", method="task_arithmetic", lam=0.3)
        return ties, ta

    ties, ta = pair()
    assert ties.state_key != ta.state_key
    run = trainer(pl, tmp_path, callbacks=[ties, ta])
    run.fit(net_class(pl)(), data(3))
    assert ties.result.method == "ties" and ta.result.method == "task_arithmetic"
    run.save_checkpoint(tmp_path / "both.ckpt")
    states = torch.load(tmp_path / "both.ckpt", weights_only=True)["callbacks"]
    assert states[ties.state_key]["result"]["method"] == "ties"
    assert states[ta.state_key]["result"]["method"] == "task_arithmetic"

    class Probe(pl.Callback):  # on_fit_start runs after Lightning restored every callback's state
        def on_fit_start(self, trainer, pl_module):
            self.seen = [(c.result.method, c.result.lam) for c in (ties2, ta2)]

    ties2, ta2 = pair()
    probe = Probe()
    trainer(pl, tmp_path, callbacks=[ties2, ta2, probe]).fit(net_class(pl)(), data(3), ckpt_path=tmp_path / "both.ckpt")
    assert probe.seen == [("ties", ties.result.lam), ("task_arithmetic", 0.3)]


@BOTH
def test_only_the_last_instance_may_leave_its_merge_in_the_module(package: str) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)
    first = layer.TiesMerging(tasks=tasks, task="c")  # apply="merged" first: the second would merge its merge
    second = layer.TiesMerging(tasks=tasks, task="c", method="task_arithmetic", apply="keep", save_dir="unused")
    model = net_class(pl)()
    with pytest.raises(ValueError, match="apply='merged'.*last"):
        trainer(pl, callbacks=[first, second]).fit(model, data(3))
    assert model.steps == 0


# ---- checkpoints ---------------------------------------------------------------------------------
def _fit_with_last(pl, layer, tmp_path: Path, save_dir, epochs: int = 1, ckpt_path=None, seed: int = 0, tasks=None):
    merging = layer.TiesMerging(tasks=tasks, task="c", save_dir=save_dir)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = net_class(pl)(seed=seed)
    run = trainer(pl, tmp_path, callbacks=[merging, ckpt], enable_checkpointing=True, max_epochs=epochs)
    run.fit(model, data(3), ckpt_path=ckpt_path)
    return merging, model, tmp_path / "ckpt" / "last.ckpt"


@BOTH
def test_with_save_dir_the_checkpoint_references_the_base_instead_of_holding_it(package: str, tmp_path: Path) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)
    kept, _, default = _fit_with_last(pl, layer, tmp_path / "default", save_dir=None, tasks=tasks)
    merging, _, referenced = _fit_with_last(pl, layer, tmp_path / "ref", save_dir=str(tmp_path / "out"), tasks=tasks)

    state = torch.load(referenced, weights_only=True)["callbacks"][merging.state_key]
    base_file = (tmp_path / "out" / "base.safetensors").resolve()
    assert state["base"] is None and state["base_ref"]["path"] == str(base_file)
    from lightning_ties.io import sha256_file
    assert state["base_ref"]["sha256"] == sha256_file(base_file)
    # issue 19 (changed deliberately: the base used to travel inside every checkpoint): without save_dir the base
    # goes to <default_root_dir>/ties_merging/<task>-<hash>/ and checkpoints reference it there
    default_state = torch.load(default, weights_only=True)["callbacks"][kept.state_key]
    assert default_state["base"] is None
    assert Path(default_state["base_ref"]["path"]).parent.parent == (tmp_path / "default" / "ties_merging").resolve()
    plain = pl.Trainer(**{**QUIET, "max_epochs": 1, "default_root_dir": tmp_path / "plain", "enable_checkpointing": True,
                          "callbacks": [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)]})
    plain.fit(net_class(pl)(seed=0), data(3))
    growth = default.stat().st_size - (tmp_path / "plain" / "last.ckpt").stat().st_size
    assert growth < Path(default_state["base_ref"]["path"]).stat().st_size  # less than one copy of the base


@BOTH
@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_referenced_base_that_is_gone_or_changed_fails_before_any_step(package: str, damage: str, tmp_path: Path) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)
    _, _, last = _fit_with_last(pl, layer, tmp_path, save_dir=str(tmp_path / "out"), tasks=tasks)
    base_file = tmp_path / "out" / "base.safetensors"
    if damage == "missing":
        base_file.unlink()
    else:
        from lightning_ties.io import save_safetensors
        save_safetensors({k: v + 1 for k, v in tasks["a"].items()}, base_file)
    with pytest.raises((FileNotFoundError, ValueError), match="does not exist" if damage == "missing" else "changed"):
        _fit_with_last(pl, layer, tmp_path, save_dir=str(tmp_path / "out"), epochs=2, ckpt_path=last, tasks=tasks)


@BOTH
def test_the_merged_checkpoint_loads_with_load_from_checkpoint_alone(package: str, tmp_path: Path) -> None:
    pl, layer = load(package)
    tasks = _tasks(pl)
    merging, model, last = _fit_with_last(pl, layer, tmp_path, save_dir=str(tmp_path / "out"), tasks=tasks)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    Net = net_class(pl)
    loaded = Net.load_from_checkpoint(tmp_path / "out" / "merged.ckpt", map_location="cpu")
    for key, value in merged.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    finetuned = torch.load(last, weights_only=True)["state_dict"]  # last.ckpt: the fine-tuned resume point
    assert any(not torch.equal(finetuned[k], merged[k]) for k in merged)

    # issue 19 (changed deliberately: it used to be a full resume point): a merged model carries weights and
    # hyper-parameters only; last.ckpt stays the resume point of the fit
    checkpoint = torch.load(tmp_path / "out" / "merged.ckpt", weights_only=True)
    assert "optimizer_states" not in checkpoint and "lr_schedulers" not in checkpoint


# ---- LightningCLI ------------------------------------------------------------------------------------
def _cli(package: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        from {package}.cli import LightningCLI
        from {package}.demos.boring_classes import BoringModel
        sys.argv = ["prog", *{list(args)!r}]
        LightningCLI(BoringModel, run=False)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


@BOTH
def test_lightning_cli_lists_the_choices_and_rejects_a_bad_one_at_parse_time(package: str, tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    layer = PACKAGES[package]
    helped = _cli(package, tmp_path, "--trainer.callbacks.help", f"{layer}.TiesMerging")
    assert helped.returncode == 0, helped.stderr[-2000:]
    text = " ".join(helped.stdout.split())
    for choices in ("{max,min}", "{merged,keep}", "{grid,coarse_to_fine}"):
        assert choices in text, text[-3000:]
    assert "--trainer.callbacks.search_strategy" in helped.stdout and "then the lams around the best" in text

    def config(mode: str) -> str:
        (tmp_path / f"{mode}.yaml").write_text(textwrap.dedent(f"""
            trainer:
              logger: false
              accelerator: cpu
              callbacks:
                - class_path: {layer}.TiesMerging
                  init_args: {{tasks: {{a: a.safetensors}}, task: b, mode: {mode}}}
        """))
        return f"{mode}.yaml"

    assert _cli(package, tmp_path, "--config", config("max")).returncode == 0
    bad = _cli(package, tmp_path, "--config", config("maximize"))
    assert bad.returncode != 0 and "maximize" in bad.stderr
