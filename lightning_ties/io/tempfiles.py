"""Temporaries beside an output: created race-free, recognisable as ours, cleaned after a kill.

A temporary is ``.<name>.lightning-ties-<host>-<pid>-<random>.<tmp|old>`` in the target's own
folder (same filesystem, so the final rename is atomic):

* a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a link or file planted at that name
  makes the creation fail instead of redirecting the write, and the caller writes through the
  returned descriptor, never reopening the name;
* a folder is created with ``mkdir`` (which never follows a planted link) and mode ``0o700``
  while it is filled, so no one else can plant anything inside it; :func:`publish_mode` gives
  it the umask's mode just before it is renamed in.

:func:`clean_stale_in` removes the temporaries of killed runs in a folder. It touches an entry
only when all of these hold: the name has our pattern, the host is this one, the process is
gone (never one that runs), and the entry belongs to this user; a planted link is unlinked, never
followed. The lock files of killed writers (:mod:`.locks`) go the same way. Every writer calls it
on the target's folder before writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
import warnings
import zlib
from pathlib import Path
from typing import Literal

TAG = "lightning-ties"
HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # pids are only meaningful on one host
#: Any temporary of ours: the target's name, then host, pid and a random part.
TEMP = re.compile(rf"\.(?P<name>.+)\.{TAG}-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}\.(?P<kind>tmp|old)")
#: How the lock files of :mod:`.locks` end (``.<name>.lightning-ties.lock``, or the store's ``.lightning-ties.lock``).
LOCK_SUFFIX = f".{TAG}.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TRIES = 16


def temp_path(path: Path, kind: Literal["tmp", "old"]) -> Path:
    """A fresh temporary name beside ``path`` (unpredictable: 32 random bits)."""
    return path.parent / f".{path.name}.{TAG}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def create_temp_file(path: Path) -> tuple[Path, int]:
    """Create a new temporary file beside ``path``; returns its name and a read-write descriptor.

    ``O_EXCL | O_NOFOLLOW``: never opens an existing file or follows a link someone planted at
    the name. Mode ``0o666`` masked by the umask, like any new file.
    """
    for _ in range(_TRIES):
        tmp = temp_path(path, "tmp")
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:  # something sits at that name (planted, or a 1-in-2^32 clash): a new name
            continue
    raise FileExistsError(f"cannot create a temporary beside {path}: {_TRIES} random names were all taken")


def create_temp_dir(path: Path) -> Path:
    """Create a new private (``0o700``) temporary folder beside ``path``."""
    for _ in range(_TRIES):
        tmp = temp_path(path, "tmp")
        try:
            os.mkdir(tmp, 0o700)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder beside {path}: {_TRIES} random names were all taken")


def publish_mode(folder: Path) -> None:
    """Give a private temporary folder the mode a new folder gets (``0o777`` masked by the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but is not reaped yet (Linux): a killed writer looks alive to ``kill(pid, 0)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def remove(path: Path) -> None:
    """Remove a file, link or folder tree (a link is unlinked, never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside the tree
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clean_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries killed runs left in ``path``'s folder; returns those handled."""
    return clean_stale_in(Path(path).parent)


def clean_stale_in(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed runs left in ``folder``; returns those handled.

    Only temporaries of this host and user whose process no longer runs are touched. A ``.old``
    folder (an earlier version moved aside by the fallback swap) is renamed back to its target
    when the target is missing (a kill between the two renames), and removed otherwise.

    Example:
        >>> import tempfile
        >>> clean_stale_in(tempfile.mkdtemp())
        []
    """
    folder = Path(folder)
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    handled = []
    for entry in entries:
        if entry.endswith(LOCK_SUFFIX) and entry.startswith("."):
            if _stale_lock(folder / entry):
                remove(folder / entry)
                handled.append(folder / entry)
            continue
        match = TEMP.fullmatch(entry)
        if not match or match["host"] != HOST:
            continue
        pid = int(match["pid"])
        stale, target = folder / entry, folder / match["name"]
        try:
            if pid == os.getpid() or pid_alive(pid) or os.lstat(stale).st_uid != os.getuid():
                continue
        except FileNotFoundError:  # another process cleaned it meanwhile
            continue
        if match["kind"] == "old" and not os.path.lexists(target):
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                os.rename(stale, target)
                warnings.warn(f"{target} was missing after an interrupted write; restored its earlier version from {stale}")
        else:
            remove(stale)
        handled.append(stale)
    return handled


def _stale_lock(path: Path) -> bool:
    """A lock file left by a killed process of this host and user (its content: ``<host>-<pid>``).

    Removing it is safe even if another process has just opened it: :mod:`.locks` checks after
    locking that the name still refers to the file it locked, and retries otherwise.
    """
    try:
        if os.lstat(path).st_uid != os.getuid():
            return False
        host, _, pid = path.read_text()[:64].strip().partition("-")
    except (OSError, UnicodeDecodeError):
        return False
    return host == HOST and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "HOST",
    "LOCK_SUFFIX",
    "TAG",
    "TEMP",
    "clean_stale",
    "clean_stale_in",
    "create_temp_dir",
    "create_temp_file",
    "fsync_dir",
    "pid_alive",
    "publish_mode",
    "remove",
    "temp_path",
]
