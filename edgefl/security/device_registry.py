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

    def __init__(self, path: str | Path = ":memory:") -> None:
        """Open (and create) the table in `path`; `":memory:"` keeps it in memory."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def enroll(self, device_id: str, public_key: bytes) -> DeviceKey:
        """Enroll (or re-enroll, replacing a pin or a revocation) a device's key."""
        return self._put(device_id, public_key, ENROLLED)

    def pin(self, device_id: str, public_key: bytes) -> bool:
        """Pin a device's first key (trust on first use); False if the device is already known."""
        _check_key(public_key)
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO device_keys VALUES (?, ?, ?, ?)",
                (device_id, public_key, PINNED, time.time()),
            )
            return cursor.rowcount == 1

    def revoke(self, device_id: str) -> DeviceKey:
        """Revoke a device: its messages are refused from the next check on.

        Raises:
            KeyError: the device is not in the registry.
        """
        with self._lock:
            cursor = self._db.execute(
                "UPDATE device_keys SET state = ?, since = ? WHERE device_id = ?",
                (REVOKED, time.time(), device_id),
            )
            if cursor.rowcount == 0:
                raise KeyError(device_id)
        found = self.get(device_id)
        assert found is not None
        return found

    def get(self, device_id: str) -> DeviceKey | None:
        """Return what is known of one device (None: unknown)."""
        with self._lock:
            row = self._db.execute(
                "SELECT device_id, public_key, state, since FROM device_keys WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else DeviceKey(row[0], bytes(row[1]), row[2], row[3])

    def all(self) -> list[DeviceKey]:
        """Return every device in the registry, by ID."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, public_key, state, since FROM device_keys ORDER BY device_id"
            ).fetchall()
        return [DeviceKey(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    def _put(self, device_id: str, public_key: bytes, state: str) -> DeviceKey:
        _check_key(public_key)
        entry = DeviceKey(device_id, bytes(public_key), state, time.time())
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO device_keys VALUES (?, ?, ?, ?)",
                (entry.device_id, entry.public_key, entry.state, entry.since),
            )
        return entry


def _check_key(public_key: bytes) -> None:
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {KEY_BYTES} bytes, not {len(public_key)}")
