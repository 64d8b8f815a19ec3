"""No training in the merge: merge existing checkpoints, evaluate, and search k and lam.

The user story of MultiTaskMergeModule, on scikit-learn's digits (CPU, well under a minute). The
script first makes the checkpoints a user would already have (a pretrained MLP, and three
fine-tuned copies: a = is the digit even, b = is it < 5, c = digit mod 3), then:

    module = MultiTaskMergeModule(base="pretrained.safetensors", tasks={...}, model=DigitsNet(), heads=...)
    trainer.validate(module, dataloaders={"a": val_a, "b": val_b, "c": val_c})   # the default merge
    best = module.search(trainer, dataloaders=..., k=[0.1, 0.2, 0.3], lam="paper")

Metrics are logged per task (``merge/<task>/acc``), averaged (``merge/mean/acc``) and normalized by
each fine-tuned model's own score, to the Trainer's CSV logger in ``--out``.

Run: ``python examples/merge_and_search.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ties import MultiTaskMergeModule, save_safetensors

TASKS = {"a": lambda d: d % 2, "b": lambda d: (d < 5).long(), "c": lambda d: d % 3}
CLASSES = {"a": 2, "b": 2, "c": 3}


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
    return pl.Trainer(accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **{"logger": False, **kwargs})


def make_checkpoints(out: Path) -> dict[str, Path]:
    """What a user would already have: a pretrained model and three fine-tuned ones, on disk."""
    torch.manual_seed(0)
    pretrained = DigitsNet(10)
    quiet(max_epochs=1).fit(pretrained, digits_loaders(None)[0])
    paths = {"base": save_safetensors(pretrained, out / "pretrained.safetensors")}
    for task in TASKS:
        torch.manual_seed(1)
        model = DigitsNet(CLASSES[task])
        model.load_state_dict({k: v for k, v in pretrained.state_dict().items() if k.startswith("body.")},
                              strict=False)
        quiet(max_epochs=2).fit(model, digits_loaders(task)[0])
        paths[task] = save_safetensors(model, out / f"{task}.safetensors")
    return paths


def main(out: Path) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    paths = make_checkpoints(out)
    val = {task: digits_loaders(task)[1] for task in TASKS}

    module = MultiTaskMergeModule(
        base=str(paths["base"]),
        tasks={task: str(paths[task]) for task in TASKS},
        model=DigitsNet(10),       # the architecture; its weights are replaced by the merge
        heads=r"^head\.",          # a and b have same-shaped heads: name them so they are never merged
    )
    trainer = quiet(logger=CSVLogger(out, name="logs"))
    trainer.validate(module, dataloaders=val, verbose=False)
    print(f"default merge (k=0.2, lam=1.0): {module.last_scores}")

    best = module.search(trainer, dataloaders=val, k=[0.1, 0.2, 0.3], lam="paper", strategy="coarse_to_fine")
    print(best.table)
    best.to_csv(out / "search.csv")
    best.to_json(out / "search.json")
    print(f"\nTIES: k={best.k}, lam={best.lam}, mean acc {best.best.objective:.4f}")

    baseline = module.search(trainer, dataloaders=val, method="task_arithmetic", lam="paper")
    print(f"task arithmetic: lam={baseline.lam}, mean acc {baseline.best.objective:.4f}")

    module.search(trainer, dataloaders=val, method="ties", k=best.k, lam=best.lam)  # reapply TIES's choice
    module.use_task("c")  # the merged body with task c's head
    save_safetensors(module.model, out / "merged_for_c.safetensors")
    print(f"written: {out / 'search.csv'}, {out / 'merged_for_c.safetensors'}; metrics logged in {out / 'logs'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for checkpoints and results (default: temp)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ties-search-"))
    out.mkdir(parents=True, exist_ok=True)
    main(out)
