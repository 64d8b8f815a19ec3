"""Fine-tune on task "c"; at fit end, merge it with tasks "a" and "b" fine-tuned earlier (TIES).

The user story of the TiesMerging callback, on scikit-learn's digits (CPU, well under a minute):

1. "pretrain" a small MLP on digits (the shared base),
2. fine-tune it on task a (is the digit even?) and b (is it < 5?), saved as a Lightning
   checkpoint and a safetensors file,
3. fine-tune on task c (digit mod 3) with ``TiesMerging``: at fit end, the callback merges
   a, b and this run, picks k and lam on the validation dataloaders, and leaves the merged
   model in the module. Each task keeps its own head (``heads``).

Run: ``python examples/callback_fit_and_merge.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import TiesMerging, save_safetensors

TASKS = {"a": lambda d: d % 2, "b": lambda d: (d < 5).long(), "c": lambda d: d % 3}
CLASSES = {"a": 2, "b": 2, "c": 3}


class DigitsNet(pl.LightningModule):
    def __init__(self, classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, classes)
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
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loaders(task: str | None) -> tuple[DataLoader, DataLoader]:
    """Train/validation loaders of a task (None: the 10-class pretraining task)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    digit = torch.tensor(data.target)
    y = digit if task is None else TASKS[task](digit)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, val = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=256))


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def task_model(pretrained: dict, task: str) -> DigitsNet:
    """The pretrained body with a fresh head for the task."""
    torch.manual_seed(1)
    model = DigitsNet(CLASSES[task])
    model.load_state_dict({k: v for k, v in pretrained.items() if k.startswith("body.")}, strict=False)
    return model


def main(out: Path) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)
    base_model = DigitsNet(10)
    trainer(max_epochs=1).fit(base_model, digits_loaders(None)[0])
    pretrained = {k: v.clone() for k, v in base_model.state_dict().items()}

    # tasks fine-tuned earlier, saved in two formats the merge reads
    model_a = task_model(pretrained, "a")
    fit_a = trainer(max_epochs=2)
    fit_a.fit(model_a, digits_loaders("a")[0])
    fit_a.save_checkpoint(out / "a.ckpt")
    model_b = task_model(pretrained, "b")
    trainer(max_epochs=2).fit(model_b, digits_loaders("b")[0])
    save_safetensors(model_b, out / "b.safetensors")

    # this run: task c, merged with a and b at fit end
    merging = TiesMerging(
        tasks={"a": str(out / "a.ckpt"), "b": str(out / "b.safetensors")},
        task="c",
        heads=r"^head\.",                       # per-task classifiers: never merged
        k=[0.1, 0.2, 0.3], lam="search",        # the paper's lam grid 0.8..2.5
        search_strategy="coarse_to_fine",
        val_dataloaders={"a": digits_loaders("a")[1], "b": digits_loaders("b")[1]},
        save_dir=str(out / "merge"),
    )
    model_c = task_model(pretrained, "c")
    trainer(max_epochs=2, callbacks=[merging]).fit(model_c, *digits_loaders("c"))

    result = merging.result
    print(result.table)
    print(f"\nchosen: k={result.k}, lam={result.lam}; per task: {result.best.scores}")
    print(f"fine-tuned (each task alone): {result.reference}")
    print(f"model_c now holds the merged body with task c's head; results in {out / 'merge'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for checkpoints and results (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ties-callback-"))
    out.mkdir(parents=True, exist_ok=True)
    main(out)
