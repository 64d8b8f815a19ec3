"""The one place this layer imports its Lightning package (here ``lightning.pytorch``) from.

Lightning's Trainer, its ``LightningCLI`` and jsonargparse accept only subclasses of *their own*
package's ``Callback`` and ``LightningModule``, so the layer exists once per package: the source
folder ``lightning_ties/pytorch/`` (the unified ``lightning`` package) and
``lightning_ties/pytorch_lightning/``, generated from it by ``tools/mirror.py`` the way Lightning
generates ``pytorch_lightning`` from ``lightning``. Every other file of the layer imports
Lightning names from here, so the mirror only has to rename the package.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["Callback", "EarlyStopping", "TrainerFn", "pl", "rank_zero_info"]
