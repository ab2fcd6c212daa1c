"""How compression steps write their outputs: each file appears whole or not at all."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same filesystem, so renaming onto it is atomic).

    The caller writes the temporary file and renames it to `path`; whatever is left is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        tmp = Path(handle.name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
