"""The engine is pure torch: importing it (or the file I/O) never pulls Lightning in."""

import subprocess
import sys


def _imports_lightning(module: str) -> bool:
    code = f"import sys, {module}; print(any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_merging_and_io_never_import_lightning() -> None:
    assert not _imports_lightning("lightning_ties.merging")
    assert not _imports_lightning("lightning_ties")  # the Lightning parts load lazily


def test_lightning_names_are_reachable_from_the_top_level() -> None:
    code = "import lightning_ties as lt; print(lt.TiesMerging.__name__, lt.MultiTaskMergeModule.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TiesMerging", "MultiTaskMergeModule"]
