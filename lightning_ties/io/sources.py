"""Deprecated alias of :mod:`lightning_ties.io.readers` and :mod:`lightning_ties.io.formats`.

The module was renamed because ``lightning_ties.merging.sources`` (the ``TensorSource``
protocol) has the same name. Every name it had still resolves here, with a
``DeprecationWarning`` saying where it lives now.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from . import formats, hf_folder, readers

# Old name -> the module that holds it now.
_MOVED = {
    **{name: readers for name in (
        "AUTO_PREFIX", "SafetensorsSource", "TorchFileSource", "load_torch_file", "open_torch_file", "split_prefix",
    )},
    **{name: formats for name in ("open_folder", "open_source")},
    **{name: hf_folder for name in (
        "ADAPTER_CONFIG", "BIN_INDEX", "BIN_SINGLE", "SAFETENSORS_INDEX", "SAFETENSORS_SINGLE",
    )},
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    package = sys.modules[__package__]  # initialised before any of its modules
    where = package.__name__ if name in package.__all__ else module.__name__
    warnings.warn(
        f"lightning_ties.io.sources is deprecated (renamed to lightning_ties.io.readers and .formats): "
        f"import {name} from {where}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
