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
import lightning_ties.io
from lightning_ties import ties_merge

from conftest import PACKAGES, base_and_tasks, data, net_class, recorder, trainer



def _run(code: str, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()





def test_the_top_level_table_lists_every_lazy_name_and_where_it_lives() -> None:
    table = lightning_ties.LAZY_NAMES
    for module in ("lightning_ties.pytorch", "lightning_ties.pytorch_lightning", "lightning_ties.lightning"):
        assert {n for n, where in table.items() if where == "lightning"} == set(importlib.import_module(module).__all__)
    assert {n for n, where in table.items() if where == "io"} == {*lightning_ties.io.__all__, "io"}
    assert not set(table) & set(lightning_ties.__all__)  # the eager names are not lazy too
    for name in table:
        assert getattr(lightning_ties, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'TaskVector'"):
        lightning_ties.TaskVector  # noqa: B018  (the 0.1 alias is gone)


def test_both_layers_share_every_lightning_free_class_so_isinstance_and_except_hold_across() -> None:
    import lightning.pytorch as lp
    import pytorch_lightning as pl

    unified = importlib.import_module("lightning_ties.pytorch")
    classic = importlib.import_module("lightning_ties.pytorch_lightning")
    shells = {"TiesMerging", "ContinualTiesMerging", "MultiTaskMergeModule", "LearnedMergeModule"}
    per_package = {*shells, "learn_coefficients"}  # it runs its package's Trainer
    for name in set(unified.__all__) - per_package:
        assert getattr(unified, name) is getattr(classic, name), name  # one object, loaded once (lightning_ties.core)
    for name in shells:
        assert issubclass(getattr(unified, name), (lp.Callback, lp.LightningModule))
        assert issubclass(getattr(classic, name), (pl.Callback, pl.LightningModule))
        assert getattr(unified, name) is not getattr(classic, name)
    # a result made under one package is an instance of the other's class; an error raised by one is caught by the other's
    base = nn.Linear(2, 2)
    tasks = {"a": {k: v + 0.1 for k, v in base.state_dict().items()}}
    result = unified.MultiTaskMergeModule(base, tasks).search(None, {"a": [[(torch.eye(2), torch.tensor([0, 1]))]]},
                                                              k=0.2, lam=[1.0], normalize=False)
    assert isinstance(result, classic.SearchResult) and isinstance(result.best, classic.Candidate)
    with pytest.raises(classic.KeyMatchError):
        unified.MultiTaskMergeModule(base, {"a": {"zzz": torch.zeros(2, 2)}})
    with pytest.raises(unified.KeyMatchError):
        classic.MultiTaskMergeModule(base, {"a": {"zzz": torch.zeros(2, 2)}})
    assert classic.TaskMetrics(["a"]).__class__ is unified.TaskMetrics


def test_the_old_name_of_the_pytorch_lightning_layer_is_the_same_package() -> None:
    import lightning_ties.lightning as old
    import lightning_ties.lightning.learned as old_learned
    import lightning_ties.pytorch_lightning as new

    assert old.TiesMerging is new.TiesMerging and old.__all__ == new.__all__
    assert old_learned is new.learned
    assert importlib.import_module("lightning_ties.lightning.callback") is importlib.import_module(
        "lightning_ties.pytorch_lightning.callback")


def test_the_pytorch_lightning_layer_is_generated_from_the_unified_one() -> None:
    # like Lightning's own pytorch_lightning, the mirror is generated (tools/mirror.py); a stale one fails here
    root = Path(lightning_ties.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "tools" / "mirror.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    compat = (root / "lightning_ties" / "pytorch_lightning" / "_compat.py").read_text()
    assert "import pytorch_lightning as pl" in compat and "lightning.pytorch" not in compat


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
    assert lightning_ties.lightning_layer().__name__ == "lightning_ties.pytorch_lightning"
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


DATAMODULE = '''
import torch
from {package} import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset


class TaskData(LightningDataModule):
    def __init__(self, seed: int = 0, n: int = 8) -> None:
        super().__init__()
        self.seed, self.n = seed, n

    def val_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(torch.randn(self.n, 32, generator=g)), batch_size=4)
'''


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_lightning_cli_gives_other_tasks_validation_data_as_yaml_datamodules(package: str, tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    (tmp_path / "task_data.py").write_text(DATAMODULE.format(package=package))
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""
        trainer:
          logger: false
          accelerator: cpu
          callbacks:
            - class_path: lightning_ties.TiesMerging
              init_args:
                tasks: {a: a.safetensors}
                task: b
                val_datamodules:
                  a: {class_path: task_data.TaskData, init_args: {seed: 3, n: 12}}
    """))
    out = _run(f"""
        import sys
        from {package}.cli import LightningCLI
        from {package}.demos.boring_classes import BoringModel
        from lightning_ties.core.inputs import datamodule_loaders
        sys.argv = ["prog", "--config", "cfg.yaml"]
        cli = LightningCLI(BoringModel, run=False)
        cb = [c for c in cli.trainer.callbacks if type(c).__name__ == "TiesMerging"][0]
        dm = cb.val_datamodules["a"]
        print(type(dm).__name__, dm.seed, len(datamodule_loaders(cb.val_datamodules)["a"].dataset))
    """, cwd=tmp_path)
    assert out.split("\n")[-1].split() == ["TaskData", "3", "12"]


def test_val_datamodules_feed_the_fit_end_search(tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from conftest import fine_tune, pretrained, quiet_trainer, task_data

    class TaskData(pl.LightningDataModule):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.seed, self.stages = seed, []

        def setup(self, stage: str) -> None:
            self.stages.append(stage)

        def val_dataloader(self):
            return task_data(self.seed)

    base = {k: v.clone() for k, v in pretrained().state_dict().items()}
    tasks = {"a": fine_tune(base, seed=1), "b": fine_tune(base, seed=2)}
    modules = {"a": TaskData(1), "b": TaskData(2)}
    merging = lightning_ties.TiesMerging(tasks=tasks, task="c", lam=[0.8, 1.2], val_datamodules=modules)
    quiet_trainer(max_epochs=1, callbacks=[merging], default_root_dir=tmp_path).fit(pretrained(), task_data(3), task_data(3))
    assert merging.result.reason == "search" and set(merging.result.best.scores) == {"a", "b", "c"}
    assert modules["a"].stages == ["validate"]
    with pytest.raises(ValueError, match="both val_dataloaders and val_datamodules"):
        lightning_ties.TiesMerging(tasks=tasks, task="c", val_dataloaders={"a": task_data(1)}, val_datamodules=modules)
    with pytest.raises(ValueError, match="unknown task"):
        lightning_ties.TiesMerging(tasks=tasks, task="c", val_datamodules={"typo": TaskData(1)})
