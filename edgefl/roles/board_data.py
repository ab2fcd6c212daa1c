"""The data a board trains on: a folder that may be empty on a fresh board and gain files later."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from edgefl.data import DataSource, open_source
from edgefl.errors import EdgeflError

# (relative path, size, modification time in ns) of every file: what changes when photos are
# added, removed or replaced, read without opening any of them.
DataSignature = tuple[tuple[str, int, int], ...]


def data_signature(path: Path) -> DataSignature:
    """Return what identifies the data's current files (empty for a missing or empty folder)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return ()
    signature = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue  # removed while listed: the next look sees the folder without it
        signature.append((str(file.relative_to(path.parent)), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def open_board_data(path: Path) -> DataSource | None:
    """Open a board's data, or return None when it is a folder holding no file yet.

    A freshly installed board has an empty data folder: it comes online with 0 samples (and is
    not selected for rounds) rather than failing, and picks the samples up once they appear.

    Raises:
        DataError: the path is missing, or holds files that are not usable data (images outside
            class subfolders, a malformed `.npz`).
    """
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        return None
    return open_source(path)


class BoardData:
    """A board's data on disk, looked at again on demand: `look()` opens it only when its files
    changed since the last look, and hands the new data to a callback (to compute features)."""

    def __init__(self, path: Path) -> None:
        """Watch `path` (an image folder or a `.npz`); nothing is read until `look()`."""
        self.path = path
        self._seen: DataSignature | None = None
        self._lock = threading.Lock()  # one look at a time

    def look(self, use: Callable[[DataSource | None], bool]) -> bool:
        """Open the data when its files changed since the last look and pass it to `use`.

        Args:
            use: takes the data (None: no file yet) and returns whether it took it; data it
                did not take is offered again at the next look. Its errors propagate.

        Returns:
            Whether `use` took new data.

        Raises:
            DataError: the files are not usable data (as `open_board_data`); the next look
                offers them again only once they change.
        """
        with self._lock:
            seen = data_signature(self.path)
            if seen == self._seen:
                return False
            try:
                taken = use(open_board_data(self.path))
            except EdgeflError:
                self._seen = seen
                raise
            if taken:
                self._seen = seen
            return taken
