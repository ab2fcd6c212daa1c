"""Update intake: one update message in, one verdict out, handed to whoever keeps it.

The aggregator and its ingest workers (`edgefl.roles.ingest_worker`) take updates the same way:
parse the topic, open the seal or MAC, let the round engine judge the bytes
(`RoundEngine.receive`), and hand the verdict to a sink (the aggregator records it in SQLite; a
worker notes it for its coordinator). Everything happens under the caller's lock, so a verdict
is kept before the round it completes can close.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from edgefl.core.round_state import Verdict
from edgefl.security.identity import AggregatorAuth
from edgefl.transport import topics
from edgefl.transport.client import Message
from edgefl.transport.sealed import SealError

# Keeps a verdict (with the update's bytes, seal removed, when it was read); called under the lock.
VerdictSink = Callable[[Verdict, bytes | None], None]


class Judge(Protocol):
    """What the intake needs of a round engine (sync `RoundEngine` or async)."""

    def receive(self, number: int, device: str, payload: bytes) -> Verdict:
        """Judge one update's bytes."""
        ...

    def refuse(
        self, number: int, device: str, code: str, reason: str, size: int, sha256: str = "",
        answers: bool = True,
    ) -> Verdict:  # fmt: skip
        """Count an update refused before it was read."""
        ...


class UpdateIntake:
    """Turns update messages into verdicts for a sink; see the module docstring."""

    def __init__(
        self,
        engine: Callable[[], Judge | None],
        lock: threading.Condition,
        auth: AggregatorAuth,
        max_update_bytes: Callable[[], int],
        sink: VerdictSink,
    ) -> None:
        """Args:
        engine: returns the engine judging updates now (None: none yet, updates are dropped);
            a callable because the async aggregator and a worker replace their engine.
        lock: guards the engine; the last answer of a round notifies it.
        auth: opens seals and MACs.
        max_update_bytes: returns the size limit oversized updates are reported against.
        sink: keeps each verdict.
        """
        self._engine = engine
        self._lock = lock
        self._auth = auth
        self._limit = max_update_bytes
        self._sink = sink

    def on_oversized(self, topic: str, size: int) -> None:
        """Count an update the client dropped unread for its size ("oversized")."""
        parsed = topics.parse(topic)
        number = parsed.round_number if parsed and parsed.round_number is not None else -1
        device = parsed.device_id if parsed and parsed.device_id else "?"
        with self._lock:
            engine = self._engine()
            if engine is None:
                return
            # Dropped unread: with seals on, nothing says it came from the device it names.
            verdict = engine.refuse(
                number, device, "oversized", f"{size} bytes exceeds the limit {self._limit()}",
                size, answers=self._auth.is_insecure,
            )  # fmt: skip
            self._keep(verdict)

    def on_update(self, message: Message) -> None:
        """Judge one update message and keep its verdict."""
        parsed = topics.parse(message.topic)
        size = len(message.payload)
        with self._lock:
            engine = self._engine()
            if engine is None:
                return
            if parsed is None or parsed.round_number is None or parsed.device_id is None:
                reason = f"{message.topic} is not an update topic"
                self._keep(engine.refuse(-1, "?", "bad-topic", reason, size))
                return
            if not message.payload:
                return  # an empty retained message clears a topic; nothing was sent
            number, device = parsed.round_number, parsed.device_id
            try:
                payload = self._auth.open(message.topic, device, message.payload)
            except SealError as exc:  # a forgery is counted, but is not the device's answer
                self._keep(engine.refuse(number, device, exc.code, exc.reason, size))
                return
            # Kept under the lock, before the round can close, so the last update's verdict is
            # in what closing the round keeps.
            self._keep(engine.receive(number, device, payload), payload)

    def _keep(self, verdict: Verdict, payload: bytes | None = None) -> None:
        self._sink(verdict, payload)
        if verdict.complete:
            # Only the last answer wakes the round's waiter: waking it per update cost a thread
            # switch (and, through its periodic flush, a SQLite commit) for every message.
            self._lock.notify_all()
