"""The layers import one way: one table of rules, checked on every file's imports, and no cycle of any kind.

Every import counts: module level, inside functions and under ``TYPE_CHECKING`` (a cycle a type
checker follows is a cycle a reader follows). The rules are the ones ARCHITECTURE.md draws:

    cli, demo, config, report            the command, the demo, configs, reports
    pytorch/ (+ its mirror)              the Lightning shells: only their _compat imports Lightning
    core/                                the merge core: no Lightning
    distributed/                         ranks and shards: no Lightning
    evaluation/                          batch conventions, the accuracy, plots (written through io)
    io/                                  checkpoints in and out: merging only
    merging/                             pure torch: nothing else of ours
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_ties

PACKAGE_DIR = Path(lightning_ties.__file__).resolve().parent
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
SHELLS = ("lightning_ties.pytorch", "lightning_ties.pytorch_lightning", "lightning_ties.lightning")


def _module_name(path: Path) -> str:
    parts = ("lightning_ties", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports (module level, in functions, under TYPE_CHECKING), relative ones resolved.

    ``from package import name`` counts as importing ``package.name`` too (it may be a module).
    """
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def all_files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _ours(name: str, modules: set[str]) -> str | None:
    """The module of ours ``name`` is (or lies in), or None for third-party names and attributes."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


#: (layer, what it must not import). Names are module prefixes; "LIGHTNING" is the Lightning packages.
RULES = [
    ("lightning_ties.merging", ("lightning_ties.io", "lightning_ties.core", "lightning_ties.evaluation",
                                "lightning_ties.distributed", *SHELLS, "lightning_ties.cli", "lightning_ties.demo",
                                "lightning_ties.config", "lightning_ties.report", "LIGHTNING")),
    ("lightning_ties.io", ("lightning_ties.core", "lightning_ties.evaluation", *SHELLS, "lightning_ties.cli",
                           "lightning_ties.demo", "lightning_ties.config", "lightning_ties.report", "LIGHTNING")),
    ("lightning_ties.evaluation", ("lightning_ties.core", "lightning_ties.distributed", *SHELLS, "lightning_ties.cli",
                                   "lightning_ties.demo", "lightning_ties.config", "lightning_ties.report",
                                   "LIGHTNING")),
    ("lightning_ties.distributed", ("lightning_ties.core", *SHELLS, "lightning_ties.cli", "lightning_ties.demo",
                                    "lightning_ties.config", "lightning_ties.report", "LIGHTNING")),
    ("lightning_ties.core", (*SHELLS, "lightning_ties.cli", "lightning_ties.demo", "lightning_ties.config",
                             "lightning_ties.report", "LIGHTNING")),
    ("lightning_ties.pytorch", ("lightning_ties.pytorch_lightning", "lightning_ties.lightning", "lightning_ties.cli",
                                "lightning_ties.demo", "lightning_ties.config", "lightning_ties.report")),
    ("lightning_ties.pytorch_lightning", ("lightning_ties.pytorch", "lightning_ties.lightning", "lightning_ties.cli",
                                          "lightning_ties.demo", "lightning_ties.config", "lightning_ties.report")),
    ("lightning_ties.demo", ("lightning_ties.cli",)),
    ("lightning_ties.config", ("lightning_ties.cli", "lightning_ties.demo")),
    ("lightning_ties.report", ("lightning_ties.cli", "lightning_ties.demo")),
]


def _offences(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    files = all_files()
    out = []
    for module, path in files.items():
        if not _in(module, (layer,)):
            continue
        for line, name in imported_modules(path, module):
            lightning = "LIGHTNING" in forbidden and name.split(".")[0] in LIGHTNING
            ours = _ours(name, set(files))
            if lightning or (ours is not None and _in(ours, tuple(f for f in forbidden if f != "LIGHTNING"))):
                out.append(f"{path.relative_to(PACKAGE_DIR)}:{line} imports {name}")
    return out


@pytest.mark.parametrize(("layer", "forbidden"), RULES, ids=[layer.split(".")[-1] for layer, _ in RULES])
def test_each_layer_imports_only_what_lies_below_it(layer: str, forbidden: tuple[str, ...]) -> None:
    assert _offences(layer, forbidden) == []


def test_only_the_shells_compat_imports_lightning_and_only_the_shells_import_compat() -> None:
    files = all_files()
    offences = []
    for module, path in files.items():
        for line, name in imported_modules(path, module):
            compat = name.endswith("._compat") or "._compat." in name
            in_shell = _in(module, SHELLS[:2])
            if compat and not in_shell:
                offences.append(f"{module}:{line} imports {name} (only the Lightning shells use _compat)")
            lightning = name.split(".")[0] in LIGHTNING
            if lightning and in_shell and not module.endswith("._compat"):
                offences.append(f"{module}:{line} imports {name} (the shells import Lightning through _compat)")
    assert offences == []


def test_no_import_cycle_of_any_kind() -> None:
    files = all_files()
    modules = set(files)
    graph = {
        m: {o for _, n in imported_modules(p, m) if (o := _ours(n, modules)) is not None and o != m}
        for m, p in files.items()
    }
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        assert module not in stack, "import cycle: " + " -> ".join([*stack[stack.index(module):], module])
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            if not _is_parent(dep, module):  # a package's __init__ importing its own modules is no cycle
                visit(dep, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def _is_parent(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def test_the_scanner_sees_relative_local_and_type_checking_imports(tmp_path: Path) -> None:
    # guard for the tests above: they must see what a sneaky import looks like
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nfrom .steps import trim\nif TYPE_CHECKING:\n    from ..core import merger\n"
        "def f():\n    from ..io import open_source\n"
    )
    found = [name for _, name in imported_modules(src, "lightning_ties.merging.m")]
    assert found == ["typing", "typing.TYPE_CHECKING", "lightning_ties.merging.steps", "lightning_ties.merging.steps.trim",
                     "lightning_ties.core", "lightning_ties.core.merger", "lightning_ties.io",
                     "lightning_ties.io.open_source"]


def _loaded_after_import(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys; {code}; print('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("module", [
    "lightning_ties", "lightning_ties.merging", "lightning_ties.io", "lightning_ties.evaluation",
    "lightning_ties.core.merger", "lightning_ties.core.learned.result", "lightning_ties.demo.models",
])
def test_importing_a_layer_below_the_shells_loads_no_lightning(module: str) -> None:
    loaded = _loaded_after_import(f"import {module}")
    assert [m for m in loaded if m.split(".")[0] in LIGHTNING] == []
    assert [m for m in loaded if _in(m, SHELLS)] == []


def test_importing_merging_loads_nothing_else_of_ours() -> None:
    loaded = _loaded_after_import("import lightning_ties.merging")
    assert [m for m in loaded if m.startswith("lightning_ties.") and not m.startswith("lightning_ties.merging")] == []


def test_lightning_names_are_reachable_from_the_top_level() -> None:
    code = "import lightning_ties as lt; print(lt.TiesMerging.__name__, lt.MultiTaskMergeModule.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["TiesMerging", "MultiTaskMergeModule"]


@pytest.mark.parametrize("layer", ["core", "pytorch", "pytorch_lightning", "evaluation", "demo"])
def test_modules_and_classes_of_the_merge_core_and_its_shells_stay_readable(layer: str) -> None:
    # the bar: no module over 500 lines, no class over 350 (the two largest were 726 and 578)
    too_big = []
    for path in sorted((PACKAGE_DIR / layer).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            too_big.append(f"{path.relative_to(PACKAGE_DIR)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 350:
                too_big.append(f"{path.relative_to(PACKAGE_DIR)}: class {node.name} {node.end_lineno - node.lineno + 1}")
    assert too_big == []
