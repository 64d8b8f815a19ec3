"""Safe outputs: never over an input or a foreign file, written beside the target and renamed in.

Writing:
    A file or folder is written to a temporary sibling named
    ``.<name>.lightning-ties-<host>-<pid>-<random>.tmp`` (same filesystem, so the final rename
    is atomic), fsynced, then renamed over the target. Any exception removes the temporary;
    OS errors (disk full, file size limit, permissions) and torch's zip-writer errors become one
    :class:`OutputWriteError` naming the target. Permissions follow the umask (``0o666``/``0o777``
    masked, as ``open``/``mkdir`` do; ``mkstemp`` would force ``0o600``).

    An existing folder is replaced with one atomic ``renameat2(RENAME_EXCHANGE)`` where the
    kernel and filesystem support it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs...): the target
    path always holds a complete version. Elsewhere the old folder is renamed aside
    (``.<name>.lightning-ties-...old``) only once the new one is complete, the new one renamed
    in, and the old one renamed back if that fails.

Killed runs:
    A run killed with SIGKILL leaves its temporary behind. The next write at the same path
    (:func:`clean_stale`, called by every writer here and by :func:`check_output`) removes the
    temporaries of dead processes on this host, and renames a ``.old`` folder back when the
    target is missing (a kill between the two renames of the fallback).

Ownership:
    Every folder written by :func:`atomic_dir` holds a marker file (``.lightning-ties.json``,
    listing the files written); single files carry ``{"lightning_ties": <version>}`` (safetensors
    metadata, or a top-level key of a ``.ckpt``). :func:`check_output` refuses to replace anything
    without that marker, or a folder holding files the marker does not list, even with
    ``overwrite=True``, and refuses any output that is, contains, or lies inside an input.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import socket
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import CheckpointError, OutputWriteError, UnsafeOutputError
from .safetensors_file import SafetensorsFile

#: The marker file written into every output folder.
MARKER = ".lightning-ties.json"
#: The key marking a single-file output (safetensors metadata, or a top-level ``.ckpt`` key).
OWNER_KEY = "lightning_ties"
#: Files lightning-ties writes into its own output folders after the fact (the command's
#: resolved config), which the marker cannot list.
WRITTEN_AFTER = ("config.yaml",)
# Metadata keys of single files written by earlier versions (before OWNER_KEY existed).
_LEGACY_FILE_KEYS = ("merge_method", "lightning_ties.learned")
# What folders written by earlier versions (recognised by merge_config.yaml with a
# library_version, or learned_merge.json) could hold: weights, index, config, tokenizer, card.
_LEGACY_FOLDER_FILES = re.compile(r"[^/]+\.(safetensors|json|yaml|md|txt|model|jinja)")
_TAG = "lightning-ties"
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # pids are only meaningful on one host


def library_version() -> str:
    """The installed lightning-ties version (``"unknown"`` when run from a source tree)."""
    try:
        return importlib.metadata.version("lightning-ties")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def owner_metadata() -> dict[str, str]:
    """The entry that marks a single file as written by lightning-ties."""
    return {OWNER_KEY: library_version()}


# ---- temporaries and stale ones -----------------------------------------------------------------
def _temp_path(path: Path, kind: Literal["tmp", "old"]) -> Path:
    return path.parent / f".{path.name}.{_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


# Any temporary of ours: the target's name, then host, pid and a random part.
_TEMP = re.compile(rf"\.(?P<name>.+)\.{_TAG}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}\.(?P<kind>tmp|old)")
# Earlier versions named temporaries with mkstemp (8 random characters, no pid): whose they
# are cannot be told, so they are only named.
_LEGACY_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|old)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed runs left beside ``path``; returns those handled.

    Only temporaries of processes of this host that no longer run are touched. A ``.old``
    folder (the earlier version, renamed aside by the fallback swap) is renamed back to
    ``path`` when ``path`` is missing, and removed otherwise (the new version is complete).
    """
    path = Path(path)
    return _clean(path.parent, path.name)


def clean_stale_in(folder: str | os.PathLike[str]) -> list[Path]:
    """:func:`clean_stale` for every target in ``folder`` (a store's folder of task files)."""
    return _clean(Path(folder), None)


def _clean(folder: Path, only: str | None) -> list[Path]:
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    handled = []
    for entry in sorted(entries):
        legacy = _LEGACY_TEMP.fullmatch(entry)
        if legacy and only in (None, legacy["name"]) and _TAG not in entry:
            warnings.warn(
                f"{folder / entry} looks like the temporary of an interrupted write by an earlier "
                "lightning-ties version; delete it if no other run is writing there"
            )
        match = _TEMP.fullmatch(entry)
        if not match or only not in (None, match["name"]) or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        stale, target = folder / entry, folder / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target):
            os.rename(stale, target)
            warnings.warn(f"{target} was missing after an interrupted write; restored its earlier version from {stale}")
        else:
            _remove(stale)
        handled.append(stale)
    return handled


# ---- errors -------------------------------------------------------------------------------------
_TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def _write_error(path: Path, err: BaseException) -> OutputWriteError | None:
    """One clear error naming ``path`` for an OS or torch writer failure (None: not one)."""
    if isinstance(err, OutputWriteError):
        return None
    if isinstance(err, OSError):
        code, reason = err.errno, err.strerror or str(err)
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_ERRORS):
        code, reason = errno.EIO, f"torch could not write the checkpoint ({str(err).strip().splitlines()[0]})"
    else:
        return None
    hint = {
        errno.ENOSPC: "the disk is full: free space or write the output elsewhere",
        errno.EFBIG: "the file exceeds a file size limit (ulimit -f, or the filesystem's): write it elsewhere",
        errno.EDQUOT: "the disk quota is exceeded: free space or write the output elsewhere",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "the filesystem is read-only: write the output elsewhere",
    }.get(code or 0, "the disk may be full, or the folder not writable")
    return OutputWriteError(code or errno.EIO, f"cannot write {path}: {reason}; {hint}. Nothing was written at that path")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


# ---- atomic writers -----------------------------------------------------------------------------
@contextlib.contextmanager
def _removed_on_error(tmp: Path, path: Path) -> Iterator[None]:
    """On any failure inside the block remove ``tmp``; OS write errors become one naming ``path``."""
    try:
        yield
    except BaseException as err:
        _remove(tmp)
        translated = _write_error(path, err)
        if translated is not None:
            raise translated from err
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success fsync it and rename it to ``path``.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_file(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    clean_stale(path)
    tmp = _temp_path(path, "tmp")
    with _removed_on_error(tmp, path):
        # 0o666 masked by the umask, like any new file (mkstemp would force 0o600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], mark: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success fsync it and swap it in atomically.

    With ``mark`` (the default), the folder gets the marker file that lets a later
    ``overwrite=True`` recognise it as lightning-ties' own. An existing folder at ``path`` is
    replaced by an atomic exchange (or moved aside only after the new one is complete, and
    restored on failure), so ``path`` always holds a complete version.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        >>> sorted(p.name for p in target.iterdir())
        ['.lightning-ties.json', 'a.txt']
    """
    path = Path(path)
    clean_stale(path)
    tmp = _temp_path(path, "tmp")
    with _removed_on_error(tmp, path):
        os.mkdir(tmp, 0o777)  # masked by the umask (mkdtemp would force 0o700)
        yield tmp
        if mark:
            write_marker(tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, path)


def write_marker(folder: Path) -> None:
    """Mark ``folder`` as a lightning-ties output, listing the files it holds now."""
    files = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    (folder / MARKER).write_text(json.dumps({OWNER_KEY: library_version(), "files": files}, indent=1) + "\n")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # this kernel or filesystem cannot exchange: use the two-rename fallback
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif exchange(tmp, path):
        _remove(tmp)  # now the earlier version; a kill here leaves a stale .tmp, cleaned next time
    else:
        old = _temp_path(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove(old)
    fsync_dir(path.parent)


# ---- what may be written where ------------------------------------------------------------------
def _is_input_path(obj: object) -> bool:
    return isinstance(obj, (str, os.PathLike))


def check_not_an_input(output: str | os.PathLike[str], inputs: Iterable[object]) -> None:
    """Refuse an output that is an input, a folder containing one, or lies inside an input folder.

    Symlinks are resolved and hard links compared by inode. Inputs that are not paths
    (modules, state dicts) are ignored.
    """
    out = Path(output).resolve()
    for inp in inputs:
        if not _is_input_path(inp):
            continue
        src = Path(inp)  # type: ignore[arg-type]
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
            f"output {output} {why} {src}: writing it would destroy the input. "
            "Choose an output path outside every input"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _foreign_reason(path: Path, kind: Literal["file", "folder"] | None) -> str | None:
    """Why ``path`` may not be replaced (None: it is lightning-ties' own output of the right kind)."""
    if path.is_dir():
        if kind == "file":
            return "is a folder (this output is a single file)"
        return _foreign_folder_reason(path)
    if kind == "folder":
        return "is a file (this output is a folder)"
    if not _owned_file(path):
        return f"was not written by lightning-ties (no {OWNER_KEY!r} marker)"
    return None


def _foreign_folder_reason(folder: Path) -> str | None:
    entries = sorted(os.listdir(folder))
    marker = folder / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
            ours = set(data["files"]) if isinstance(data, dict) and OWNER_KEY in data else None
        except (OSError, ValueError, KeyError, TypeError):
            ours = None
        if ours is None:
            return f"holds an unreadable marker {marker}"
        foreign = [e for e in entries if e not in ours and e != MARKER and e not in WRITTEN_AFTER]
    elif _legacy_folder(folder):
        foreign = [e for e in entries if not (_LEGACY_FOLDER_FILES.fullmatch(e) and (folder / e).is_file())]
    else:
        return f"was not written by lightning-ties (no {MARKER} marker)"
    if foreign:
        return f"holds files lightning-ties did not write there: {foreign[:10]}"
    return None


def _legacy_folder(folder: Path) -> bool:
    config = folder / "merge_config.yaml"
    try:
        if config.is_file() and re.search(r"^library_version:", config.read_text(), re.MULTILINE):
            return True
    except (OSError, UnicodeDecodeError):
        return False
    return (folder / "learned_merge.json").is_file()


def _owned_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    if magic == b"PK\x03\x04":  # a torch zip checkpoint: look for the top-level key
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # unreadable or needs unpickling: not one of ours
            return False
        return isinstance(obj, dict) and OWNER_KEY in obj
    try:
        metadata = SafetensorsFile(path).metadata
    except CheckpointError:
        return False
    return any(k in metadata for k in (OWNER_KEY, *_LEGACY_FILE_KEYS))


def check_output(
    path: str | os.PathLike[str],
    overwrite: bool,
    inputs: Iterable[object] = (),
    kind: Literal["file", "folder"] | None = None,
) -> Path:
    """Check an output path before any heavy work; returns it as a ``Path``.

    Refuses (:class:`UnsafeOutputError`) an output that is, contains or lies inside one of
    ``inputs``; refuses (``FileExistsError``) an existing path unless ``overwrite``, and even
    then unless lightning-ties wrote it (its marker) and, for a folder, every file in it.
    Stale temporaries of killed runs at this path are cleaned first.
    """
    path = Path(path)
    clean_stale(path)
    check_not_an_input(path, inputs)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist")
    if os.path.lexists(path):
        reason = _foreign_reason(path, kind)
        if reason is not None:
            raise FileExistsError(
                f"{path} already exists and {reason}; lightning-ties replaces only its own outputs, "
                "even with overwrite=True. Choose another output path, or move it away yourself"
            )
        if not overwrite:
            raise FileExistsError(f"{path} already exists (an earlier lightning-ties output); pass overwrite=True to replace it")
    return path
