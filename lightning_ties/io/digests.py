"""The sha256 of source files, remembered across runs: a repeated merge does not hash its sources again.

``merge_to`` records every source file's sha256 in the card and ``merge_config.yaml``. Hashing
reads every byte (a 70B model's shards at ~1.6 GB/s on one core: about a minute and a half per
model), and the same sources are merged again and again (another k, another method). An entry
is kept per file in a cache folder, keyed by what changes whenever the file's bytes do: device,
inode, size, modification and change times (the change time is set by the kernel on every
write, truncation or rename-over, and cannot be set back by a user). Only a file unchanged for
:data:`SETTLED_S` seconds before it was hashed is remembered: a write within the same clock tick
as the hash would leave every key field as it was.

The folder: ``$LIGHTNING_TIES_DIGEST_CACHE`` (``off`` turns the cache off), else
``$XDG_CACHE_HOME/lightning-ties/sha256`` (``~/.cache/...``). It holds only files this module
writes, one small JSON per source file, replaced atomically (several ranks may write at once);
delete it whenever you like. A cache that cannot be read or written is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

#: The environment variable naming the cache folder (``off``: no cache).
ENV = "LIGHTNING_TIES_DIGEST_CACHE"
#: Seconds a file must have been left unchanged before its digest is remembered.
SETTLED_S = 2.0
_BLOCK = 8 << 20
_OFF = ("off", "0", "false", "no", "none", "")


def cache_dir() -> Path | None:
    """The folder digests are remembered in, or None when ``$LIGHTNING_TIES_DIGEST_CACHE`` is ``off``.

    Example:
        >>> import os
        >>> os.environ["LIGHTNING_TIES_DIGEST_CACHE"] = "off"
        >>> cache_dir() is None
        True
        >>> del os.environ["LIGHTNING_TIES_DIGEST_CACHE"]
    """
    raw = os.environ.get(ENV)
    if raw is not None:
        return None if raw.strip().lower() in _OFF else Path(raw).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-ties" / "sha256"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, from the cache when the file has not changed since it was hashed.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/f"
        >>> _ = open(path, "wb").write(b"abc")
        >>> sha256_file(path)[:16]
        'ba7816bf8f01cfea'
    """
    with open(path, "rb", buffering=0) as f:
        identity = file_identity(f.fileno())
        folder = cache_dir()
        entry = folder / _entry_name(identity) if folder is not None else None
        known = _read_entry(entry, identity) if entry is not None else None
        if known is not None:
            return known
        started = time.time_ns()
        sha256 = _hash_file(f.fileno(), identity[2])
        settled = started - max(identity[3], identity[4]) > SETTLED_S * 1e9
        if entry is not None and settled and file_identity(f.fileno()) == identity:
            _write_entry(entry, identity, sha256, Path(path))
    return sha256


def _hash_file(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    hash_range(fd, digest, 0, size)
    return digest.hexdigest()


def hash_range(fd: int, h: Any, start: int, stop: int) -> None:
    """Feed bytes ``[start, stop)`` of an open file to the hash object ``h``, through one reused buffer
    (``pread``: the file's position is left alone, so a file can be hashed in pieces, in order)."""
    buf = bytearray(min(_BLOCK, max(stop - start, 1)))
    view = memoryview(buf)
    offset = start
    while offset < stop:
        n = os.preadv(fd, [view[: min(len(buf), stop - offset)]], offset)
        if not n:
            raise OSError(f"file ended at byte {offset} while hashing up to {stop}")
        h.update(view[:n])
        offset += n


def file_identity(fd: int) -> tuple[int, int, int, int, int]:
    """Device, inode, size, modification and change times: any write changes the change time, which
    cannot be set back, so an unchanged identity means unchanged bytes."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _entry_name(identity: tuple[int, ...]) -> str:
    return hashlib.sha256("-".join(map(str, identity)).encode()).hexdigest()[:40] + ".json"


def _read_entry(entry: Path, identity: tuple[int, ...]) -> str | None:
    try:
        record = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("identity") != list(identity):
        return None  # another file's entry (a name collision) or a damaged one: hash again
    sha256 = record.get("sha256")
    if not isinstance(sha256, str) or len(sha256) != 64 or sha256.strip("0123456789abcdef"):
        return None
    return sha256


def _write_entry(entry: Path, identity: tuple[int, ...], sha256: str, path: Path) -> None:
    record = {"identity": list(identity), "sha256": sha256, "path": str(path.absolute())}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a read-only or full cache folder costs a re-hash next time, nothing else
