"""The aggregator's SQLite record opened read-only, for a dashboard beside a running aggregator.

The file is opened through a `file:...?mode=ro` URI: SQLite itself refuses every write, so the
dashboard can never change a record (nor create one where none is), and the aggregator's WAL
mode lets it read while the aggregator writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgefl.roles.record import AggregatorRecord
from edgefl.roles.summary import RoundSummary, summaries_from_record


class ReadOnlyRecord(AggregatorRecord):
    """An `AggregatorRecord` whose connection SQLite opened read-only (its queries, no writes).

    Only the reading methods are meant to be used; a writing one raises `sqlite3.OperationalError`
    ("attempt to write a readonly database").
    """

    def __init__(self, path: str | Path) -> None:
        """Open an existing record read-only.

        Raises:
            sqlite3.OperationalError: the file does not exist or is not readable.
        """
        super().__init__(path, read_only=True)


class RecordPoller:
    """Reads the finished rounds of a record, opening it once it exists (the dashboard may start
    before the aggregator has written anything)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._record: ReadOnlyRecord | None = None
        self.error = ""  # why the last read failed ("" when it did not)

    def summaries(self) -> list[RoundSummary]:
        """Return every finished round in the record (empty while it cannot be read)."""
        try:
            if self._record is None:
                self._record = ReadOnlyRecord(self.path)
            rounds = summaries_from_record(self._record)
        except sqlite3.Error as exc:
            # A record being created has no tables yet; the next poll tries again.
            self.error = str(exc)
            self.close()
            return []
        self.error = ""
        return rounds

    def close(self) -> None:
        """Close the connection (a later `summaries` opens it again)."""
        if self._record is not None:
            self._record._db.close()
            self._record = None
