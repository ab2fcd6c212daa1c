"""A small typed MQTT client over paho, driven by a `NetworkLoop` (in `network_loop`).

paho is imported here and in `buffered_paho` and nowhere else. Callers see `Message` objects
and plain callables, never a paho callback. The client hands its socket to the loop and answers
its readable, writable and housekeeping calls with paho's external-loop hooks. Handlers run on
the loop thread: they must not block for long, nor wait on a publish handle.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefl.errors import TransportError
from edgefl.transport.broker import BrokerAddress, parse_broker_url
from edgefl.transport.buffered_paho import MAX_PACKETS_PER_WAKE, BufferedPaho, tls_pending
from edgefl.transport.client_types import (
    ConnectHandler,
    Message,
    MessageHandler,
    OversizeHandler,
    PublishHandle,
    Will,
    WillSource,
    wait_first_connection,
)
from edgefl.transport.network_loop import NetworkLoop, TimerHandle
from edgefl.transport.tls import (
    TlsSettings,
    check_tls,
    describe_refusal,
    describe_tls_error,
    is_login_refusal,
)
from edgefl.transport.topics import matches

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


class MqttClient:
    """One MQTT connection with reconnect and resubscribe, driven by a NetworkLoop.

    Subscriptions are remembered and renewed after every reconnect (a broker without persistence
    forgets them). With `persistent_session=True` (the agent) the session is not clean, so QoS 1
    messages published while offline are delivered once the client is back.
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
        """Configure the client; nothing connects until connect().

        Args:
            url: `mqtt://[user:pass@]host[:port]` or `mqtts://...` (TLS, see `tls`).
            client_id: the MQTT client ID; must be stable for a persistent session.
            network: the loop to run on; None creates a private one.
            will: the last will, or a function that makes it before each connection attempt.
            persistent_session: connect with clean session off (MQTT 3.1.1).
            keepalive: seconds between pings.
            max_payload_bytes: larger messages are dropped on receive and reported to
                `on_oversized(topic, size)` instead of reaching a handler.
            on_oversized: see `max_payload_bytes`; None only logs the drop.
            tls: the CA file and client certificate for `mqtts://` (None: the system CAs and
                no client certificate).
            backoff_min_s: first reconnect delay; doubles up to `backoff_max_s`.
            backoff_max_s: the longest reconnect delay (before ±50 % jitter).

        Raises:
            TransportError: the URL is invalid, or TLS files are given for a plain `mqtt://` URL
                or are unusable (a BrokerUrlError: the caller's mistake).
        """
        self.address: BrokerAddress = parse_broker_url(url)
        self.tls = tls or TlsSettings()
        check_tls(self.address, self.tls)
        self.client_id = client_id
        self.network = network or NetworkLoop(name=f"edgefl-network-{client_id}")
        self._own_network = network is None
        self.max_payload_bytes = max_payload_bytes
        self.on_oversized = on_oversized
        self._keepalive = keepalive
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s
        self._backoff = backoff_min_s
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._connect_hooks: list[ConnectHandler] = []
        self._connected = threading.Event()
        self._closing = False
        # The last QoS >= 1 publishes, bounded: close() waits for their acknowledgements.
        self._recent: deque[PublishHandle] = deque(maxlen=1024)
        self._started = False
        self._reconnect_timer: TimerHandle | None = None
        self._last_error = ""
        # Set when the broker refused the login or the TLS handshake failed: retrying with the
        # same credentials cannot help, so connect() gives up at once instead of at its timeout.
        self._refused = threading.Event()
        self._ever_connected = False
        self._sock: Any = None
        self._tls_sock: Any = None
        self._reading = False
        self._write_registered = False

        self._paho = BufferedPaho(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent_session,
            protocol=paho.MQTTv311,
        )
        self._paho.max_queued_messages_set(0)
        self._paho.max_inflight_messages_set(1000)
        if self.address.username:
            self._paho.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            self._paho.tls_set(
                ca_certs=self.tls.cafile,
                certfile=self.tls.certfile,
                keyfile=self.tls.keyfile,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            self._track_tls_sockets()
        self._paho.on_log = self._handle_log
        self._will = will
        if isinstance(will, Will):
            self._paho.will_set(will.topic, will.payload, will.qos, will.retain)
        self._paho.on_connect = self._handle_connect
        self._paho.on_disconnect = self._handle_disconnect
        self._paho.on_message = self._handle_message
        self._paho.on_socket_open = self._handle_socket_open
        self._paho.on_socket_close = self._handle_socket_close
        self._paho.on_socket_register_write = self._handle_register_write
        self._paho.on_socket_unregister_write = self._handle_unregister_write

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the connection and it is up."""
        return self._connected.is_set()

    def on_connect(self, hook: ConnectHandler) -> None:
        """Call `hook(session_present)` on the loop thread after every (re)connect."""
        self._connect_hooks.append(hook)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `handler` (on the loop thread).

        Subscriptions made before connect() are sent on connect; later ones at once. They are
        renewed after every reconnect.
        """
        self._handlers.append((topic_filter, qos, handler))
        if self.connected:

            def renew() -> None:
                self._paho.subscribe(topic_filter, qos)

            self.network.call_soon(renew)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter` (every handler registered for it); thread-safe.

        It is not renewed after a reconnect, so retained messages on it are not sent again: a
        board drops a release's chunk topics once it is installed, and must not receive
        megabytes of retained chunks again on every reconnect.
        """
        self._handlers = [h for h in self._handlers if h[0] != topic_filter]
        if self.connected:

            def drop() -> None:
                self._paho.unsubscribe(topic_filter)

            self.network.call_soon(drop)

    def connect(self, timeout: float | None = 10.0) -> None:
        """Start connecting (retrying with backoff) and wait for the broker to accept.

        Args:
            timeout: seconds to wait for the first connection; None returns at once and keeps
                trying in the background.

        Raises:
            TransportError: not connected within `timeout` (attempts stop).
        """
        if self._started:
            raise TransportError(f"client {self.client_id} is already connected or connecting")
        self._started = True
        self._closing = False
        self._paho.connect_async(self.address.host, self.address.port, self._keepalive)
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
    ) -> PublishHandle:
        """Queue a message; returns a handle to wait on. Thread-safe.

        While disconnected, QoS >= 1 messages stay queued and go out after the reconnect.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        handle = PublishHandle(self._paho.publish(topic, data, qos=qos, retain=retain))
        if qos > 0:
            self._recent.append(handle)  # close() waits for these before it disconnects
        return handle

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will) and stop retrying; safe to call twice.

        Called off the network thread while connected, it first waits (within `timeout`) for
        the broker to acknowledge the QoS >= 1 messages published last (a run's final result
        is not lost to the disconnect that follows it).
        """
        if not self._started:
            return
        if self.connected and not self.network.in_loop_thread():
            deadline = time.monotonic() + timeout / 2
            for handle in list(self._recent):
                if not handle.wait(max(0.0, deadline - time.monotonic())):
                    break
        self._closing = True
        self._started = False
        done = threading.Event()

        def disconnect() -> None:
            if self._reconnect_timer is not None:
                self._reconnect_timer.cancel()
            if self._sock is not None:
                self._paho.disconnect()
                # Flush the DISCONNECT now: the socket is dropped from the loop right after.
                self._paho.loop_write()
                self._paho._sock_close()
            self.network._remove_client(self)
            self._connected.clear()
            done.set()

        if self.network.running:
            if self.network.in_loop_thread():
                disconnect()
            else:
                self.network.call_soon(disconnect)
                done.wait(timeout)
        if self._own_network:
            self.network.stop()

    # -- loop thread: connection management --

    def _attempt(self) -> None:
        self._reconnect_timer = None
        if self._closing:
            return
        self.network._add_client(self)
        if self._will is not None and not isinstance(self._will, Will):
            will = self._will()
            self._paho.will_set(will.topic, will.payload, will.qos, will.retain)
        try:
            self._paho.reconnect()
        except ssl.SSLError as exc:
            if self._tls_sock is not None and self._tls_sock is not self._sock:
                self._tls_sock.close()
            self._tls_failed(str(exc))
            self._schedule_reconnect()
        except OSError as exc:
            self._last_error = str(exc)
            self._schedule_reconnect()

    def _track_tls_sockets(self) -> None:
        # paho drops the TLS socket unclosed when the handshake fails (a ResourceWarning, an
        # error under pytest): remember the last one so that _attempt can close it.
        context = self._paho._ssl_context
        assert context is not None
        wrap = context.wrap_socket

        def wrap_and_keep(*args: Any, **kwargs: Any) -> Any:
            self._tls_sock = wrap(*args, **kwargs)
            return self._tls_sock

        context.wrap_socket = wrap_and_keep  # type: ignore[method-assign]

    def _tls_failed(self, error: str) -> None:
        self._last_error = describe_tls_error(error)
        self._refused.set()
        log.warning("%s: %s", self.client_id, self._last_error)

    def _handle_log(self, _client: Any, _userdata: Any, level: int, text: str) -> None:
        # A broker that refuses the client certificate says so in a TLS alert after the
        # handshake (TLS 1.3); paho reports it only as a log line and a lost connection.
        if level == paho.MQTT_LOG_ERR and "alert" in text:
            self._tls_failed(text.removeprefix("failed to receive on socket: "))

    def _schedule_reconnect(self) -> None:
        if self._closing or self._reconnect_timer is not None:
            return
        delay = self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self._backoff_max)
        self._reconnect_timer = self.network.call_later(delay, self._attempt)

    def _handle_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        # Without TCP_NODELAY, a reply written just after a PUBACK waits for the peer's delayed
        # ACK (40 ms on Linux): 85 ms per coordinator-worker exchange, 2.4x fewer updates/s.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._write_registered = False
        self.network._register(sock, self)

    def _handle_socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.network._unregister(sock)
        if self._sock is sock:
            self._sock = None

    def _handle_register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if not self.network.in_loop_thread():
            self.network.call_soon(lambda: self._flush(sock))
        elif not self._reading:
            self._want_write(sock, True)
        # While reading, acknowledgements queue up and are flushed once after the reads: one
        # write per batch instead of a selector change and a loop turn per PUBACK.

    def _handle_unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if self.network.in_loop_thread():
            self._want_write(sock, False)

    def _want_write(self, sock: Any, want: bool) -> None:
        if want != self._write_registered:
            self._write_registered = want
            self.network._set_write(sock, self, want)

    def _flush(self, sock: Any) -> None:
        if self._sock is sock:
            self._write_now()

    def _on_readable(self) -> None:
        # One packet per call: go on while read (or TLS-decrypted) bytes wait unsignalled.
        self._reading = True
        more = False
        try:
            for _ in range(MAX_PACKETS_PER_WAKE):
                if self._sock is None:
                    break
                self._paho.loop_read()
                more = self._paho.buffered or tls_pending(self._sock)
                if not more:
                    break
        finally:
            self._reading = False
        if more and self._sock is not None:
            self.network.call_soon(self._on_readable)
        if self._sock is not None and self._paho.want_write():
            self._write_now()
        if self._sock is None and not self._closing:
            self._schedule_reconnect()

    def _write_now(self) -> None:
        self._paho.loop_write()
        # paho only calls register_write on a change it saw itself; a write callback skipped
        # while reading would leave a half-sent message waiting, so set the interest here.
        if self._sock is not None:
            self._want_write(self._sock, self._paho.want_write())

    def _on_writable(self) -> None:
        self._write_now()
        if self._sock is None and not self._closing:
            self._schedule_reconnect()

    def _on_misc(self) -> None:
        if self._sock is not None:
            self._paho.loop_misc()
            if self._sock is None and not self._closing:
                self._schedule_reconnect()

    def _handle_connect(
        self, _client: Any, _userdata: Any, flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            self._last_error = describe_refusal(str(reason))
            if is_login_refusal(str(reason)):
                self._refused.set()
            log.warning("%s: %s", self.client_id, self._last_error)
            return
        self._ever_connected = True
        self._refused.clear()
        # Only the first connection's TLS alerts are read from paho's log: formatting every log
        # line costs CPU per message on a busy aggregator.
        self._paho.on_log = None
        self._backoff = self._backoff_min
        filters: dict[str, int] = {}
        for topic_filter, qos, _ in self._handlers:
            filters[topic_filter] = max(qos, filters.get(topic_filter, 0))
        if filters:
            self._paho.subscribe(list(filters.items()))
        self._connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        for hook in list(self._connect_hooks):
            try:
                hook(session_present)
            except Exception:
                log.exception("%s: connect hook failed", self.client_id)

    def _handle_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        self._connected.clear()
        if not self._closing:
            if not self._refused.is_set():
                self._last_error = f"connection lost: {reason}"
            log.info("%s: %s; reconnecting", self.client_id, self._last_error)
            self._schedule_reconnect()

    def _handle_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if len(payload) > self.max_payload_bytes:
            log.warning(
                "%s: dropped %d-byte message on %s (limit %d)",
                self.client_id,
                len(payload),
                msg.topic,
                self.max_payload_bytes,
            )
            if self.on_oversized is not None:
                self.on_oversized(msg.topic, len(payload))
            return
        message = Message(msg.topic, payload, int(msg.qos), bool(msg.retain))
        for topic_filter, _, handler in list(self._handlers):
            if matches(topic_filter, msg.topic):
                try:
                    handler(message)
                except Exception:
                    log.exception("%s: handler for %s failed", self.client_id, msg.topic)
