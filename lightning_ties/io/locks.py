"""Advisory locks (``fcntl.flock``) that keep two lightning-ties processes off one output or store.

The lock file ``.<name>.lightning-ties.lock`` sits beside the output (or inside a task store)
and is removed when the lock is released, so no lock file outlives a finished write. The
protocol stays correct with that removal: after taking the lock, the holder checks that the
name still refers to the file it locked (else someone removed it meanwhile, and it retries). A
killed holder's lock is released by the kernel; its leftover file is reused by the next writer.

Two behaviours:

* ``wait=False`` (outputs): a second writer fails at once with :class:`OutputBusyError` naming
  the path and the process holding it.
* ``wait=True`` (task stores, manifests): a second writer says once that it waits, then waits,
  so two ``TaskVectorStore.add`` at once both land in the index.

Locks are advisory: they order lightning-ties processes, not other programs. On a platform
without ``fcntl`` (Windows) they are no-ops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .tempfiles import HOST, LOCK_SUFFIX

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputBusyError(RuntimeError):
    """Another lightning-ties process is writing the same output (the message names both)."""


def lock_path(path: Path) -> Path:
    """The lock file of output ``path`` (a hidden sibling)."""
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        host, _, pid = os.pread(fd, 64, 0).decode().strip().partition("-")
        if pid:
            return f"process {pid}" + ("" if host == HOST else f" on host {host}")
    return "another process"


def _acquire(lock: Path, what: Path, wait: bool, say: bool) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = _holder(fd)
                if not wait:
                    raise OutputBusyError(
                        f"{what} is being written by {holder} (lock {lock}); wait for it to finish, "
                        "or write to another path"
                    ) from None
                if say:
                    print(f"lightning-ties: waiting for {holder}, which is writing {what}", file=sys.stderr, flush=True)
                    say = False
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.lexists(lock) and os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{HOST}-{os.getpid()}".encode())  # who holds it: named to a waiter, cleaned once dead
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was removed by its releasing holder meanwhile: lock the new one


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], wait: bool = False, lock: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Hold the advisory lock of ``path`` for the block (see the module docstring).

    ``lock`` overrides where the lock file lives (a task store keeps it inside its folder).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with locked(target):
        ...     pass
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover
        yield
        return
    file = Path(lock) if lock is not None else lock_path(path)
    fd = _acquire(file, path, wait, say=True)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)  # before unlocking: a waiter then sees a removed file and retries
        os.close(fd)


__all__ = ["OutputBusyError", "lock_path", "locked"]
