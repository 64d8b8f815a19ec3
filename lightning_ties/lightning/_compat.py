"""The Lightning package this copy of the layer speaks: ``pytorch_lightning`` or the unified ``lightning``.

Lightning's Trainer, its ``LightningCLI`` and jsonargparse accept only subclasses of *their own
package's* ``Callback`` and ``LightningModule``: a class built on ``pytorch_lightning`` is refused
by ``lightning.pytorch.Trainer`` and the other way round. So the files of this folder are loaded
twice, once per package, without a second copy of the code:

- as ``lightning_ties.lightning.*`` they build on ``pytorch_lightning``;
- as ``lightning_ties.pytorch.*`` (a package whose ``__path__`` is this folder) on
  ``lightning.pytorch``.

Each copy imports only its own package, so ``import lightning as L`` users never load
``pytorch_lightning`` and vice versa.
"""

from __future__ import annotations

#: True in the copy loaded as ``lightning_ties.pytorch`` (the unified ``lightning`` package).
UNIFIED = __name__.startswith("lightning_ties.pytorch.")

if UNIFIED:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.callbacks import Callback, EarlyStopping
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
else:
    import pytorch_lightning as pl
    from lightning_fabric.utilities.apply_func import move_data_to_device
    from pytorch_lightning.callbacks import Callback, EarlyStopping
    from pytorch_lightning.trainer.states import TrainerFn
    from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

#: The package's import name, for messages.
PACKAGE = "lightning.pytorch" if UNIFIED else "pytorch_lightning"

__all__ = ["PACKAGE", "UNIFIED", "Callback", "EarlyStopping", "TrainerFn", "move_data_to_device", "pl",
           "rank_zero_info", "rank_zero_warn"]
