"""The one place this layer imports its Lightning package from.

Lightning's Trainer, its ``LightningCLI`` and jsonargparse accept only subclasses of *their own*
package's ``Callback`` and ``LightningModule``, so the layer exists once per package:
:mod:`lightning_ties.pytorch` (this source, for the unified ``lightning.pytorch``) and
:mod:`lightning_ties.pytorch_lightning` (for ``pytorch_lightning``), generated from this folder
by ``tools/mirror.py`` the way Lightning generates ``pytorch_lightning`` from ``lightning``.
Every other file of the layer imports Lightning names from here, so the mirror only has to
rename the package in the imports.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["Callback", "EarlyStopping", "TrainerFn", "pl", "rank_zero_info"]
