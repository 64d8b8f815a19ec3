"""Shared by the tests of the Lightning layer that run under both Lightning packages (no tests here).

``pytorch_lightning`` pairs with :mod:`lightning_ties.pytorch_lightning`, the unified ``lightning.pytorch``
with :mod:`lightning_ties.pytorch`; each test takes the package name and builds its module,
callback and Trainer from that package alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PACKAGES = {"pytorch_lightning": "lightning_ties.pytorch_lightning", "lightning.pytorch": "lightning_ties.pytorch"}
BOTH = pytest.mark.parametrize("package", sorted(PACKAGES))


def load(package: str) -> tuple[ModuleType, ModuleType]:
    """The Lightning package and our layer built on it."""
    return importlib.import_module(package), importlib.import_module(PACKAGES[package])


def data(seed: int, n: int = 64) -> DataLoader:
    """A linearly separable 3-class task of 6 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=torch.Generator().manual_seed(100 + seed))).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def trainer(pl: ModuleType, tmp_path=None, max_epochs: int = 1, **kwargs):
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 accelerator="cpu", devices=1, max_epochs=max_epochs, default_root_dir=tmp_path)
    return pl.Trainer(**{**quiet, **kwargs})


_NETS: dict[str, type] = {}


def net_class(pl: ModuleType) -> type:
    """One LightningModule class per package: the network in one attribute (``self.net``), the usual layout."""
    if pl.__name__ in _NETS:
        return _NETS[pl.__name__]

    class Net(pl.LightningModule):
        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
            self.steps = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            self.steps += 1
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    _NETS[pl.__name__] = Net
    return Net


def recorder(pl: ModuleType):
    """A callback that keeps the module's weights at fit end (listed before TiesMerging: the fine-tuned ones)."""

    class Recorder(pl.Callback):
        state: dict | None = None

        def on_fit_end(self, trainer, pl_module) -> None:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return Recorder()


def base_and_tasks(pl: ModuleType) -> tuple[dict, dict[str, dict]]:
    """The base's weights and two tasks ("a" on ``data(0)``, "b" on ``data(1)``) fine-tuned from it."""
    net = net_class(pl)
    base_state = {k: v.clone() for k, v in net().state_dict().items()}
    tasks = {}
    for i, name in enumerate(("a", "b")):
        model = net()
        model.load_state_dict(base_state)
        trainer(pl, max_epochs=2).fit(model, data(i))
        tasks[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return base_state, tasks


def tiny_tasks() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base MLP (6 -> 12 -> 3), its weights, and two tasks "a" and "b" made by random shifts of them."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tasks = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base_state.items()} for t in ("a", "b")}
    return base, base_state, tasks
