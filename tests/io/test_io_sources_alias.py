"""io's deprecated ``sources`` module: an alias that warns, and that importing io never loads.

(io's import rules, and the absence of cycles, are checked with every layer's in tests/test_layers.py.)
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import lightning_ties.io

def test_the_old_sources_module_is_a_deprecated_alias():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from lightning_ties.io.sources import open_source, SAFETENSORS_INDEX  # noqa: F401
    assert open_source is lightning_ties.io.open_source and SAFETENSORS_INDEX == "model.safetensors.index.json"
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("import open_source from lightning_ties.io" in m for m in messages)
    assert any("import SAFETENSORS_INDEX from lightning_ties.io.hf_folder" in m for m in messages)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        from lightning_ties.io import sources

        sources.nope  # noqa: B018


def test_importing_io_does_not_load_the_deprecated_alias_nor_lightning():
    code = (
        "import sys, lightning_ties.io; "
        "print(sorted(m for m in ('lightning_ties.io.sources', 'lightning', 'pytorch_lightning', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
