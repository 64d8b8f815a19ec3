"""The demo's multitask suite: real handwritten digits (scikit-learn ships them), several tasks.

Every task reads the same 1797 8x8 digit images (``sklearn.datasets.load_digits``, no download),
through an input transform (identity, rotated, flipped, inverted...) and with its own label
function (digit identity, parity, >= 5, mod 3, closed loop). Task names are
``"<label>_<transform>"`` (``"parity_flip"``), or just ``"<label>"`` for upright digits.

The default suite asks five questions (identity, parity, >= 5, mod 3, closed loop) about the
upright digits, while the base is pretrained to tell the digits 0-4 apart only: every
fine-tune learns to tell the unseen digits 5-9 apart (a skill the tasks share, which merging
can keep) and to answer its own question (where task vectors conflict, which TIES's trim and
sign election address). The fine-tuned models clearly beat the base on their own task, so
merging has something to preserve. Transformed variants make the input domains differ too,
a harder setting where every merge keeps less.

Example:
    >>> suite = DigitsSuite(seed=0)
    >>> x, y = suite.split("parity_flip", "val")
    >>> tuple(x.shape[1:]), int(y.max()) + 1
    ((64,), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

SPLITS = ("train", "val", "test")


def _identity(img: np.ndarray) -> np.ndarray:
    return img


def _rot90(img: np.ndarray) -> np.ndarray:
    return np.rot90(img, 1, axes=(-2, -1))


def _rot180(img: np.ndarray) -> np.ndarray:
    return np.rot90(img, 2, axes=(-2, -1))


def _flip(img: np.ndarray) -> np.ndarray:
    return img[..., ::-1]


def _invert(img: np.ndarray) -> np.ndarray:
    return 1.0 - img


def _transpose(img: np.ndarray) -> np.ndarray:
    return np.swapaxes(img, -2, -1)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": _identity,
    "rot90": _rot90,
    "rot180": _rot180,
    "flip": _flip,
    "invert": _invert,
    "transpose": _transpose,
}

LABELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {
    "digit": (lambda d: d, 10),
    "parity": (lambda d: d % 2, 2),
    "ge5": (lambda d: (d >= 5).astype(np.int64), 2),
    "mod3": (lambda d: d % 3, 3),
    "loop": (lambda d: np.isin(d, (0, 4, 6, 8, 9)).astype(np.int64), 2),
}


@dataclass(frozen=True)
class DigitsTask:
    """One task of the suite: an input transform and a label function over the digits."""

    name: str
    transform: str
    label: str

    @property
    def num_classes(self) -> int:
        return LABELS[self.label][1]

    @classmethod
    def parse(cls, name: str) -> DigitsTask:
        """``"<label>_<transform>"`` (e.g. ``"parity_rot90"``), or just ``"<label>"`` for upright digits."""
        label, _, transform = name.partition("_")
        transform = transform or "identity"
        if label not in LABELS or transform not in TRANSFORMS:
            raise ValueError(
                f"unknown demo task {name!r}: use '<label>_<transform>' with label one of "
                f"{', '.join(LABELS)} and transform one of {', '.join(TRANSFORMS)}"
            )
        return cls(name, transform, label)


#: The default suite: five questions about the same upright digits, each with its own label set.
DEFAULT_TASKS = ("digit", "parity", "ge5", "mod3", "loop")
#: The pretraining task: identity of the config's ``data.source_digits`` (0-4 by default): the base never told 5-9 apart.
SOURCE_TASK = "digit"


class DigitsSuite:
    """Seeded train/val/test splits of the digits, shared by every task (same images, same split).

    Args:
        seed: seeds the split (stratified by digit).
        val_fraction, test_fraction: shares of the 1797 images held out.
        train_limit: keep at most this many training images (the reduced mode uses few).
    """

    def __init__(
        self, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.3, train_limit: int | None = None
    ) -> None:
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_limit = train_limit

    @cached_property
    def _images_and_digits(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
        return images, digits.target.astype(np.int64)

    @cached_property
    def _indices(self) -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        _, digits = self._images_and_digits
        idx = np.arange(len(digits))
        rest, test = train_test_split(idx, test_size=self.test_fraction, random_state=self.seed, stratify=digits)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=self.seed, stratify=digits[rest])
        if self.train_limit is not None:
            train = train[: self.train_limit]
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def split(
        self, task: str | DigitsTask, split: str, digits: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs [n, 64] (float32 in [0, 1]) and labels [n] of ``task`` on ``split`` (only ``digits`` if given)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        task = task if isinstance(task, DigitsTask) else DigitsTask.parse(task)
        images, all_digits = self._images_and_digits
        idx = self._indices[split]
        if digits is not None:
            idx = idx[np.isin(all_digits[idx], list(digits))]
        x = TRANSFORMS[task.transform](images[idx]).reshape(len(idx), -1)
        y = LABELS[task.label][0](all_digits[idx])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))

    def dataloader(
        self, task: str | DigitsTask, split: str, batch_size: int = 256, shuffle: bool = False
    ) -> DataLoader:
        x, y = self.split(task, split)
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def dataloaders(
    tasks: Sequence[str] = DEFAULT_TASKS,
    split: str = "val",
    seed: int = 0,
    batch_size: int = 256,
    train_limit: int | None = None,
) -> Mapping[str, DataLoader]:
    """One dataloader per task name on ``split``: the entry point search/evaluate configs name.

    Example:
        >>> loaders = dataloaders(["parity_flip"], split="test")
        >>> list(loaders)
        ['parity_flip']
    """
    suite = DigitsSuite(seed=seed, train_limit=train_limit)
    return {t: suite.dataloader(t, split, batch_size) for t in tasks}
