"""One ownership rule for every output: replace only what our manifest lists, unchanged.

Every folder lightning-ties writes into holds a manifest, ``.lightning-ties.json``::

    {"lightning_ties": "<version>", "files": {"merged.safetensors": {"size": 123, "sha256": "..."}}}

* a file output (``merged.safetensors``, ``results.csv``, a ``config.yaml`` sidecar...) is
  recorded in the manifest of the folder it is written into;
* a folder output (a Hugging Face folder, learned results) holds its own manifest, listing every
  file inside it (relative paths).

An existing path may be replaced only when it is ours: a file listed by its folder's manifest
with the same size and sha256, or a folder whose own manifest lists every file it holds with
the same size and sha256. Anything else in the way (a user's file, a file of ours edited or
renamed, a folder holding one more file) is refused, before any work where the entry point
checks first (:func:`check_output`, :func:`check_writable`) and again under the output's lock
just before the new version is renamed in. Names, metadata keys and file layouts prove nothing.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "notes.txt").write_text("mine")
    >>> foreign_reason(folder / "notes.txt", "file") is not None
    True
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from .digests import file_identity, hash_range
from .errors import UnsafeOutputError
from .jsonsafe import JSONNestingError, loads
from .locks import locked
from .tempfiles import LOCK_SUFFIX, TEMP, create_temp_file, fsync_dir

#: The manifest file of a folder lightning-ties writes into.
MANIFEST = ".lightning-ties.json"
#: The top-level key of a manifest (and of single-file metadata, informational only).
OWNER_KEY = "lightning_ties"
Kind = Literal["file", "folder"]


def library_version() -> str:
    """The installed lightning-ties version (``"unknown"`` when run from a source tree)."""
    try:
        return importlib.metadata.version("lightning-ties")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Digests computed in this process, by the file's identity and change times: an unchanged file is
# hashed once however often it is checked (before the work, then under the lock). Any write,
# truncation or rename-over changes the ctime (a kernel-set clock the user cannot set back).
_DIGESTS: dict[tuple[int, ...], dict[str, Any]] = {}


def digest(path: str | os.PathLike[str] | int) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file (a path, or a descriptor read from offset 0).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(b"abc")
        >>> digest(p)["size"], digest(p)["sha256"][:8]
        (3, 'ba7816bf')
    """
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        key = file_identity(fd)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            hash_range(fd, h, 0, key[2])
            _remember(key, {"size": key[2], "sha256": h.hexdigest()})
        return dict(_DIGESTS[key])
    finally:
        if not isinstance(path, int):
            os.close(fd)


def _remember(key: tuple[int, ...], entry: dict[str, Any]) -> None:
    if len(_DIGESTS) > 4096:
        _DIGESTS.clear()
    _DIGESTS[key] = entry


def remember_digest(path: Path, sha256: str) -> None:
    """Record the sha256 of ``path`` as it is now, computed elsewhere (another rank hashed it).

    :func:`digest` then returns it without reading the file, until the file changes (its
    identity, size and change times are the key, as for the digests computed here).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        key = file_identity(fd)
        _remember(key, {"size": key[2], "sha256": sha256})
    finally:
        os.close(fd)


def _ours_only(name: str) -> bool:
    """Our own bookkeeping inside a folder: the manifest, temporaries and lock files."""
    return name == MANIFEST or TEMP.fullmatch(name) is not None or name.endswith(LOCK_SUFFIX)


def refuse_reserved_name(path: Path) -> None:
    """Refuse an output named as our bookkeeping: a manifest, temporary or lock file of that name would be clobbered
    by it, or (the manifest's lock is the output's lock) wait on itself for ever.

    Example:
        >>> refuse_reserved_name(Path("out/.lightning-ties.json"))
        Traceback (most recent call last):
        ...
        lightning_ties.io.errors.UnsafeOutputError: cannot write out/.lightning-ties.json: lightning-ties keeps the name '.lightning-ties.json' for its own bookkeeping (manifests, temporaries, locks); choose another name
    """
    if _ours_only(path.name):
        raise UnsafeOutputError(
            f"cannot write {path}: lightning-ties keeps the name {path.name!r} for its own bookkeeping (manifests, "
            "temporaries, locks); choose another name"
        )


# ---- reading and writing manifests -----------------------------------------------------------------
class ManifestError(UnsafeOutputError):
    """A ``.lightning-ties.json`` exists but is not a manifest we can read (named in the message)."""


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The files a folder's manifest lists (``{}`` when it has none); refuses an unreadable one."""
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{path} is not a regular file; move it away (lightning-ties keeps its manifest there)")
    try:
        data = loads(path.read_bytes(), str(path))
    except (OSError, ValueError, JSONNestingError) as err:
        raise ManifestError(f"{path} is not a readable lightning-ties manifest ({err}); move it away") from None
    files = data.get("files") if isinstance(data, dict) and OWNER_KEY in data else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values()
    ):
        raise ManifestError(
            f"{path} is not a lightning-ties manifest with content hashes (an earlier version's marker, or "
            "another tool's file); lightning-ties no longer treats that folder's files as its own: move them away"
        )
    return files


def _write_manifest(folder: Path, files: Mapping[str, Any]) -> None:
    text = json.dumps({OWNER_KEY: library_version(), "files": dict(sorted(files.items()))}, indent=1) + "\n"
    tmp, fd = create_temp_file(folder / MANIFEST)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder_manifest(folder: Path) -> None:
    """List every file under ``folder`` (size and sha256) in its manifest (a new folder output)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if rel != MANIFEST:
                files[rel] = digest(full)
    _write_manifest(folder, files)


def record(path: Path, entry: Mapping[str, Any]) -> None:
    """Add a file just written (``entry``: its :func:`digest`) to its folder's manifest."""
    folder = path.parent
    with locked(folder / MANIFEST, wait=True):  # two writers into one folder: both entries stay
        files = read_manifest(folder)
        files[path.name] = dict(entry)
        _write_manifest(folder, files)
    fsync_dir(folder)


# ---- the rule ----------------------------------------------------------------------------------------
def _file_reason(path: Path) -> str | None:
    listed = read_manifest(path.parent).get(path.name)
    if listed is None:
        return f"was not written by lightning-ties (not listed in {path.parent / MANIFEST})"
    if os.path.islink(path):
        return "is a symbolic link (lightning-ties writes plain files)"
    now = digest(path)
    if now != {"size": listed["size"], "sha256": listed["sha256"]}:
        return f"was changed since lightning-ties wrote it (size or sha256 differ from {path.parent / MANIFEST})"
    return None


def _folder_reason(folder: Path) -> str | None:
    if not (folder / MANIFEST).exists():
        return f"was not written by lightning-ties (no {MANIFEST} manifest)"
    listed = read_manifest(folder)
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = Path(root) / name
            rel = full.relative_to(folder).as_posix()
            if root == str(folder) and _ours_only(name):
                continue
            entry = listed.get(rel)
            if entry is None or os.path.islink(full):
                return f"holds files lightning-ties did not write there: {full}"
            if digest(full) != {"size": entry["size"], "sha256": entry["sha256"]}:
                return f"holds {full}, changed since lightning-ties wrote it (size or sha256 differ)"
    return None


def foreign_reason(path: Path, kind: Kind | None = None) -> str | None:
    """Why the existing ``path`` may not be replaced (None: it is ours, unchanged, of the right kind)."""
    if path.is_dir() and not path.is_symlink():
        return "is a folder (this output is a single file)" if kind == "file" else _folder_reason(path)
    if kind == "folder":
        return "is a file (this output is a folder)"
    return _file_reason(path)


def refuse_unless_replaceable(path: Path, overwrite: bool, kind: Kind | None) -> None:
    """Raise unless ``path`` is absent, or ours and ``overwrite`` (the rule, one existing path)."""
    if not os.path.lexists(path):
        return
    reason = foreign_reason(path, kind)
    if reason is not None:
        raise FileExistsError(
            f"{path} already exists and {reason}; lightning-ties replaces only its own unchanged outputs, even "
            "with overwrite=True. Choose another output path, or move it away yourself"
        )
    if not overwrite:
        raise FileExistsError(f"{path} already exists (an earlier lightning-ties output); pass overwrite=True to replace it")


# ---- what may be written where ----------------------------------------------------------------------
def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_an_input(output: str | os.PathLike[str], inputs: Iterable[object]) -> None:
    """Refuse an output that is an input, a folder containing one, or lies inside an input folder.

    Symlinks are resolved and hard links compared by inode. Inputs that are not paths
    (modules, state dicts) are ignored.
    """
    out = Path(output).resolve()
    for inp in inputs:
        if not isinstance(inp, (str, os.PathLike)):
            continue
        src = Path(inp)
        real = src.resolve()
        if out == real or _same_file(out, real):
            why = "is the input"
        elif out in real.parents:
            why = "is a folder that contains the input"
        elif real.is_dir() and real in out.parents:
            why = "lies inside the input folder"
        else:
            continue
        raise UnsafeOutputError(
            f"output {output} {why} {src}: writing it would destroy the input. Choose an output path outside every input"
        )


def check_output(
    path: str | os.PathLike[str], overwrite: bool, inputs: Iterable[object] = (), kind: Kind | None = None
) -> Path:
    """Check an output path before any work; returns it as a ``Path``.

    Refuses (:class:`UnsafeOutputError`) an output that is, contains or lies inside one of
    ``inputs``; a missing parent folder is fine (the atomic writers create it);
    refuses (``FileExistsError``) an existing path that is not ours and unchanged (see the module
    docstring), and an existing output of ours unless ``overwrite``.

    Example:
        >>> import tempfile
        >>> check_output(Path(tempfile.mkdtemp()) / "m.safetensors", overwrite=False).name
        'm.safetensors'
    """
    path = Path(path)
    check_not_an_input(path, inputs)
    check_writable(path, overwrite, kind)  # a missing parent folder is created when the output is written
    return path


def check_writable(path: str | os.PathLike[str], overwrite: bool = True, kind: Kind | None = None) -> Path:
    """The check for an output written later (the callback's ``save_dir`` files, a run's reports).

    Same rule as :func:`check_output` without inputs; a missing parent folder is fine (it is
    created when written).

    Example:
        >>> import tempfile
        >>> check_writable(Path(tempfile.mkdtemp()) / "new" / "search.json").name
        'search.json'
    """
    path = Path(path)
    refuse_reserved_name(path)
    # exists-but-not-a-folder first: another rank may create the folder between two checks,
    # and a folder seen missing and then present is fine (asked the other way round it is not)
    if os.path.lexists(path.parent) and not path.parent.is_dir():
        raise UnsafeOutputError(f"cannot write {path}: {path.parent} exists and is not a folder")
    if path.parent.is_dir():
        read_manifest(path.parent)
        refuse_unless_replaceable(path, overwrite, kind)
    return path


def check_folder_outputs(folder: str | os.PathLike[str], names: Iterable[str], overwrite: bool = True) -> Path:
    """:func:`check_writable` for each file ``names`` a run will write into ``folder``.

    Example:
        >>> import tempfile
        >>> check_folder_outputs(tempfile.mkdtemp(), ["merged.ckpt", "search.json"]).is_dir()
        True
    """
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise UnsafeOutputError(f"{folder} is a file; give a folder for the outputs")
    for name in names:
        check_writable(folder / name, overwrite)
    return folder


__all__ = [
    "MANIFEST",
    "ManifestError",
    "OWNER_KEY",
    "check_folder_outputs",
    "check_not_an_input",
    "check_output",
    "check_writable",
    "digest",
    "foreign_reason",
    "library_version",
    "read_manifest",
    "record",
    "refuse_reserved_name",
    "refuse_unless_replaceable",
    "write_folder_manifest",
]
