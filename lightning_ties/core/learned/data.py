"""Hold-out data: the part of each task's loader kept aside to pick the final coefficients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, random_split


def split_holdout(loader: DataLoader, fraction: float, seed: int, task: str) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint random parts of ``loader``'s dataset (fit part shuffled)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ValueError(
            f"task {task!r}: cannot hold out part of a loader over an iterable dataset or with a batch "
            "sampler; pass holdout= as a dict of loaders (or holdout=0)"
        )
    n = len(loader.dataset)  # type: ignore[arg-type]
    n_hold = int(round(n * fraction))
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"task {task!r}: {n} examples cannot be split with holdout={fraction}; add data or change it")
    fit_part, hold_part = random_split(loader.dataset, [n - n_hold, n_hold], generator=torch.Generator().manual_seed(seed))
    common = dict(batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                  pin_memory=loader.pin_memory)
    fit = DataLoader(fit_part, shuffle=True, drop_last=loader.drop_last,
                     generator=torch.Generator().manual_seed(seed), **common)
    return fit, DataLoader(hold_part, shuffle=False, **common)


def check_loaders(loaders: Any, tasks: Sequence[str], what: str) -> dict[str, DataLoader]:
    if not isinstance(loaders, Mapping) or not loaders:
        raise ValueError(f"no {what}: pass a dict task name -> DataLoader for the tasks {list(tasks)}")
    unknown = [t for t in loaders if t not in tasks]
    if unknown:
        raise ValueError(f"{what} for unknown task(s) {unknown}; the tasks are {list(tasks)}")
    for t, dl in loaders.items():
        if not isinstance(dl, DataLoader):
            raise TypeError(f"{what}[{t!r}] must be a torch DataLoader, got {type(dl).__name__}")
        if not isinstance(dl.dataset, IterableDataset) and len(dl.dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{what}[{t!r}] is empty: the task has no data to learn coefficients from")
    return dict(loaders)


__all__ = ["check_loaders", "split_holdout"]
