"""lightning-ties: TIES-Merging for PyTorch Lightning.

Example:
    >>> import torch
    >>> from lightning_ties import ties_merge
    >>> base = {"w": torch.zeros(5)}
    >>> ties_merge(base, [{"w": torch.tensor([1.0, -2.0, 0.0, 3.0, 0.5])}], k=0.4)["w"].tolist()
    [0.0, -2.0, 0.0, 3.0, 0.0]
"""

from .merging import *  # noqa: F401,F403
from .merging import __all__ as _merging_all

__version__ = "0.1.0"
__all__ = [*_merging_all, "__version__"]
