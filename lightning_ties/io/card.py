"""What a merged folder records about itself: the model card and ``merge_config.yaml``.

The YAML is a config of the ``lightning-ties merge`` command (its ``MergeConfig``): re-running
``lightning-ties merge <folder>/merge_config.yaml output=<another folder>`` reproduces the merge
with no edit. Its ``provenance`` section (library version, each source's files and sha256, key
counts) is informational and ignored by the command. The README states the same recipe for people.

Every card lightning-ties writes (``merge_to``, learned coefficients) is built by
:func:`build_model_card` as a ``huggingface_hub.ModelCard``: Hub metadata (``base_model``,
``library_name: lightning-ties``, ``tags``) and the sources by name, never by absolute path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..merging.sources import TensorSource
from .digests import sha256_file

#: ``library_name`` of every card we write (the Hub shows it and filters on it).
LIBRARY_NAME = "lightning-ties"
#: A Hub cache folder (``.../models--org--name/snapshots/<revision>/...``): the repo id is known.
_HUB_CACHE = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+(?:/|$)")


def source_files(source: TensorSource) -> list[Path]:
    """The files a source reads (empty for in-memory modules and state dicts)."""
    return [Path(f) for f in getattr(source, "files", []) if Path(f).is_file()]


class SourceDigests:
    """sha256 of every source file, computed in a background thread while the merge runs.

    hashlib releases the GIL on large blocks, so hashing overlaps the merge instead of
    adding to its time.
    """

    def __init__(self, sources: Sequence[TensorSource], hashes: Callable[[Path], bool] | None = None) -> None:
        """``hashes``: the files this process hashes (default: all); the others' digests come by :meth:`add`."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._futures: dict[Path, Future[str]] = {}
        self._here: list[Path] = []
        for source in sources:
            for f in source_files(source):
                if f in self._futures:
                    continue
                if hashes is None or hashes(f):
                    self._futures[f] = self._pool.submit(sha256_file, f)
                    self._here.append(f)
                else:
                    self._futures[f] = Future()
        self._pool.shutdown(wait=False)

    @property
    def files(self) -> list[Path]:
        """Every source file, in the order the sources name them."""
        return list(self._futures)

    def hashed_here(self) -> dict[Path, str]:
        """The digests this process computes (waits for them)."""
        return {f: self._futures[f].result() for f in self._here}

    def add(self, digests: Mapping[Path, str]) -> None:
        """Digests another process computed (several processes share the hashing of one merge)."""
        for f, digest in digests.items():
            if not self._futures[f].done():
                self._futures[f].set_result(digest)

    def describe(self, source: TensorSource) -> dict[str, Any]:
        """``{"source": label, "files": {name: sha256}}`` for one source (waits for its hashes)."""
        files = {str(f): self._futures[f].result() for f in source_files(source) if f in self._futures}
        return {"source": source.label, "files": files}

    def cancel(self) -> None:
        for future in self._futures.values():
            future.cancel()


SourceRecord = Mapping[str, Any]
"""One source as recorded: ``{"source": label, "files": {path: sha256}}`` (``SourceDigests.describe``)."""


def merge_config(recipe: Mapping[str, Any], relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``merge_config.yaml`` of a merge: a ``lightning-ties merge`` config that reproduces it.

    Paths: ``base`` and ``models`` are kept as the merge was given them (a relative path stays
    relative to the folder the merge ran in, as the command reads it); an in-memory model is
    named by its label (``model[0]``), which the command cannot re-read. ``output`` is left out
    (the command asks for it: ``output=<another folder>``), so the file is the same wherever the
    merge was written and a re-run never replaces the folder it reads. The
    ``provenance`` section names each source relative to ``relative_to`` (the output's parent
    folder) and each file within its source, never by an absolute local path.

    Example:
        >>> recipe = {"method": "ties", "lam": 1.0, "params": {"k": 0.2}, "library_version": "0.1.0",
        ...     "paths": {"base": "base", "models": ["ft1"]}, "options": {"prefix": None},
        ...     "sources": {"base": {"source": "/r/base", "files": {"/r/base/m.safetensors": "ab"}}, "models": []},
        ...     "counts": {"merged": 1, "from_base": 0}}
        >>> cfg = merge_config(recipe, relative_to="/r")
        >>> cfg["method"], cfg["provenance"]["sources"]["base"]
        ({'name': 'ties', 'k': 0.2, 'lam': 1.0}, {'source': 'base', 'files': {'m.safetensors': 'ab'}})
    """
    method = {"name": recipe["method"], **recipe["params"]}
    if recipe.get("lam") is not None:
        method["lam"] = recipe["lam"]

    def named(record: SourceRecord) -> dict[str, Any]:
        label = str(record["source"])
        files = {_file_name(f, label): digest for f, digest in (record.get("files") or {}).items()}
        return {"source": source_name(label, relative_to), "files": files}

    sources = recipe["sources"]
    return {
        **recipe["paths"],
        "method": method,
        **recipe["options"],
        "provenance": {
            "library_version": recipe["library_version"],
            "sources": {"base": named(sources["base"]), "models": [named(m) for m in sources["models"]]},
            "counts": dict(recipe["counts"]),
        },
    }


def write_merge_config(folder: Path, recipe: Mapping[str, Any], relative_to: str | os.PathLike[str] | None = None) -> None:
    """Write ``merge_config.yaml`` (:func:`merge_config`) into ``folder``, headed by how to re-run it."""
    head = "# re-run with: lightning-ties merge merge_config.yaml output=<another folder>\n"
    text = yaml.safe_dump(merge_config(recipe, relative_to), sort_keys=False)
    (folder / "merge_config.yaml").write_text(head + text)


def source_name(label: str, relative_to: str | os.PathLike[str] | None = None) -> str:
    """How a card names a source: a Hub repo id, a path relative to ``relative_to``, or the
    file/folder name; never an absolute local path (it means nothing on another machine).

    Example:
        >>> source_name("/home/me/runs/ft1", relative_to="/home/me/runs")
        'ft1'
        >>> source_name("/elsewhere/ft2.safetensors", relative_to="/home/me/runs")
        'ft2.safetensors'
        >>> source_name("/cache/models--google--bert-base/snapshots/abc123")
        'google/bert-base'
        >>> source_name("model[0]")  # an in-memory source keeps its label
        'model[0]'
    """
    hub = _HUB_CACHE.search(label.replace(os.sep, "/"))
    if hub:
        return hub["repo"].replace("--", "/")
    if not os.path.isabs(label):
        return label
    path = Path(os.path.normpath(label))
    if relative_to is not None:
        try:
            return path.relative_to(Path(os.path.normpath(relative_to))).as_posix()
        except ValueError:
            pass
    return path.name


def _file_name(path: str, label: str) -> str:
    """A source file named within its source (a shard inside a folder: ``model-00001-of-00002.safetensors``)."""
    if not os.path.isabs(path):  # already named within its source
        return path
    try:
        return Path(path).relative_to(Path(label)).as_posix()
    except ValueError:
        return Path(path).name


def build_model_card(
    *,
    title: str,
    method: str,
    summary: str,
    base: SourceRecord | None = None,
    models: Sequence[SourceRecord] = (),
    sections: Sequence[tuple[str, str]] = (),
    tags: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    relative_to: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """The model card of a merged model: Hub metadata, a summary, its sources and any extra sections.

    Args:
        title: the card's heading; summary: the paragraph under it (markdown).
        method: the merge method (a tag, and ``merge_method`` in the metadata).
        base, models: the sources as recorded (``{"source": label, "files": {path: sha256}}``);
            named by :func:`source_name` (relative to ``relative_to``), listed with each file's
            sha256. The base becomes ``base_model`` unless it was an in-memory model.
        sections: ``(heading, markdown)`` pairs appended in order (a coefficient table, how
            to reproduce the merge...).
        tags: tags added after ``merge``, ``lightning-ties`` and ``method``.
        metadata: more metadata fields for the card's YAML header.

    Example:
        >>> card = build_model_card(title="Merged", method="ties", summary="Two tasks.",
        ...     base={"source": "/runs/base", "files": {"/runs/base/model.safetensors": "ab12"}},
        ...     sections=[("Notes", "k=0.2")], relative_to="/runs")
        >>> card.data.base_model, card.data.library_name, card.data.tags
        ('base', 'lightning-ties', ['merge', 'lightning-ties', 'ties'])
        >>> "| base | `base` | `model.safetensors` | `ab12` |" in card.text
        True
    """
    records = ([("base", base)] if base is not None else []) + [("model", m) for m in models]
    rows, listed = [], []
    for role, record in records:
        name = source_name(str(record["source"]), relative_to)
        files = {_file_name(f, str(record["source"])): digest for f, digest in (record.get("files") or {}).items()}
        listed.append({"role": role, "name": name, "sha256": files})
        for file, digest in (files or {"(in memory)": "-"}).items():
            rows.append(f"| {role} | `{name}` | `{file}` | `{digest}` |")
    base_model = listed[0]["name"] if base is not None and listed[0]["sha256"] else None
    metadata = dict(metadata or {})
    data = ModelCardData(
        base_model=metadata.pop("base_model", base_model),  # a caller's own name beats the recorded base
        library_name=LIBRARY_NAME,
        tags=list(dict.fromkeys(["merge", LIBRARY_NAME, method, *tags])),
        merge_method=method,
        **({"sources": listed} if listed else {}),
        **metadata,
    )
    body = [f"# {title}", "", summary.strip(), ""]
    if rows:
        body += ["## Sources", "", "| role | source | file | sha256 |", "|---|---|---|---|", *rows, ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text.strip(), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def merge_model_card(recipe: Mapping[str, Any], relative_to: str | os.PathLike[str] | None = None) -> ModelCard:
    """The card ``merge_to`` writes: the recipe (method, parameters, lam), sources and how to reproduce."""
    method = recipe["method"]
    params = ", ".join(f"{k}={v!r}" for k, v in recipe["params"].items())
    reproduce = "\n".join([
        "```bash",
        "lightning-ties merge merge_config.yaml output=merged-again",
        "```",
        "",
        f"Keys merged: {recipe['counts']['merged']}; taken from base: {recipe['counts']['from_base']}.",
    ])
    return build_model_card(
        title=f"Merged model ({method})",
        method=method,
        summary=(
            f"Made with lightning-ties {recipe['library_version']} by merging {len(recipe['paths']['models'])} "
            f"fine-tuned model(s) into their base with `{method}` ({params}, lam={recipe['lam']})."
        ),
        base=recipe["sources"]["base"],
        models=recipe["sources"]["models"],
        sections=[("Reproduce", reproduce)],
        relative_to=relative_to,
    )
