"""The devices a fleet knows by key: enrollment, trust-on-first-use pins and revocation (SQLite).

The registry lives in the aggregator's SQLite record (its own table, `device_keys`), so
`edgefl devices enroll|list|revoke --state FILE` and a running `edgefl aggregate --state FILE`
share it: SQLite's locking lets the CLI enroll or revoke while the aggregator runs, and the
aggregator reads the table again when it meets a device it does not know and at every round.

A device is in one of three states: `enrolled` (its key was given by an operator), `pinned`
(trust on first use: the key it first signed with) or `revoked` (its messages are refused).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgefl.transport.sealed import KEY_BYTES, fingerprint

ENROLLED = "enrolled"
PINNED = "pinned"
REVOKED = "revoked"

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_keys (
    device_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    state TEXT NOT NULL,
    since REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DeviceKey:
    """What the registry holds for one device."""

    device_id: str
    public_key: bytes  # raw 32-byte Ed25519 public key
    state: str  # enrolled, pinned or revoked
    since: float  # Unix time of the last change

    @property
    def key_id(self) -> str:
        """The key's fingerprint (16 hex digits)."""
        return fingerprint(self.public_key)


class DeviceRegistry:
    """Device keys in a SQLite file (or in memory); thread-safe."""

    def __init__(self, path: str | Path = ":memory:", read_only: bool = False) -> None:
        """Open (and create) the table in `path`; `":memory:"` keeps it in memory.

        Args:
            path: the SQLite file (the aggregator's state).
            read_only: only read, through a `?mode=ro` URI, so SQLite itself refuses every write
                (a dashboard beside a running aggregator): nothing is created, and enroll, pin and
                revoke raise `sqlite3.OperationalError`. A file or table that does not exist
                (yet: the aggregator creates them) reads as an empty registry, and is looked for
                again at the next read.
        """
        self.path = str(path)
        self.read_only = read_only
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if read_only:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection | None:
        """The open database; None while a read-only registry's file or table is missing.
        Called with the lock held."""
        if self._db is not None:
            return self._db
        if not self.read_only:
            raise sqlite3.ProgrammingError("the device registry is closed")
        resolved = Path(self.path).resolve()
        if not resolved.is_file():
            return None
        db = sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True, check_same_thread=False,
                             isolation_level=None, timeout=10.0)  # fmt: skip
        table = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'device_keys'"
        if db.execute(table).fetchone() is None:
            db.close()
            return None
        self._db = db
        return db

    def _select(self, sql: str, args: tuple[str, ...] = ()) -> list[DeviceKey]:
        with self._lock:
            db = self._connection()
            rows = [] if db is None else db.execute(sql, args).fetchall()
        return [DeviceKey(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        """Run one write; return the rows it changed. Called with the lock held."""
        db = self._connection()
        if db is None:  # read-only, before the aggregator made the table
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return db.execute(sql, args).rowcount

    def enroll(self, device_id: str, public_key: bytes) -> DeviceKey:
        """Enroll (or re-enroll, replacing a pin or a revocation) a device's key."""
        return self._put(device_id, public_key, ENROLLED)

    def pin(self, device_id: str, public_key: bytes) -> bool:
        """Pin a device's first key (trust on first use); False if the device is already known."""
        _check_key(public_key)
        with self._lock:
            added = self._write(
                "INSERT OR IGNORE INTO device_keys VALUES (?, ?, ?, ?)",
                (device_id, public_key, PINNED, time.time()),
            )
        return added == 1

    def revoke(self, device_id: str) -> DeviceKey:
        """Revoke a device: its messages are refused from the next check on.

        Raises:
            KeyError: the device is not in the registry.
        """
        with self._lock:
            changed = self._write(
                "UPDATE device_keys SET state = ?, since = ? WHERE device_id = ?",
                (REVOKED, time.time(), device_id),
            )
            if changed == 0:
                raise KeyError(device_id)
        found = self.get(device_id)
        assert found is not None
        return found

    def get(self, device_id: str) -> DeviceKey | None:
        """Return what is known of one device (None: unknown)."""
        found = self._select(
            "SELECT device_id, public_key, state, since FROM device_keys WHERE device_id = ?",
            (device_id,),
        )
        return found[0] if found else None

    def all(self) -> list[DeviceKey]:
        """Return every device in the registry, by ID."""
        return self._select(
            "SELECT device_id, public_key, state, since FROM device_keys ORDER BY device_id"
        )

    def _put(self, device_id: str, public_key: bytes, state: str) -> DeviceKey:
        _check_key(public_key)
        entry = DeviceKey(device_id, bytes(public_key), state, time.time())
        with self._lock:
            self._write(
                "INSERT OR REPLACE INTO device_keys VALUES (?, ?, ?, ?)",
                (entry.device_id, entry.public_key, entry.state, entry.since),
            )
        return entry


def _check_key(public_key: bytes) -> None:
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {KEY_BYTES} bytes, not {len(public_key)}")
