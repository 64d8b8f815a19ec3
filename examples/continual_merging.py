"""Continual merging: tasks arrive one at a time; after each fit the merged model covers every task so far.

On scikit-learn's digits (CPU, well under a minute). Three tasks arrive in turn (t1: is the digit
even, t2: is it < 5, t3: digit mod 3). Each fit starts from the pretrained base, and at its end
``ContinualTiesMerging`` adds this run's trimmed task vector to an on-disk store (safetensors, sparse: only
the top-k entries are kept) and merges every stored task, choosing lam on the validation data of
the tasks seen so far. Memory never holds t full checkpoints: the store is read one tensor of one
task at a time.

Run: ``python examples/continual_merging.py [--out DIR] [--start-from base|merged]``
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

from lightning_ties import ContinualTiesMerging
from lightning_ties.io.task_store import TaskVectorStore

TASKS = {"t1": lambda d: d % 2, "t2": lambda d: (d < 5).long(), "t3": lambda d: d % 3}
CLASSES = {"t1": 2, "t2": 2, "t3": 3}


class DigitsNet(pl.LightningModule):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits_loaders(task: str | None) -> tuple[DataLoader, DataLoader]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    digit = torch.tensor(data.target)
    y = digit if task is None else TASKS[task](digit)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=256))


def quiet(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def main(out: Path, start_from: str) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*differ across models.*")
    torch.manual_seed(0)
    pretrained = DigitsNet(10)
    quiet(max_epochs=1).fit(pretrained, digits_loaders(None)[0])
    store_dir = out / "store"
    seen: list[str] = []
    for task in TASKS:
        torch.manual_seed(1)
        model = DigitsNet(CLASSES[task])  # the pretrained body, a fresh head for the new task
        model.load_state_dict({k: v for k, v in pretrained.state_dict().items() if k.startswith("body.")},
                              strict=False)
        merging = ContinualTiesMerging(
            task=task,
            store=str(store_dir),
            heads=r"^head\.",
            k=0.2,
            lam="search",
            search_strategy="coarse_to_fine",
            val_dataloaders={t: digits_loaders(t)[1] for t in seen},
            start_from=start_from,
        )
        train, val = digits_loaders(task)
        quiet(max_epochs=2, callbacks=[merging]).fit(model, train, val)
        seen.append(task)
        result = merging.result
        scores = ", ".join(f"{t}: {s['acc']:.3f}" for t, s in result.best.scores.items())
        print(f"after {task}: merged {seen} with lam={result.lam}: {scores}")

    store = TaskVectorStore(store_dir)
    dense = sum(v.numel() * 4 for v in store.base_state().values())
    sizes = {t: store.task_path(t).stat().st_size for t in store.names()}
    print(f"\nstore {store_dir}: tasks {store.names()}; bytes per task {sizes} vs {dense} for a dense float32 copy")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the store (default: temp)")
    parser.add_argument("--start-from", choices=["base", "merged"], default="base")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ties-continual-"))
    out.mkdir(parents=True, exist_ok=True)
    main(out, args.start_from)
