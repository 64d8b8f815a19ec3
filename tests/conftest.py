"""Shared by the whole suite: settings, tiny models and data, and the fixtures built on them.

- ``torch.set_num_threads(1)``: tiny models train far faster on one thread than on a contended pool.
- A quiet Trainer: :data:`QUIET`, :func:`quiet_trainer` (``pytorch_lightning``), :func:`trainer` (either
  package) and the ``quiet`` fixture.
- Both Lightning packages: :data:`PACKAGES` pairs ``pytorch_lightning`` with
  :mod:`lightning_ties.pytorch_lightning` and the unified ``lightning.pytorch`` with
  :mod:`lightning_ties.pytorch`; the ``lightning_package`` fixture runs a test under each
  (``(pl, layer)``), :data:`BOTH` parametrizes a ``package`` name, :func:`load` imports a pair.
- Tiny tasks: :func:`tiny_tasks` (and the ``tiny`` fixture), :func:`task_data`, :func:`fine_tune`,
  :func:`pretrained`, :class:`Classifier`, :func:`net_class` / :func:`base_and_tasks` per package,
  :func:`regression_data` with :class:`LinearRegressor` (hand-checkable merges), and callbacks that
  record what a fit did (:class:`Recorder`, :func:`recorder`, :class:`CountValidations`).

Tests import the helpers from here (``from conftest import task_data``); nothing here is a test.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
from types import ModuleType

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

#: Scripts that multi-process tests launch (they read their arguments at import): not test modules.
collect_ignore_glob = ["*_script.py"]

# ---- a quiet Trainer and tiny models (pytorch_lightning) ---------------------------------------------
QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)


# Trainers without a default_root_dir get a fresh folder: TiesMerging keeps its default save_dir under it,
# which must neither land in the checkout nor carry one test's search progress into another.
_ROOTS = tempfile.mkdtemp(prefix="lightning-ties-tests-")
atexit.register(shutil.rmtree, _ROOTS, True)
# Source digests are remembered there too, not in the user's ~/.cache (the ranks' processes inherit it).
os.environ["LIGHTNING_TIES_DIGEST_CACHE"] = os.path.join(_ROOTS, "sha256")


def _root(root) -> str:
    return str(root) if root is not None else tempfile.mkdtemp(dir=_ROOTS)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A ``pytorch_lightning`` Trainer on one CPU with no logger, checkpoints, progress bar or summary."""
    return pl.Trainer(**{**QUIET, **kwargs, "default_root_dir": _root(kwargs.get("default_root_dir"))})


class Classifier(pl.LightningModule):
    """A two-layer MLP; ``classes`` sets the head's size (per-task heads differ in it)."""

    def __init__(self, features: int = 8, hidden: int = 16, classes: int = 3, lr: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def task_data(seed: int, classes: int = 3, n: int = 96, features: int = 8, batch_size: int = 32) -> DataLoader:
    """A linearly separable task: labels are the arg-max of a random projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    proj = torch.randn(features, classes, generator=torch.Generator().manual_seed(1000 + seed))
    y = (x @ proj).argmax(-1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fine_tune(base_state: dict, seed: int, classes: int = 3, epochs: int = 2, head_seed: int | None = None) -> dict:
    """Fine-tune a copy of ``base_state`` on task ``seed``; return the fine-tuned state dict."""
    torch.manual_seed(seed)
    model = Classifier(classes=classes)
    model.load_state_dict({k: v for k, v in base_state.items() if v.shape == model.state_dict()[k].shape}, strict=False)
    quiet_trainer(max_epochs=epochs).fit(model, task_data(seed, classes))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained(classes: int = 3, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(classes=classes)


class Recorder(pl.Callback):
    """Records the module's weights at fit end (placed before TiesMerging, it sees the fine-tuned ones)."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class CountValidations(pl.Callback):
    """Counts validation epochs run by ``trainer.validate`` (one per candidate or reference), not fit's."""

    def __init__(self) -> None:
        self.count = 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self.count += 1


class LinearRegressor(nn.Module):
    """y = w . x (no bias): merged outputs are hand-checkable."""

    def __init__(self, features: int = 2) -> None:
        super().__init__()
        self.w = nn.Linear(features, 1, bias=False)
        with torch.no_grad():
            self.w.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x)


def regression_data(target: float, features: int = 2, n: int = 4) -> DataLoader:
    x = torch.ones(n, features)
    y = torch.full((n, 1), target)
    return DataLoader(TensorDataset(x, y), batch_size=2)


# ---- both Lightning packages ---------------------------------------------------------------------------
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
    """A quiet Trainer of the package ``pl`` (``quiet_trainer`` is the same for ``pytorch_lightning``)."""
    return pl.Trainer(**{**QUIET, "max_epochs": max_epochs, **kwargs, "default_root_dir": _root(tmp_path)})


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


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture
def quiet():
    """:func:`quiet_trainer`: ``quiet(max_epochs=2, callbacks=[...])``."""
    return quiet_trainer


@pytest.fixture(params=sorted(PACKAGES), ids=sorted(PACKAGES))
def lightning_package(request) -> tuple[ModuleType, ModuleType]:
    """``(pl, layer)``: each Lightning package and our layer built on it, one test run per package."""
    return load(request.param)


@pytest.fixture
def tiny():
    """:func:`tiny_tasks`: ``(base module, base state, {"a": ..., "b": ...})``."""
    return tiny_tasks()
