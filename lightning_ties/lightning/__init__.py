"""``lightning_ties.lightning``: the first name of :mod:`lightning_ties.pytorch_lightning` (the layer for ``pytorch_lightning``).

Kept so that code and ``class_path:`` entries written for 0.1 still work. It is the same
package, not a copy: every module of :mod:`lightning_ties.pytorch_lightning` is registered under
this name too, so ``lightning_ties.lightning.TiesMerging is lightning_ties.pytorch_lightning.TiesMerging``
and ``lightning_ties.lightning.learned`` is ``lightning_ties.pytorch_lightning.learned``.

Example:
    >>> import lightning_ties.lightning, lightning_ties.pytorch_lightning
    >>> lightning_ties.lightning.TiesMerging is lightning_ties.pytorch_lightning.TiesMerging
    True
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from .. import pytorch_lightning as _layer
from ..pytorch_lightning import *  # noqa: F401,F403
from ..pytorch_lightning import __all__


def _alias_submodules() -> None:
    """Register each module of the layer under this package's name (``import lightning_ties.lightning.learned``)."""
    prefix = _layer.__name__ + "."
    for info in pkgutil.walk_packages(_layer.__path__, prefix):
        module = importlib.import_module(info.name)
        alias = __name__ + "." + info.name[len(prefix):]
        sys.modules[alias] = module
        if "." not in info.name[len(prefix):]:
            globals()[info.name[len(prefix):]] = module


_alias_submodules()
