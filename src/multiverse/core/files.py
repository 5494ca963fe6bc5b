"""Files that hold secrets: keys, tokens, databases, users' cloud-init.

Every layer writes some (the store its database, the worker its identity, the drivers user
data), so the one way to make them lives here, where every layer may import it. Private means
mode 0600 in a 0700 directory: readable by the user that runs Multiverse, by nobody else.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["private_dir", "private_sqlite", "write_private"]


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode`` (0600 unless told), atomically.

    A temporary file in the same directory is created 0600 and renamed over the target, so the
    key is never readable by others, not even for a moment, and not when an older file with
    looser permissions was there (``open(O_CREAT, 0o600)`` keeps an existing file's mode); and
    a reader (a worker renewing its certificate) sees the old file or the new, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner may enter: made 0700, or tightened to it (a data
    directory made by an older version, or by hand)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def private_sqlite(path: Path) -> Path:
    """The SQLite database ``path``, made 0600 before SQLite first opens it.

    SQLite creates a database 0644 (less the umask), and its ``-wal`` and ``-shm`` files with
    the database's mode, so a database that exists 0600 before the first open keeps its WAL
    private too. Files left looser by an older version are tightened.
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for each in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        with contextlib.suppress(FileNotFoundError):
            each.chmod(0o600)
    return path
