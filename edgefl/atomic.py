"""Files that appear whole or not at all: write beside, fsync, rename onto the target.

A board loses power mid-write and an aggregator is killed at any line; every file edgefl writes
goes through here, so a reader sees the old file or the new one, never half of one. The same for
directories (a bundle: `replacing_dir`) and for symlinks (a board's `current` bundle).
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def replacing_dir(path: Path, staging_root: Path | None = None) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds, it replaces directory `path`.

    The caller fills the directory. On success every file in it and the directory itself are
    fsynced, an existing `path` is moved aside, the staging directory is renamed onto `path` and
    the old one removed; on an exception the staging directory is removed and `path` untouched.

    Args:
        path: the directory to write (or replace).
        staging_root: where to stage (default: beside `path`); on the same filesystem as `path`,
            so the rename is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.parent if staging_root is None else Path(staging_root)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with file.open("rb+") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(staging)
        _swap_dir(staging, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_dir(staging: Path, target: Path) -> None:
    # Two renames: a directory cannot be renamed onto a non-empty one. A crash between them
    # leaves the old directory under its hidden `.old-` name, never a half-written `target`.
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_symlink(link: Path, target: Path) -> None:
    """Point symlink `link` at `target` with one rename, so `link` always resolves somewhere.

    The link is relative, so the directory holding both can be moved or mounted elsewhere.
    """
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(Path(target).resolve(), link.parent.resolve()), tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
