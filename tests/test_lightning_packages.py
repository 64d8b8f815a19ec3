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
from torch.utils.data import DataLoader, TensorDataset

import lightning_ties
from lightning_ties import ties_merge

PACKAGES = {"pytorch_lightning": "lightning_ties.lightning", "lightning.pytorch": "lightning_ties.pytorch"}


def _run(code: str, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _data(seed: int, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=torch.Generator().manual_seed(100 + seed))).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def _module_class(pl):
    class Net(pl.LightningModule):  # one attribute holds the network: the most common layout
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    return Net


def _trainer(pl, **kwargs):
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 accelerator="cpu", devices=1, max_epochs=2)
    return pl.Trainer(**{**quiet, **kwargs})


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
    Net = _module_class(pl)
    torch.manual_seed(0)
    base = Net()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tasks = {}
    for i, name in enumerate(("a", "b")):
        model = Net()
        model.load_state_dict(base_state)
        _trainer(pl).fit(model, _data(i))
        tasks[name] = {k: v.clone() for k, v in model.state_dict().items()}

    model = Net()
    model.load_state_dict(base_state)
    merging = layer.TiesMerging(tasks=tasks, task="c", k=0.5, lam=[0.5, 1.0],
                                val_dataloaders={"a": _data(0), "b": _data(1)})
    recorder = _recorder(pl)
    _trainer(pl, callbacks=[recorder, merging]).fit(model, _data(2), _data(2))

    assert merging.result is not None and merging.result.lam in (0.5, 1.0)
    expected = ties_merge(base_state, [tasks["a"], tasks["b"], recorder.state], k=0.5, lam=merging.result.lam)
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
    _trainer(pl).validate(module, dataloaders={"a": _data(0), "b": _data(1)}, verbose=False)
    assert set(module.last_scores) == {"a", "b"}


def _recorder(pl):
    class Recorder(pl.Callback):  # before TiesMerging in the list: sees the fine-tuned weights at fit end
        state: dict | None = None

        def on_fit_end(self, trainer, pl_module) -> None:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return Recorder()


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
