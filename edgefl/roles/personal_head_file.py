"""Where a board keeps its personal head between restarts: a safetensors file in its state."""

from __future__ import annotations

import logging
from pathlib import Path

from edgefl.atomic import write_atomic
from edgefl.bundle import decode_head, encode_head
from edgefl.errors import BundleError
from edgefl.head import Weights

log = logging.getLogger(__name__)


class PersonalHeadFile:
    """The personal head of one task in a state directory (None: kept in memory only)."""

    def __init__(self, state_dir: Path | None, task: str) -> None:
        """Keep the head of `task` in `state_dir`/personal-{task}.safetensors."""
        self.path = None if state_dir is None else state_dir / f"personal-{task}.safetensors"

    def save(self, head: Weights) -> None:
        """Write the head atomically (nothing without a state directory)."""
        if self.path is not None:
            write_atomic(self.path, encode_head(head))

    def load(self) -> Weights | None:
        """Return the saved head; None when there is none or it is unreadable (logged)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            return decode_head(self.path.read_bytes())
        except BundleError as exc:
            log.warning("ignoring unreadable personal head %s: %s", self.path, exc)
            return None
