"""Training the demo's network with a Lightning ``Trainer``: pretraining and fine-tuning the body.

Kept apart from :mod:`.models` (pure torch) so that naming the architecture in a config
(``lightning_ties.demo.models:DigitsNet``) does not import Lightning. The demo, like the command,
runs on ``pytorch_lightning`` and its layer (:mod:`lightning_ties.pytorch_lightning`).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..pytorch_lightning.scoring import make_trainer
from .models import DigitsNet


class DigitsClassifier(pl.LightningModule):
    """Trains a :class:`DigitsNet` with cross-entropy; ``train_head=False`` fine-tunes the body only."""

    def __init__(self, net: DigitsNet, lr: float = 1e-3, weight_decay: float = 0.0, train_head: bool = True) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.net.head.requires_grad_(train_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def fit_classifier(
    net: DigitsNet,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    train_head: bool,
    seed: int,
    batch_size: int = 64,
    progress: bool = False,
) -> DigitsNet:
    """Train ``net`` in place with a Lightning ``Trainer`` (CPU, seeded) and return it."""
    pl.seed_everything(seed, workers=True, verbose=False)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)
    # CPU kernels are deterministic; ``deterministic=True`` would flip a process-wide torch flag
    trainer = make_trainer(max_epochs=epochs, enable_progress_bar=progress)
    trainer.fit(DigitsClassifier(net, lr=lr, train_head=train_head), loader)
    net.eval()
    return net


__all__ = ["DigitsClassifier", "fit_classifier"]
