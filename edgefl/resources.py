"""Where the files shipped beside the code (recipes, board profiles) are, installed or not."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """Return the directory of shipped files `name` ("compress" or "devices").

    In a wheel they are inside the package (`edgefl/_shipped/NAME`); in a source checkout or an
    editable install they are at the top of the repository.

    Raises:
        FileNotFoundError: neither location exists.
    """
    for candidate in (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shipped directory {name!r} not found beside the edgefl package")
