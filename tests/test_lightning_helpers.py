"""Tiny models, data and Trainer settings shared by the tests of the Lightning integration (no tests here)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{**QUIET, **kwargs})


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
