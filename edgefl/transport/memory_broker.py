"""The in-process MQTT broker behind `memory://NAME` URLs (clients: `edgefl.transport.memory`).

It keeps what a real broker does that the roles rely on: topic filters with `+` and `#` (no
wildcard match of `$` topics at the first level), retained messages (an empty retained payload
clears), persistent sessions that queue QoS 1 messages while their client is away, the last will
on an abrupt disconnect (`MemoryBroker.drop`), and shared subscriptions (`$share/GROUP/filter`,
round-robin among the group). A publish is routed on the publisher's thread; each receiving
client takes it from there on its own loop thread, in order.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING

from edgefl.errors import TransportError
from edgefl.transport.client import Message, Will
from edgefl.transport.topic_tree import RetainedTree, SubscriptionTree, split_shared

if TYPE_CHECKING:
    from edgefl.transport.memory import MemoryClient

log = logging.getLogger(__name__)

SCHEME = "memory://"

_brokers: dict[str, MemoryBroker] = {}
_brokers_lock = threading.Lock()


def find_broker(name: str) -> MemoryBroker | None:
    """Return the running in-process broker called `name`, or None."""
    with _brokers_lock:
        return _brokers.get(name)


def check_filter(topic_filter: str) -> None:
    """Raise ValueError for a filter a broker would refuse (`#` not last, a wildcard in a level)."""
    _, plain = split_shared(topic_filter)
    levels = plain.split("/")
    for index, level in enumerate(levels):
        if ("#" in level and (level != "#" or index != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise ValueError(f"invalid topic filter {topic_filter!r}")


class _Session:
    """What the broker keeps for a client ID: its subscriptions and, when persistent, a queue."""

    __slots__ = ("client", "client_id", "filters", "persistent", "queued", "will")

    def __init__(self, client_id: str, persistent: bool) -> None:
        self.client_id = client_id
        self.persistent = persistent
        self.filters: dict[str, int] = {}
        self.client: MemoryClient | None = None
        self.will: Will | None = None
        self.queued: deque[Message] = deque()


class MemoryBroker:
    """An MQTT broker inside this process, found by clients through `memory://NAME`."""

    def __init__(self, name: str = "", *, max_queued_messages: int = 100_000) -> None:
        """Configure the broker; clients find it once start() registered it.

        Args:
            name: the name in `memory://NAME`; "" picks a unique one.
            max_queued_messages: per offline persistent session; newer messages are dropped
                beyond it (as Mosquitto's `max_queued_messages`).
        """
        self.name = name or f"broker-{uuid.uuid4().hex[:12]}"
        self.max_queued_messages = max_queued_messages
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._subscriptions: SubscriptionTree[_Session] = SubscriptionTree()
        # Shared subscriptions: the tree finds the (group, filter) pairs a topic matches; each
        # pair's members take turns.
        self._shared: SubscriptionTree[tuple[str, str]] = SubscriptionTree()
        self._groups: dict[tuple[str, str], dict[_Session, int]] = {}
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}
        self._retained: RetainedTree[Message] = RetainedTree()
        self._held: dict[str, float] = {}  # client ID -> until when it may not reconnect
        self._running = False

    @property
    def url(self) -> str:
        """Return the URL clients connect to."""
        return f"{SCHEME}{self.name}"

    @property
    def connection_count(self) -> int:
        """How many clients are connected now."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.client is not None)

    @property
    def retained_count(self) -> int:
        """How many topics hold a retained message."""
        with self._lock:
            return len(self._retained)

    def start(self) -> None:
        """Register the broker under its name, so clients of `memory://NAME` find it.

        Raises:
            TransportError: another running broker in this process has the name.
        """
        with _brokers_lock:
            if _brokers.get(self.name) not in (None, self):
                raise TransportError(f"an in-process broker named {self.name!r} is running")
            _brokers[self.name] = self
        with self._lock:
            self._running = True

    def stop(self) -> None:
        """Unregister and drop every client (they keep retrying, as after a broker crash).

        Retained messages and sessions are forgotten, as by a broker without persistence.
        """
        with _brokers_lock:
            if _brokers.get(self.name) is self:
                del _brokers[self.name]
        with self._lock:
            self._running = False
            clients = [s.client for s in self._sessions.values() if s.client is not None]
            self._sessions.clear()
            self._subscriptions = SubscriptionTree()
            self._shared = SubscriptionTree()
            self._groups.clear()
            self._retained = RetainedTree()
        for client in clients:
            client._lose_connection(self)

    def __enter__(self) -> MemoryBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop(self, client_id: str, hold_s: float | None = 0.0) -> bool:
        """Cut a client off abruptly, as a dead network would: its last will is published, its
        persistent session queues QoS 1 messages, and the client reconnects with its backoff.

        Args:
            client_id: the client.
            hold_s: refuse its reconnects for this long; None until `readmit(client_id)`.

        Returns:
            Whether the client was connected.
        """
        with self._lock:
            self._held[client_id] = time.monotonic() + hold_s if hold_s is not None else 1e308
            session = self._sessions.get(client_id)
            client = session.client if session is not None else None
        if client is None:
            return False
        self._detach(client, abrupt=True)
        client._lose_connection(self)
        return True

    def readmit(self, client_id: str) -> None:
        """Let a client held off by `drop(..., hold_s=None)` connect again."""
        with self._lock:
            self._held.pop(client_id, None)

    # -- called by MemoryClient --

    def _attach(self, client: MemoryClient) -> bool:
        """Connect `client`; returns session_present. Raises ConnectionRefusedError."""
        taken_over: MemoryClient | None = None
        with self._lock:
            if not self._running:
                raise ConnectionRefusedError(f"the in-process broker {self.name!r} stopped")
            if self._held.get(client.client_id, 0.0) > time.monotonic():
                raise ConnectionRefusedError("connection refused (simulated outage)")
            session = self._sessions.get(client.client_id)
            present = session is not None and session.persistent and client.persistent
            if session is not None and session.client is not None:
                taken_over = session.client  # the same client ID connected twice: MQTT's takeover
            if session is None or not present:
                if session is not None:
                    self._forget(session)
                session = _Session(client.client_id, client.persistent)
                self._sessions[client.client_id] = session
            session.client, session.will = client, client.will
            queued, session.queued = session.queued, deque()
            for message in queued:
                client._enqueue(message)
        if taken_over is not None and taken_over is not client:
            # On the loop thread: the caller holds its own client's lock, and two clients' locks
            # must never be taken nested.
            old = taken_over
            old.network.call_soon(lambda: old._lose_connection(self))
        return present

    def _detach(self, client: MemoryClient, abrupt: bool) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is None or session.client is not client:
                return
            session.client = None
            will = session.will if abrupt else None
            if not session.persistent:
                self._forget(session)
            if will is not None:
                self._route(will.topic, will.payload, will.qos, will.retain)

    def _forget(self, session: _Session) -> None:
        for topic_filter in list(session.filters):
            self._remove_filter(session, topic_filter)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    def _subscribe(self, client: MemoryClient, topic_filter: str, qos: int) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is None or session.client is not client:
                return
            session.filters[topic_filter] = qos
            group, plain = split_shared(topic_filter)
            if group is not None:
                self._groups.setdefault((group, plain), {})[session] = qos
                self._turns.setdefault((group, plain), itertools.count())
                self._shared.add(plain, (group, plain), 2)
                return  # a shared subscription gets no retained messages (MQTT 5, 4.8.2)
            self._subscriptions.add(plain, session, qos)
            for retained in self._retained.matching(plain):
                given = min(qos, retained.qos)
                client._enqueue(Message(retained.topic, retained.payload, given, True))

    def _unsubscribe(self, client: MemoryClient, topic_filter: str) -> None:
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is not None and session.client is client:
                self._remove_filter(session, topic_filter)

    def _remove_filter(self, session: _Session, topic_filter: str) -> None:
        if session.filters.pop(topic_filter, None) is None:
            return
        group, plain = split_shared(topic_filter)
        if group is None:
            self._subscriptions.remove(plain, session)
            return
        members = self._groups.get((group, plain), {})
        members.pop(session, None)
        if not members:
            self._groups.pop((group, plain), None)
            self._turns.pop((group, plain), None)
            self._shared.remove(plain, (group, plain))

    def _publish(
        self, client: MemoryClient, topic: str, payload: bytes, qos: int, retain: bool
    ) -> bool:
        """Route a message from a connected client; False when it is not connected."""
        with self._lock:
            session = self._sessions.get(client.client_id)
            if session is None or session.client is not client:
                return False
            self._route(topic, payload, qos, retain)
            return True

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if retain:
            self._retained.set(topic, Message(topic, payload, qos, True) if payload else None)
        # Messages are immutable: one object per QoS serves every receiver.
        by_qos = {q: Message(topic, payload, q, False) for q in range(qos + 1)}
        for session, wanted in self._subscriptions.match(topic).items():
            self._deliver(session, by_qos[min(qos, wanted)])
        if self._groups:
            for key in self._shared.match(topic):
                members = list(self._groups[key].items())
                turn = next(self._turns[key])
                # The next connected member takes it; with none connected, the next member's
                # persistent session queues it.
                ranked = members[turn % len(members) :] + members[: turn % len(members)]
                live = [m for m in ranked if m[0].client is not None] or ranked
                session, wanted = live[0]
                self._deliver(session, by_qos[min(qos, wanted)])

    def _deliver(self, session: _Session, message: Message) -> None:
        if session.client is not None:
            session.client._enqueue(message)
        elif session.persistent and message.qos > 0:
            if len(session.queued) < self.max_queued_messages:
                session.queued.append(message)
            else:
                log.warning("%s: queue full, dropped a message on %s", session.client_id,
                            message.topic)  # fmt: skip
