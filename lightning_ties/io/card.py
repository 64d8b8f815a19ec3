"""What a merged folder records about itself: the model card and ``merge_config.yaml``.

The YAML holds the arguments of :func:`lightning_ties.io.merge_to` (so
``merge_to(out, **yaml.safe_load(f)["merge"])`` reproduces the merge), plus each source's
sha256 and the library version; the README states the same recipe for people.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from ..merging.sources import TensorSource

_HASH_BLOCK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/f"
        >>> _ = open(path, "wb").write(b"abc")
        >>> sha256_file(path)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def source_files(source: TensorSource) -> list[Path]:
    """The files a source reads (empty for in-memory modules and state dicts)."""
    return [Path(f) for f in getattr(source, "files", []) if Path(f).is_file()]


class SourceDigests:
    """sha256 of every source file, computed in a background thread while the merge runs.

    hashlib releases the GIL on large blocks, so hashing overlaps the merge instead of
    adding to its time.
    """

    def __init__(self, sources: Sequence[TensorSource]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._futures: dict[Path, Future[str]] = {}
        for source in sources:
            for f in source_files(source):
                if f not in self._futures:
                    self._futures[f] = self._pool.submit(sha256_file, f)
        self._pool.shutdown(wait=False)

    def describe(self, source: TensorSource) -> dict[str, Any]:
        """``{"source": label, "files": {name: sha256}}`` for one source (waits for its hashes)."""
        files = {str(f): self._futures[f].result() for f in source_files(source) if f in self._futures}
        return {"source": source.label, "files": files}

    def cancel(self) -> None:
        for future in self._futures.values():
            future.cancel()


def library_version() -> str:
    return importlib.metadata.version("lightning-ties")


def write_merge_config(folder: Path, recipe: dict[str, Any]) -> None:
    (folder / "merge_config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def write_model_card(folder: Path, recipe: dict[str, Any]) -> None:
    merge = recipe["merge"]
    params = ", ".join(f"{k}={v!r}" for k, v in recipe["params"].items())
    lines = [
        "---",
        "tags:",
        "- merge",
        "- lightning-ties",
        "---",
        "",
        f"# Merged model ({merge['method']})",
        "",
        f"Made with lightning-ties {recipe['library_version']} by merging {len(merge['models'])} fine-tuned "
        f"model(s) into their base with `{merge['method']}` ({params}, lam={merge['lam']}).",
        "",
        "## Sources",
        "",
        "| role | source | file | sha256 |",
        "|---|---|---|---|",
    ]
    for role, entry in [("base", recipe["sources"]["base"])] + [("model", e) for e in recipe["sources"]["models"]]:
        files = entry["files"] or {"(in memory)": "-"}
        for name, digest in files.items():
            lines.append(f"| {role} | `{entry['source']}` | `{Path(name).name}` | `{digest}` |")
    lines += [
        "",
        "## Reproduce",
        "",
        "```python",
        "import yaml",
        "from lightning_ties import merge_to",
        "",
        'merge_to("merged", **yaml.safe_load(open("merge_config.yaml"))["merge"])',
        "```",
        "",
        f"Keys merged: {recipe['counts']['merged']}; taken from base: {recipe['counts']['from_base']}.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
