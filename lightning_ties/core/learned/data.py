"""Hold-out data: the part of each task's loader kept aside to pick the final coefficients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset


def holdout_indices(n: int, fraction: float, seed: int, labels: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """``(fit, hold)``: disjoint index lists covering ``range(n)``, ``round(n * fraction)`` held out.

    The same ``seed`` gives the same split. With ``labels`` the split is stratified: examples are
    shuffled, grouped by label and every ``n / n_hold``-th one is held out, so each class keeps its
    share of the hold-out to within one example (a small class is not left out of it by chance).

    Example:
        >>> fit, hold = holdout_indices(8, 0.25, seed=0, labels=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
        >>> len(hold), sorted(int(i) // 4 for i in hold)  # one example of each class
        (2, [0, 1])
    """
    n_hold = int(round(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if labels is not None:
        order = order[torch.argsort(labels[order], stable=True)]  # by class, shuffled within each
    picks = {int((j + 0.5) * n / n_hold) for j in range(n_hold)} if n_hold else set()
    hold = sorted(int(order[p]) for p in picks)
    held = set(hold)
    return [i for i in order.tolist() if i not in held], hold


def cheap_labels(dataset: Dataset) -> torch.Tensor | None:
    """The integer class labels of a dataset when they are at hand without reading its examples.

    A :class:`~torch.utils.data.TensorDataset`'s last tensor (of two or more), or a ``targets`` /
    ``labels`` attribute (torchvision's convention), when it holds one integer per example; else None.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset):
        found: Any = dataset.tensors[-1] if len(dataset.tensors) > 1 else None
    else:
        found = getattr(dataset, "targets", getattr(dataset, "labels", None))
    try:
        labels = torch.as_tensor(found) if found is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None  # not a sequence of numbers: no stratification
    if labels is None or labels.dim() != 1 or len(labels) != n or labels.is_floating_point() or labels.dtype == torch.bool:
        return None
    return labels


def split_holdout(loader: DataLoader, fraction: float, seed: int, task: str) -> tuple[DataLoader, DataLoader]:
    """Two loaders over disjoint parts of ``loader``'s dataset: the fit part (shuffled) and the hold-out.

    Stratified by class when the labels are at hand (:func:`cheap_labels`); deterministic in ``seed``.
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        raise ValueError(
            f"task {task!r}: cannot hold out part of a loader over an iterable dataset or with a batch "
            "sampler; pass holdout= as a dict of loaders (or holdout=0)"
        )
    n = len(loader.dataset)  # type: ignore[arg-type]
    n_hold = int(round(n * fraction))
    if n_hold < 1 or n - n_hold < 1:
        raise ValueError(f"task {task!r}: {n} examples cannot be split with holdout={fraction}; add data or change it")
    fit_idx, hold_idx = holdout_indices(n, fraction, seed, cheap_labels(loader.dataset))
    common = dict(batch_size=loader.batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                  pin_memory=loader.pin_memory)
    fit = DataLoader(Subset(loader.dataset, sorted(fit_idx)), shuffle=True, drop_last=loader.drop_last,
                     generator=torch.Generator().manual_seed(seed), **common)
    return fit, DataLoader(Subset(loader.dataset, hold_idx), shuffle=False, **common)


def split_loaders(loaders: dict[str, DataLoader], holdout: float | Mapping[str, DataLoader], seed: int,
                  tasks: Sequence[str]) -> tuple[dict[str, DataLoader], dict[str, DataLoader]]:
    """``(fit, hold-out)`` loaders per task: ``holdout`` a fraction of each task's data
    (:func:`split_holdout`), separate hold-out loaders (the fit keeps all of ``loaders``), or 0 (none)."""
    if isinstance(holdout, Mapping):
        return loaders, check_loaders(holdout, tasks, "holdout")
    if holdout == 0:
        return loaders, {}
    split = {t: split_holdout(dl, float(holdout), seed, t) for t, dl in loaders.items()}
    return {t: fit for t, (fit, _) in split.items()}, {t: hold for t, (_, hold) in split.items()}


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


__all__ = ["cheap_labels", "check_loaders", "holdout_indices", "split_holdout", "split_loaders"]
