"""An in-process MQTT client and broker: `MqttClient`'s interface with no sockets and no packets.

The broker is `edgefl.transport.memory_broker.MemoryBroker` (also importable from here). A
simulation runs the real agents and aggregator over them (`memory://NAME` URLs, see
`edgefl.transport.connect.open_client`). What a real broker does that the roles rely on is kept:
topic filters with `+` and `#` (no wildcard match of `$` topics at the first level), retained
messages (an empty retained payload clears), persistent sessions that queue QoS 1 messages while
their client is away, the last will on an abrupt disconnect (`MemoryBroker.drop`), shared
subscriptions (`$share/GROUP/filter`, round-robin among the group), and delivery to each client
in publish order on its `NetworkLoop` thread, never on the publisher's stack (as paho calls
handlers on its network thread). Payloads are passed by reference.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

from edgefl.errors import BrokerUrlError, TransportError
from edgefl.transport.client import (
    DEFAULT_MAX_PAYLOAD,
    ConnectHandler,
    Message,
    MessageHandler,
    OversizeHandler,
    Will,
    WillSource,
)
from edgefl.transport.client_types import wait_first_connection
from edgefl.transport.memory_broker import SCHEME, MemoryBroker, check_filter, find_broker
from edgefl.transport.network_loop import NetworkLoop, TimerHandle
from edgefl.transport.tls import TlsSettings
from edgefl.transport.topic_tree import split_shared
from edgefl.transport.topics import matches

log = logging.getLogger(__name__)


def memory_broker_name(url: str) -> str | None:
    """Return the broker name of a `memory://NAME` URL ("" for `memory://`), else None."""
    text = url.strip()
    if text == "memory":
        return ""
    if not text.startswith(SCHEME):
        return None
    return text[len(SCHEME) :].strip("/")


@dataclass(frozen=True)
class MemoryAddress:
    """Which in-process broker a client talks to."""

    name: str

    @property
    def url(self) -> str:
        """Return the broker's URL."""
        return f"{SCHEME}{self.name}"


class MemoryPublishHandle:
    """The result of a publish to the in-process broker: acknowledged once the broker routed it."""

    __slots__ = ("_published",)

    def __init__(self, published: bool = False) -> None:
        self._published = published

    @property
    def published(self) -> bool:
        """Whether the broker took the message (at once while connected; else after reconnect)."""
        return self._published

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until published; returns False on timeout (a publish queued while offline)."""
        deadline = time.monotonic() + timeout
        while not self._published:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True


_Outgoing = tuple[str, bytes, int, bool, MemoryPublishHandle]


class MemoryClient:
    """A client of an in-process broker with `MqttClient`'s interface and behaviour.

    Handlers run on the NetworkLoop thread in the order the broker routed the messages; they
    must not block for long and must never wait on a publish handle, as with `MqttClient`.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        network: NetworkLoop | None = None,
        will: WillSource | None = None,
        persistent_session: bool = False,
        keepalive: int = 30,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        on_oversized: OversizeHandler | None = None,
        tls: TlsSettings | None = None,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        """Configure the client; nothing connects until connect() (arguments as `MqttClient`;
        `keepalive` is accepted and unused: nothing in-process needs pings).

        Raises:
            BrokerUrlError: the URL is not `memory://NAME`, or TLS files are given.
        """
        name = memory_broker_name(url)
        if not name:
            raise BrokerUrlError(f"broker URL {url!r} must be memory://NAME")
        if tls is not None and tls.given:
            raise BrokerUrlError("an in-process broker (memory://) takes no TLS files")
        del keepalive
        self.address = MemoryAddress(name)
        self.client_id = client_id
        self.network = network or NetworkLoop(name=f"edgefl-memory-{client_id}")
        self._own_network = network is None
        # A function makes the will anew before each connection attempt, as for MqttClient.
        self._will_source = will
        self.will: Will | None = will if isinstance(will, Will) else None
        self.persistent = persistent_session
        self.max_payload_bytes = max_payload_bytes
        self.on_oversized = on_oversized
        self._backoff_min, self._backoff_max = backoff_min_s, backoff_max_s
        self._backoff = backoff_min_s
        self._handlers: list[tuple[str, str, int, MessageHandler]] = []
        self._connect_hooks: list[ConnectHandler] = []
        self._connected = threading.Event()
        self._lock = threading.RLock()  # connection state, handlers and the outbox
        self._broker: MemoryBroker | None = None
        self._outbox: deque[_Outgoing] = deque()  # QoS >= 1 publishes made while offline
        self._inbox: deque[Message] = deque()
        self._inbox_lock = threading.Lock()
        self._drain_pending = False
        self._started = False
        self._closing = False
        self._ever_connected = False
        self._refused = threading.Event()
        self._last_error = ""
        self._reconnect_timer: TimerHandle | None = None

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it is up."""
        return self._connected.is_set()

    def on_connect(self, hook: ConnectHandler) -> None:
        """Call `hook(session_present)` on the loop thread after every (re)connect."""
        self._connect_hooks.append(hook)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `handler` (on the loop thread); renewed
        after every reconnect. Retained messages it matches are delivered (again) at once.

        Raises:
            ValueError: the filter is invalid.
        """
        check_filter(topic_filter)
        _, plain = split_shared(topic_filter)
        with self._lock:
            self._handlers.append((topic_filter, plain, qos, handler))
            if self._broker is not None:
                self._broker._subscribe(self, topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter` (every handler registered for it); thread-safe."""
        with self._lock:
            self._handlers = [h for h in self._handlers if h[0] != topic_filter]
            if self._broker is not None:
                self._broker._unsubscribe(self, topic_filter)

    def connect(self, timeout: float | None = 10.0) -> None:
        """Start connecting (retrying with backoff) and wait for the broker to accept.

        Args:
            timeout: seconds to wait for the first connection; None returns at once.

        Raises:
            TransportError: not connected within `timeout`, or no broker of that name runs in
                this process.
        """
        if self._started:
            raise TransportError(f"client {self.client_id} is already connected or connecting")
        self._started, self._closing = True, False
        self.network.start()
        self.network.call_soon(self._attempt)
        if timeout is not None:
            wait_first_connection(self.address.url, timeout, self._connected, self._refused,
                                  lambda: self._last_error, self.close)  # fmt: skip

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected; returns False on timeout."""
        return self._connected.wait(timeout)

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> MemoryPublishHandle:
        """Hand a message to the broker; returns a handle to wait on. Thread-safe.

        While disconnected, QoS >= 1 messages stay queued and go out after the reconnect.

        Raises:
            ValueError: the topic is empty or holds a wildcard (paho refuses these too).
        """
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}")
        data = payload.encode() if isinstance(payload, str) else payload
        handle = MemoryPublishHandle()
        with self._lock:
            broker = self._broker
            if broker is not None and broker._publish(self, topic, data, qos, retain):
                handle._published = True
            elif qos > 0:
                self._outbox.append((topic, data, qos, retain, handle))
        return handle

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and stop retrying; safe to call twice."""
        del timeout  # nothing is in flight: a connected client's publishes are already routed
        if not self._started:
            return
        self._closing, self._started = True, False
        with self._lock:
            broker, self._broker = self._broker, None
            self._connected.clear()
            timer, self._reconnect_timer = self._reconnect_timer, None
        if timer is not None:
            timer.cancel()
        if broker is not None:
            broker._detach(self, abrupt=False)
        if self._own_network:
            self.network.stop()

    # -- the broker's side --

    def _enqueue(self, message: Message) -> None:
        """Queue a message for the loop thread (called by the broker on any thread)."""
        with self._inbox_lock:
            self._inbox.append(message)
            if self._drain_pending:
                return
            self._drain_pending = True
        self.network.call_soon(self._drain)

    def _lose_connection(self, broker: MemoryBroker) -> None:
        """The broker cut this client off (drop, takeover, stop): reconnect with backoff."""
        with self._lock:
            if self._broker is not broker:
                return
            self._broker = None
            self._connected.clear()
        if not self._closing:
            self._last_error = "connection lost"
            log.info("%s: connection lost; reconnecting", self.client_id)
            self.network.call_soon(self._schedule_reconnect)

    # -- loop thread --

    def _drain(self) -> None:
        with self._inbox_lock:
            batch, self._inbox = self._inbox, deque()
            self._drain_pending = False
        if self._closing:
            return
        for message in batch:
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        if len(message.payload) > self.max_payload_bytes:
            log.warning("%s: dropped %d-byte message on %s (limit %d)", self.client_id,
                        len(message.payload), message.topic, self.max_payload_bytes)  # fmt: skip
            if self.on_oversized is not None:
                self.on_oversized(message.topic, len(message.payload))
            return
        for _, plain, _, handler in list(self._handlers):
            if matches(plain, message.topic):
                try:
                    handler(message)
                except Exception:
                    log.exception("%s: handler for %s failed", self.client_id, message.topic)

    def _attempt(self) -> None:
        self._reconnect_timer = None
        if self._closing:
            return
        broker = find_broker(self.address.name)
        try:
            if broker is None:
                raise ConnectionRefusedError(
                    f"no in-process broker named {self.address.name!r} runs in this process"
                )
            if self._will_source is not None and not isinstance(self._will_source, Will):
                self.will = self._will_source()
            with self._lock:
                present = broker._attach(self)
                self._broker = broker
                filters: dict[str, int] = {}
                for topic_filter, _, qos, _ in self._handlers:
                    filters[topic_filter] = max(qos, filters.get(topic_filter, 0))
                for topic_filter, qos in filters.items():
                    broker._subscribe(self, topic_filter, qos)
                self._connected.set()
                outbox, self._outbox = self._outbox, deque()
        except ConnectionRefusedError as exc:
            self._last_error = str(exc)
            if broker is None and not self._ever_connected:
                self._refused.set()  # no broker will appear under this name: fail at once
            self._schedule_reconnect()
            return
        self._ever_connected = True
        self._backoff = self._backoff_min
        for topic, data, qos, retain, handle in outbox:
            if broker._publish(self, topic, data, qos, retain):
                handle._published = True
            else:
                self._outbox.append((topic, data, qos, retain, handle))
        for hook in list(self._connect_hooks):
            try:
                hook(present)
            except Exception:
                log.exception("%s: connect hook failed", self.client_id)

    def _schedule_reconnect(self) -> None:
        if self._closing or self._reconnect_timer is not None or self.connected:
            return
        delay = self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self._backoff_max)
        self._reconnect_timer = self.network.call_later(delay, self._attempt)


__all__ = [
    "SCHEME",
    "MemoryAddress",
    "MemoryBroker",
    "MemoryClient",
    "MemoryPublishHandle",
    "check_filter",
    "find_broker",
    "memory_broker_name",
]
