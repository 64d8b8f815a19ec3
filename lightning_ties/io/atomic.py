"""Safe outputs: written race-free beside the target, placed atomically, never over what is not ours.

Writing:
    :func:`atomic_open` creates a temporary file beside the target with ``O_CREAT | O_EXCL |
    O_NOFOLLOW`` and hands out a file object over that descriptor: the temporary is never
    reopened by name, so a link planted in a shared folder cannot redirect the write.
    :func:`atomic_file` is for writers that need a path (matplotlib): the path lies inside a
    private ``0o700`` temporary folder no one else can write into. :func:`atomic_dir` fills a
    private temporary folder. On success the temporary is fsynced and renamed over the target;
    any exception removes it, and OS errors (disk full, file size limit, permissions) and
    torch's zip-writer errors become one :class:`OutputWriteError` naming the target.
    Permissions follow the umask (``0o666``/``0o777`` masked, as ``open``/``mkdir`` do).

One writer per output:
    Each writer holds the output's advisory lock (:mod:`.locks`) from its start to the rename:
    a second lightning-ties process writing the same path fails at once with
    :class:`~.locks.OutputBusyError`. Under the lock, just before the rename, the ownership rule
    (:mod:`.ownership`) is checked again: the path must be absent, or ours, unchanged, and
    ``overwrite`` given. The new file is then recorded (size, sha256) in its folder's manifest.

Replacing a folder:
    An existing folder is replaced with one atomic ``renameat2(RENAME_EXCHANGE)`` where the
    kernel and filesystem support it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs...): the target
    path always holds a complete version. Elsewhere (macOS, some network filesystems) two renames
    are needed: the old folder moves aside to ``.<name>.lightning-ties-<host>-<pid>-<rand>.old``
    only once the new one is complete, then the new one is renamed in, and the old one back if
    that fails. A process killed between the two renames leaves the path missing, with the
    complete earlier version in that ``.old`` folder; the next lightning-ties write into the
    same folder (or :func:`~.tempfiles.clean_stale_in` on it) renames it back.

Killed runs:
    A run killed with SIGKILL leaves its temporary behind; every write into a folder first
    removes the temporaries of dead processes there (:mod:`.tempfiles`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import OutputWriteError
from .locks import locked
from .ownership import (
    MANIFEST,
    OWNER_KEY,
    check_not_an_input,
    check_output,
    digest,
    library_version,
    read_manifest,
    record,
    refuse_reserved_name,
    refuse_unless_replaceable,
    write_folder_manifest,
)
from .tempfiles import clean_stale, clean_stale_in, create_temp_dir, create_temp_file, fsync_dir, publish_mode, remove, temp_path

#: Kept for callers of earlier versions: the manifest file.
MARKER = MANIFEST


def owner_metadata() -> dict[str, str]:
    """Metadata recording the writing version in single files (informational: ownership is the manifest's)."""
    return {OWNER_KEY: library_version()}


# ---- errors -------------------------------------------------------------------------------------
_TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def _write_error(path: Path, err: BaseException) -> OutputWriteError | None:
    """One clear error naming ``path`` for an OS or torch writer failure (None: not one)."""
    if isinstance(err, (OutputWriteError, FileExistsError)):  # FileExistsError: the ownership rule's refusal
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
        remove(tmp)
        translated = _write_error(path, err)
        if translated is not None:
            raise translated from err
        raise


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """What every writer does first: create missing parent folders (as ``mkdir -p``, only the
    output's own ancestors), clean the folder's stale temporaries, hold the output's lock."""
    refuse_reserved_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_in(path.parent)
    with locked(path):
        yield


def _place_file(tmp: Path, fd: int, path: Path, overwrite: bool) -> None:
    os.fsync(fd)
    entry = digest(fd)
    read_manifest(path.parent)  # an unreadable manifest is refused before the rename, not after
    refuse_unless_replaceable(path, overwrite, "file")  # again, under the lock: nothing changed meanwhile
    if os.lstat(tmp).st_ino != os.fstat(fd).st_ino:
        raise OutputWriteError(errno.EIO, f"cannot write {path}: its temporary {tmp} was replaced by another process")
    os.replace(tmp, path)
    record(path, entry)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[IO[bytes]]:
    """Yield a binary file object to write ``path``'s new content into; placed atomically on success.

    The file object is over a descriptor of a new temporary beside ``path`` (never reopened by
    name). ``overwrite=False`` refuses an existing ``path``; ``True`` replaces it only when it
    is ours and unchanged (see :mod:`.ownership`).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_open(target) as f:
        ...     _ = f.write(b"done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    with _writing(path):
        tmp, fd = create_temp_file(path)
        with _removed_on_error(tmp, path), os.fdopen(fd, "w+b") as f:
            f.raw.name = str(path)  # errors name the output, not a descriptor number
            yield f
            f.flush()
            _place_file(tmp, f.fileno(), path, overwrite)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write (for writers that need a name); on success rename it to ``path``.

    The path lies inside a private (``0o700``) temporary folder beside ``path``, so writing it
    by name cannot be redirected. Prefer :func:`atomic_open` where a file object will do.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_file(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    with _writing(path):
        private = create_temp_dir(path)
        with _removed_on_error(private, path):
            tmp = private / path.name
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # exists even if left unwritten
            yield tmp
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                _place_file(tmp, fd, path, overwrite)
            finally:
                os.close(fd)
            os.rmdir(private)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], mark: bool = True, overwrite: bool = True) -> Iterator[Path]:
    """Yield a private temporary folder to fill; on success fsync it and swap it in atomically.

    With ``mark`` (the default) the folder gets its manifest (every file's size and sha256), so
    a later ``overwrite=True`` may replace it as long as nothing in it changed. An existing
    folder at ``path`` is replaced by an atomic exchange (see the module docstring).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        >>> sorted(p.name for p in target.iterdir())
        ['.lightning-ties.json', 'a.txt']
    """
    path = Path(path)
    with _writing(path):
        tmp = create_temp_dir(path)
        with _removed_on_error(tmp, path):
            yield tmp
            if mark:
                write_folder_manifest(tmp)
            _fsync_tree(tmp)
            publish_mode(tmp)
            refuse_unless_replaceable(path, overwrite, "folder")
            _swap_in(tmp, path)


def write_marker(folder: Path) -> None:
    """Write ``folder``'s manifest (every file's size and sha256): it is ours, as it is now."""
    write_folder_manifest(folder)


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
        remove(tmp)  # now the earlier version; a kill here leaves a stale .tmp, cleaned next time
    else:
        old = temp_path(path, "old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        remove(old)
    fsync_dir(path.parent)


__all__ = [
    "MARKER",
    "OWNER_KEY",
    "atomic_dir",
    "atomic_file",
    "atomic_open",
    "check_not_an_input",
    "check_output",
    "clean_stale",
    "clean_stale_in",
    "exchange",
    "library_version",
    "owner_metadata",
    "write_marker",
]
