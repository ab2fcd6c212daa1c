"""The aggregator's durable record in SQLite: rounds, participants, updates, metrics, head versions.

One file, WAL mode. Round changes commit at once; closing a round (its new heads, strategy
state, result and metrics) is one transaction, so a crash leaves the round either open with its
stored updates (a restart aggregates it again) or closed with its heads, never half applied.
Update records are committed in small batches (see `AggregatorRecord.record_update`), and an
aggregator killed mid-round resumes from what was committed. Heads and strategy state are stored
as safetensors blobs (no pickle).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.bundle import decode_head, encode_head
from edgefl.errors import FederationError
from edgefl.head import Weights

# Buffered update records are committed when this old or this many, whichever comes first.
FLUSH_EVERY_S = 0.25
FLUSH_EVERY_ROWS = 512

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL,            -- open | closed | failed
    started REAL NOT NULL,
    deadline REAL NOT NULL,
    closed REAL,
    head_version INTEGER NOT NULL,   -- the head version devices trained from
    config TEXT NOT NULL,            -- the task's config (JSON)
    result TEXT                      -- the RoundResult (JSON) once closed
);
CREATE TABLE IF NOT EXISTS participants (
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    task TEXT NOT NULL,
    PRIMARY KEY (round, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    task TEXT NOT NULL,
    received REAL NOT NULL,
    outcome TEXT NOT NULL,           -- accepted | rejected | late
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metrics TEXT NOT NULL,
    payload BLOB                     -- kept for accepted updates only (resume after restart)
);
CREATE INDEX IF NOT EXISTS updates_round ON updates (round, outcome);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
    PRIMARY KEY (round, name)
);
CREATE TABLE IF NOT EXISTS heads (
    task TEXT NOT NULL, version INTEGER NOT NULL, round INTEGER NOT NULL,
    created REAL NOT NULL, weights BLOB NOT NULL,
    PRIMARY KEY (task, version)
);
CREATE TABLE IF NOT EXISTS strategy_state (task TEXT PRIMARY KEY, state BLOB NOT NULL);
"""


@dataclass
class RoundRecord:
    """One round as stored."""

    round: int
    status: str
    started: float
    deadline: float
    closed: float | None
    head_version: int
    config: dict[str, Any]
    selected: dict[str, str]  # device -> task
    result: dict[str, Any] | None


@dataclass
class StoredUpdate:
    """An accepted update as stored, with its payload for re-decoding."""

    device_id: str
    task: str
    samples: int
    sha256: str
    payload: bytes
    metrics: dict[str, float]


# Called between the steps of closing a round ("heads", "strategy", "round", "metrics",
# "commit"): tests raise from it to crash there.
FaultHook = Callable[[str], None]


class AggregatorRecord:
    """The SQLite store. Thread-safe: updates are recorded from the network thread."""

    def __init__(
        self, path: str | Path, fault: FaultHook | None = None, read_only: bool = False
    ) -> None:
        """Open (and create) the store; `":memory:"` keeps it in memory.

        Args:
            path: the SQLite file.
            fault: called with each step's name while a round closes (crash tests).
            read_only: open an existing file through a `?mode=ro` URI: SQLite refuses every
                write (a dashboard beside a running aggregator); its writing methods raise.

        Raises:
            sqlite3.OperationalError: `read_only` and the file cannot be opened.
        """
        self.path = str(path)
        self._fault = fault
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, ...]] = []
        self._last_flush = time.monotonic()
        if read_only:
            resolved = Path(path).resolve()
            if not resolved.is_file():
                raise sqlite3.OperationalError(f"no aggregator record at {resolved}")
            self._db = sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)  # fmt: skip
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only a power cut can lose the
        # last few, and the update rate needs the cheaper commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Write buffered records and close the database."""
        with self._lock:
            self._flush_locked()
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one transaction: committed whole, or rolled back on error."""
        with self._lock:
            self._flush_locked()
            self._db.execute("BEGIN")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _step(self, name: str) -> None:
        if self._fault is not None:
            self._fault(name)

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._flush_locked()
            self._db.execute(sql, params)

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._flush_locked()
            return list(self._db.execute(sql, params).fetchall())

    def flush(self) -> None:
        """Write buffered update records now (every read and round change does this too)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO updates (round, device_id, task, received, outcome, code, reason, size,"
            " samples, sha256, metrics, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self._pending,
        )
        self._db.execute("COMMIT")
        self._pending = []
        self._last_flush = time.monotonic()

    def set_meta(self, key: str, value: str) -> None:
        """Store a key/value (fleet, bundle name, ...)."""
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        """Return a stored key/value, or None."""
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def claim_identity(self, identity: str) -> None:
        """Store which federation this record belongs to, or check that it is this one.

        Raises:
            FederationError: the record belongs to another federation.
        """
        stored = self.meta("identity")
        if stored is None:
            self.set_meta("identity", identity)
        elif stored != identity:
            raise FederationError(
                f"state {self.path} belongs to another federation ({stored}); "
                "give a new `state_path`"
            )

    def open_round(
        self,
        round_number: int,
        selected: Mapping[str, str],
        deadline: float,
        head_version: int,
        config: Mapping[str, Any],
    ) -> None:
        """Record a round as open with its participants (device -> task)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, 'open', ?, ?, NULL, ?, ?, NULL)",
                (round_number, time.time(), deadline, head_version, json.dumps(dict(config))),
            )
            db.executemany(
                "INSERT OR REPLACE INTO participants VALUES (?, ?, ?)",
                [(round_number, device, task) for device, task in selected.items()],
            )

    def record_update(
        self,
        round_number: int,
        device_id: str,
        task: str,
        outcome: str,
        code: str = "",
        reason: str = "",
        size: int = 0,
        samples: int = 0,
        sha256: str = "",
        metrics: Mapping[str, float] | None = None,
        payload: bytes | None = None,
    ) -> None:
        """Record an incoming update: accepted (with payload), rejected or late (with a code).

        Records are written in batches (at most `FLUSH_EVERY_S` late or `FLUSH_EVERY_ROWS`
        long, or on any read): one
        commit per update would cap ingest near 4,000/s. A crash can lose the last batch; the
        protocol covers that, since devices re-send their update when they see the task again.
        """
        row = (
            round_number, device_id, task, time.time(), outcome, code, reason, size,
            samples, sha256, json.dumps(dict(metrics or {})), payload,
        )  # fmt: skip
        with self._lock:
            self._pending.append(row)
            if (
                len(self._pending) >= FLUSH_EVERY_ROWS
                or time.monotonic() - self._last_flush > FLUSH_EVERY_S
            ):
                self._flush_locked()

    def accepted_updates(self, round_number: int) -> list[StoredUpdate]:
        """Return the accepted updates of a round, in arrival order."""
        rows = self._read(
            "SELECT device_id, task, samples, sha256, payload, metrics FROM updates"
            " WHERE round = ? AND outcome = 'accepted' ORDER BY id",
            (round_number,),
        )
        return [
            StoredUpdate(r[0], r[1], int(r[2]), r[3], bytes(r[4]), json.loads(r[5])) for r in rows
        ]

    def update_counts(self, round_number: int) -> dict[str, int]:
        """Return how many updates of a round ended how: "accepted", "late", or a reject code."""
        rows = self._read(
            "SELECT CASE outcome WHEN 'rejected' THEN code ELSE outcome END, COUNT(*)"
            " FROM updates WHERE round = ? GROUP BY 1",
            (round_number,),
        )
        return {str(name): int(count) for name, count in rows}

    def update_counts_by_round(self) -> dict[int, dict[str, int]]:
        """Return `update_counts` of every round, in one query."""
        rows = self._read(
            "SELECT round, CASE outcome WHEN 'rejected' THEN code ELSE outcome END, COUNT(*)"
            " FROM updates GROUP BY 1, 2"
        )
        counts: dict[int, dict[str, int]] = {}
        for number, name, count in rows:
            counts.setdefault(int(number), {})[str(name)] = int(count)
        return counts

    def rejections(self, round_number: int | None = None) -> list[tuple[int, str, str, str]]:
        """Return (round, device, code, reason) of rejected and late updates."""
        sql = "SELECT round, device_id, code, reason FROM updates WHERE outcome != 'accepted'"
        params: tuple[Any, ...] = ()
        if round_number is not None:
            sql += " AND round = ?"
            params = (round_number,)
        return [(int(r[0]), r[1], r[2], r[3]) for r in self._read(sql + " ORDER BY id", params)]

    def rejected_answers(self, round_number: int) -> list[tuple[str, str, str, str]]:
        """Return (device, code, reason, sha256) of a round's rejected updates, in arrival order
        (the first of a selected device is its answer: see `RoundEngine.resume`)."""
        rows = self._read(
            "SELECT device_id, code, reason, sha256 FROM updates"
            " WHERE round = ? AND outcome = 'rejected' AND code != 'duplicate' ORDER BY id",
            (round_number,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def close_round(
        self,
        round_number: int,
        status: str,
        result: Mapping[str, Any],
        metrics: Mapping[str, float],
        heads: Mapping[str, Weights] | None = None,
        head_version: int = 0,
        strategy_states: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """Close a round in one transaction: its new heads and strategy state (when it
        aggregated), its status, result and metrics. A crash at any step leaves the round open
        and the heads as they were.

        Args:
            round_number: the round.
            status: "closed" or "failed".
            result: the result as published (JSON-like).
            metrics: the round's metrics.
            heads: the new head of every task (None: the round changed no head).
            head_version: their version.
            strategy_states: each task's strategy state after the round (None: unchanged).
        """
        now = time.time()
        with self._transaction() as db:
            self._step("heads")
            db.executemany(
                "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?, ?)",
                [(task, head_version, round_number, now, encode_head(weights))
                 for task, weights in (heads or {}).items()],
            )  # fmt: skip
            self._step("strategy")
            db.executemany(
                "INSERT OR REPLACE INTO strategy_state VALUES (?, ?)",
                [(task, encode_head(state)) for task, state in (strategy_states or {}).items()],
            )
            self._step("round")
            db.execute(
                "UPDATE rounds SET status = ?, closed = ?, result = ? WHERE round = ?",
                (status, now, json.dumps(dict(result)), round_number),
            )
            self._step("metrics")
            db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
                [(round_number, name, float(value)) for name, value in metrics.items()],
            )
            self._step("commit")

    def begin_run(self, new_id: str) -> str:
        """Return the ID of the run this record is in: the unfinished one stored, else `new_id`
        (stored as started). A run restarted after a crash keeps its ID."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'run'").fetchone()
            run = json.loads(row[0]) if row else {}
            if run.get("id") and not run.get("finished"):
                return str(run["id"])
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('run', ?)",
                (json.dumps({"id": new_id, "finished": False}),),
            )
            return new_id

    def finish_run(self, run_id: str) -> None:
        """Mark a run finished: the next `begin_run` starts a new one."""
        self.set_meta("run", json.dumps({"id": run_id, "finished": True}))

    def rounds(self) -> list[RoundRecord]:
        """Return every round, oldest first."""
        rows = self._read("SELECT * FROM rounds ORDER BY round")
        selected: dict[int, dict[str, str]] = {}
        for number, device, task in self._read("SELECT round, device_id, task FROM participants"):
            selected.setdefault(int(number), {})[device] = task
        return [
            RoundRecord(
                round=int(r[0]), status=r[1], started=r[2], deadline=r[3], closed=r[4],
                head_version=int(r[5]), config=json.loads(r[6]),
                selected=selected.get(int(r[0]), {}),
                result=json.loads(r[7]) if r[7] else None,
            )
            for r in rows
        ]  # fmt: skip

    def finished_round_sizes(self) -> list[tuple[int, int, int, dict[str, Any]]]:
        """Return (round, selected, online, config) of every finished round, oldest first: what
        privacy accounting needs (`edgefl.core.accounting.PrivacyLedger.from_rounds`)."""
        return [
            (number, int(result.get("selected", 0)), int(result.get("online", 0)), config)
            for number, _status, config, result in self.finished_rounds()
        ]

    def finished_rounds(self) -> list[tuple[int, str, dict[str, Any], dict[str, Any]]]:
        """Return (round, status, config, result) of every closed or failed round, oldest first,
        without the participants (`rounds` reads them all; this runs after every round)."""
        rows = self._read(
            "SELECT round, status, config, result FROM rounds"
            " WHERE status != 'open' AND result IS NOT NULL ORDER BY round"
        )
        return [(int(r[0]), str(r[1]), json.loads(r[2]), json.loads(r[3])) for r in rows]

    def open_round_record(self) -> RoundRecord | None:
        """Return the round left open (by a crash or kill), or None."""
        open_rounds = [r for r in self.rounds() if r.status == "open"]
        return open_rounds[-1] if open_rounds else None

    def last_round(self) -> int:
        """Return the highest round number stored (0 when none)."""
        rows = self._read("SELECT MAX(round) FROM rounds")
        return int(rows[0][0] or 0)

    def metrics(self) -> dict[int, dict[str, float]]:
        """Return every round's metrics by round."""
        result: dict[int, dict[str, float]] = {}
        for number, name, value in self._read("SELECT round, name, value FROM metrics"):
            result.setdefault(int(number), {})[name] = float(value)
        return result

    def save_head(self, task: str, version: int, round_number: int, weights: Weights) -> None:
        """Store a global head version of a task."""
        self._write(
            "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?, ?)",
            (task, version, round_number, time.time(), encode_head(weights)),
        )

    def head_versions(self) -> list[tuple[str, int, int]]:
        """Return (task, version, round) of every stored head, oldest first."""
        rows = self._read("SELECT task, version, round FROM heads ORDER BY version, task")
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def latest_heads(self) -> tuple[int, dict[str, Weights]]:
        """Return the newest head version number and each task's newest head (0, {} if none)."""
        rows = self._read(
            "SELECT task, version, weights FROM heads h WHERE version ="
            " (SELECT MAX(version) FROM heads WHERE task = h.task)"
        )
        if not rows:
            return 0, {}
        version = max(int(r[1]) for r in rows)
        return version, {r[0]: decode_head(bytes(r[2])) for r in rows}

    def head(self, task: str, version: int) -> Weights:
        """Return one stored head.

        Raises:
            KeyError: no such head.
        """
        rows = self._read(
            "SELECT weights FROM heads WHERE task = ? AND version = ?", (task, version)
        )
        if not rows:
            raise KeyError(f"no head version {version} for task {task!r}")
        return decode_head(bytes(rows[0][0]))

    def save_strategy_state(self, task: str, state: Mapping[str, np.ndarray]) -> None:
        """Store a strategy's server state (FedAdam moments, ...) for a task."""
        self._write(
            "INSERT OR REPLACE INTO strategy_state VALUES (?, ?)", (task, encode_head(state))
        )

    def strategy_state(self, task: str) -> Weights:
        """Return a task's stored strategy state (empty when none)."""
        rows = self._read("SELECT state FROM strategy_state WHERE task = ?", (task,))
        return decode_head(bytes(rows[0][0])) if rows else {}
