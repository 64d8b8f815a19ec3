"""Both Lightning packages: ``pytorch_lightning`` and the unified ``lightning`` (``import lightning as L``).

Given a user of either package, when they hand our callback and module to *their* Trainer and
LightningCLI, then those accept them, the merge equals the engine's, and the other package is
never imported.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_ties
from lightning_ties import ties_merge

from both_packages import PACKAGES, base_and_tasks, data, net_class, recorder, trainer



def _run(code: str, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()





def test_the_top_level_names_list_the_lightning_layer() -> None:
    layer = importlib.import_module("lightning_ties.lightning")
    assert lightning_ties.LIGHTNING_NAMES == set(layer.__all__)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_gets_its_own_classes_and_never_loads_the_other(package: str) -> None:
    other = "lightning" if package == "pytorch_lightning" else "pytorch_lightning"
    out = _run(f"""
        import sys
        import {package} as pl
        from lightning_ties import TiesMerging, MultiTaskMergeModule
        from torch import nn
        cb = TiesMerging(tasks={{"a": "a.ckpt"}}, task="b")
        module = MultiTaskMergeModule(nn.Linear(2, 2), {{"a": nn.Linear(2, 2).state_dict()}})
        print(isinstance(cb, pl.Callback), isinstance(module, pl.LightningModule),
              any(m == "{other}" or m.startswith("{other}.") for m in sys.modules))
    """)
    assert out.split() == ["True", "True", "False"]


def test_looking_up_an_unknown_name_imports_no_lightning() -> None:
    out = _run("""
        import sys, lightning_ties
        print(hasattr(lightning_ties, "__wrapped__"),
              any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in sys.modules))
    """)
    assert out.split() == ["False", "False"]


def test_the_backend_can_be_chosen_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_TIES_BACKEND", "lightning")
    assert lightning_ties.lightning_layer().__name__ == "lightning_ties.pytorch"
    monkeypatch.setenv("LIGHTNING_TIES_BACKEND", "pytorch_lightning")
    assert lightning_ties.lightning_layer().__name__ == "lightning_ties.lightning"
    monkeypatch.setenv("LIGHTNING_TIES_BACKEND", "torch")
    with pytest.raises(ValueError, match="LIGHTNING_TIES_BACKEND='torch'"):
        lightning_ties.lightning_layer()


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_callback_merges_in_each_packages_trainer(package: str, tmp_path: Path) -> None:
    pl = importlib.import_module(package)
    layer = importlib.import_module(PACKAGES[package])
    base_state, tasks = base_and_tasks(pl)
    model = net_class(pl)()
    model.load_state_dict(base_state)
    merging = layer.TiesMerging(tasks=tasks, task="c", k=0.5, lam=[0.5, 1.0],
                                val_dataloaders={"a": data(0), "b": data(1)})
    finetuned = recorder(pl)
    trainer(pl, max_epochs=2, callbacks=[finetuned, merging]).fit(model, data(2), data(2))

    assert merging.result is not None and merging.result.lam in (0.5, 1.0)
    expected = ties_merge(base_state, [tasks["a"], tasks["b"], finetuned.state], k=0.5, lam=merging.result.lam)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key])


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_trainer_validate_accepts_the_module_of_each_package(package: str) -> None:
    pl = importlib.import_module(package)
    layer = importlib.import_module(PACKAGES[package])
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 3))
    fts = {t: {k: v + 0.05 * (i + 1) for k, v in base.state_dict().items()} for i, t in enumerate(("a", "b"))}
    module = layer.MultiTaskMergeModule(base, fts, k=1.0)
    trainer(pl, max_epochs=2).validate(module, dataloaders={"a": data(0), "b": data(1)}, verbose=False)
    assert set(module.last_scores) == {"a", "b"}



@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_lightning_cli_builds_the_callback_from_yaml(package: str, tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        trainer:
          logger: false
          enable_progress_bar: false
          enable_checkpointing: false
          accelerator: cpu
          max_epochs: 1
          callbacks:
            - class_path: lightning_ties.TiesMerging
              init_args:
                tasks: {a: a.safetensors}
                task: b
                k: 0.2
                lam: 1.0
    """))
    out = _run(f"""
        import sys
        from {package}.cli import LightningCLI
        from {package}.demos.boring_classes import BoringModel
        sys.argv = ["prog", "--config", "cfg.yaml"]
        cli = LightningCLI(BoringModel, run=False)
        cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "TiesMerging"][0]
        print(type(cb).__module__, cb.task, cb.ks, cb.lams)
    """, cwd=tmp_path)
    assert out.split("\n")[-1].split() == [PACKAGES[package] + ".callback", "b", "[0.2]", "[1.0]"]


@pytest.mark.parametrize("package", list(PACKAGES))
def test_lightning_cli_builds_the_continual_callback_from_yaml(package: str, tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        trainer:
          logger: false
          accelerator: cpu
          callbacks:
            - class_path: lightning_ties.ContinualTiesMerging
              init_args:
                task: b
                store: runs/store
                start_from: merged
                lam: 1.2
    """))
    out = _run(f"""
        import sys
        from {package}.cli import LightningCLI
        from {package}.demos.boring_classes import BoringModel
        sys.argv = ["prog", "--config", "cfg.yaml"]
        cli = LightningCLI(BoringModel, run=False)
        cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "ContinualTiesMerging"][0]
        print(type(cb).__module__, cb.task, cb.store_dir, cb.start_from, cb.lams)
    """, cwd=tmp_path)
    assert out.split("\n")[-1].split() == [PACKAGES[package] + ".continual", "b", "runs/store", "merged", "[1.2]"]
