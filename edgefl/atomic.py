"""Files that appear whole or not at all: write beside, fsync, rename onto the target.

A board loses power mid-write and an aggregator is killed at any line; every file edgefl writes
goes through here, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside directory `path` durable (where the filesystem allows it)."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, it replaces `path`.

    The caller writes the temporary file (by name, so libraries that take a path can write it).
    On success it is fsynced, given `mode` if one is set, and renamed onto `path` (same
    filesystem, so the rename is atomic); on an exception it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that readers see the old content or all of the new."""
    with replacing(path, mode) as tmp:
        tmp.write_bytes(data)
