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


# ---- merging is the bottom layer: it imports nothing else of ours ------------------------------
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning_ties  # noqa: E402

PACKAGE_DIR = Path(lightning_ties.__file__).parent


def _loaded_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_merging_loads_nothing_else_of_ours_and_no_lightning() -> None:
    loaded = _loaded_after_import("lightning_ties.merging")
    ours = [m for m in loaded if m.startswith("lightning_ties.") and not m.startswith("lightning_ties.merging")]
    assert ours == [], f"importing lightning_ties.merging also loaded {ours}"
    lightning = [m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")]
    assert lightning == []


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module a file imports (module level and inside functions), relative imports resolved.

    ``package`` is the file's own package (``lightning_ties.merging``); ``from . import x``
    counts as importing ``package.x``.
    """
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
            if not node.module:
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_imported_modules_resolves_relative_and_function_local_imports(tmp_path: Path) -> None:
    # guard for the test below: it must see what a sneaky import looks like
    src = tmp_path / "m.py"
    src.write_text("from .steps import trim\ndef f():\n    from ..io import open_source\n    from .. import cli\n")
    found = [name for _, name in imported_modules(src, "lightning_ties.merging")]
    assert found == ["lightning_ties.merging.steps", "lightning_ties.io", "lightning_ties", "lightning_ties.cli"]


def test_no_module_of_merging_imports_another_layer() -> None:
    forbidden = ("io", "lightning", "pytorch", "cli", "demo", "evaluation", "config", "report")
    offences = []
    for path in sorted((PACKAGE_DIR / "merging").rglob("*.py")):
        package = ".".join(("lightning_ties", *path.relative_to(PACKAGE_DIR).parent.parts))
        for line, name in imported_modules(path, package):
            parts = name.split(".")
            ours_elsewhere = parts[0] == "lightning_ties" and len(parts) > 1 and parts[1] in forbidden
            if ours_elsewhere or parts[0] in ("lightning", "pytorch_lightning"):
                offences.append(f"{path.relative_to(PACKAGE_DIR)}:{line} imports {name}")
    assert offences == []


def test_config_and_report_import_neither_the_demo_nor_the_command() -> None:
    # config.py and report.py sit below cli/ and demo/ (the demo reads its config): no cycle
    offences = []
    for name in ("config.py", "report.py"):
        for line, imported in imported_modules(PACKAGE_DIR / name, "lightning_ties"):
            if imported.startswith(("lightning_ties.demo", "lightning_ties.cli")):
                offences.append(f"{name}:{line} imports {imported}")
    assert offences == []
