"""The demo's network and how it is trained: pretraining, a linear probe per task, fine-tuning.

Recipe of the paper's vision experiments (task arithmetic and TIES on CLIP): every task has
its own classification head, fixed before fine-tuning (there: the zero-shot head; here: a linear
probe of the pretrained features), and fine-tuning updates the shared body only. The merged
body is then evaluated with each task's head, and "base" means the pretrained body with that
same head, so every row of the table differs only in the body.

Example:
    >>> net = DigitsNet(num_classes=2, hidden=16)
    >>> net(torch.zeros(3, 64)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Keys of a DigitsNet that are task-specific (never merged, each task keeps its own).
HEAD_PATTERN = r"^head\."


class DigitsNet(nn.Module):
    """An MLP for 8x8 digits: a shared ``body`` (what is merged) and a task ``head``."""

    def __init__(self, num_classes: int = 10, hidden: int = 128, depth: int = 2, in_features: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


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
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )  # CPU kernels are deterministic; ``deterministic=True`` would flip a process-wide torch flag
    trainer.fit(DigitsClassifier(net, lr=lr, train_head=train_head), loader)
    net.eval()
    return net


@torch.no_grad()
def features(net: DigitsNet, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    return net.body(x)


def linear_probe(net: DigitsNet, x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = 300) -> nn.Linear:
    """A head fitted on frozen ``net.body`` features (full-batch, deterministic): the task's head."""
    feats = features(net, x)
    head = nn.Linear(feats.shape[1], num_classes)
    torch.manual_seed(0)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # a small L2 penalty keeps the probe well-posed when features separate the classes
        loss = F.cross_entropy(head(feats), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return float((net(x).argmax(-1) == y).float().mean())
