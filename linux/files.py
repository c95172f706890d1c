"""Small state files written so that a crash leaves the old content or the new, never a part."""

from __future__ import annotations

import os


def write_atomic(path: str, data: bytes | str, mode: int = 0o600, durable: bool = True) -> None:
    """Replace `path` with `data` through a temp file and rename; `durable` fsyncs first."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, raw)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_small(path: str, limit: int = 65536) -> str | None:
    """A small text file's content (at most `limit` bytes), or None if it does not exist."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(limit)
    except (FileNotFoundError, NotADirectoryError):
        return None


def fsync_dir(path: str) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1


def exchange_paths(first: str, second: str) -> None:
    """Swap two paths on one filesystem atomically (renameat2 RENAME_EXCHANGE)."""
    import ctypes

    from moord.linux.libc import libc

    if libc.renameat2(_AT_FDCWD, first.encode(), _AT_FDCWD, second.encode(), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), first)
