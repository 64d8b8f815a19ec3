"""io's modules import one way: no cycle (function-local imports included), no hidden imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lightning_ties.io

IO = Path(lightning_ties.io.__file__).parent


def io_imports(path: Path) -> tuple[set[str], list[str]]:
    """The io modules ``path`` imports, and the imports of our own modules made inside functions."""
    found, local = set(), []
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0 and not (node.module or "").startswith("lightning_ties"):
            continue
        if node.level == 1:  # from .x import y / from . import x, y
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found |= {n.split(".")[0] for n in names if (IO / f"{n.split('.')[0]}.py").exists()}
        if id(node) not in top_level:
            local.append(f"{path.name}:{node.lineno}")
    return found, local


def test_io_modules_form_no_cycle_and_import_nothing_of_ours_inside_functions():
    graph, local = {}, []
    for path in sorted(IO.glob("*.py")):
        graph[path.stem], inside = io_imports(path)
        local += inside
    assert local == [], f"function-local imports of lightning_ties modules: {local}"
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, "import cycle: " + " -> ".join([*stack, module])
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, [*stack, module])
            done.add(module)

    for module in graph:
        visit(module, [])
    assert "lora" not in graph["readers"] and "formats" in graph["sources"]  # the old cycle's two ends


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
