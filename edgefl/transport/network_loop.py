"""`NetworkLoop`: one thread that runs the socket I/O of many MQTT clients, plus timers.

Many clients (a simulation runs 1,000 agents in one process) share one loop: a single thread that
waits on every client's socket with `selectors` and calls the client back when its socket is
readable or writable, and once a second for housekeeping (pings, retries). No paho here: the
client turns those calls into paho's external-loop hooks.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefl.transport.client import MqttClient

log = logging.getLogger(__name__)

_MISC_INTERVAL_S = 1.0


class TimerHandle:
    """A call scheduled on a NetworkLoop; cancel() stops it from running."""

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the call (no effect once it ran)."""
        self.cancelled = True


class NetworkLoop:
    """One thread that runs the network I/O of many MqttClients, plus timers.

    Start it once (or let the first client start it); pass it to every client that should share
    it. All paho calls that touch a socket happen on this thread.
    """

    def __init__(self, name: str = "edgefl-network") -> None:
        """Create the loop; the thread starts on start() or when the first client connects."""
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._sequence = itertools.count()
        self._clients: set[MqttClient] = set()
        self._thread: threading.Thread | None = None
        self._running = False
        self._woken = False

    @property
    def running(self) -> bool:
        """Whether the loop thread is running."""
        return self._running

    def start(self) -> None:
        """Start the loop thread (no effect when already running)."""
        with self._lock:
            if self._running:
                return
            self._running = True
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop thread and close its selector; clients on it stop working."""
        with self._lock:
            if not self._running:
                if self._thread is None:  # never started: nothing else will close these
                    self._close_resources()
                return
            self._running = False
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on the loop thread."""
        return self._thread is threading.current_thread()

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop thread as soon as possible (thread-safe)."""
        with self._lock:
            self._pending.append(callback)
        self._wake()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the loop thread after `delay` seconds (thread-safe)."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        with self._lock:
            heapq.heappush(self._timers, (handle.when, next(self._sequence), handle))
        self._wake()
        return handle

    def _wake(self) -> None:
        if self.in_loop_thread():
            return
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- loop-thread only --

    def _add_client(self, client: MqttClient) -> None:
        self._clients.add(client)

    def _remove_client(self, client: MqttClient) -> None:
        self._clients.discard(client)

    def _register(self, sock: Any, client: MqttClient) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, client)

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _set_write(self, sock: Any, client: MqttClient, want: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, events, client)

    def _run(self) -> None:
        next_misc = time.monotonic() + _MISC_INTERVAL_S
        while self._running:
            with self._lock:
                pending, self._pending = self._pending, []
            for callback in pending:
                self._guard(callback)
            now = time.monotonic()
            timeout = next_misc - now
            with self._lock:
                if self._timers:
                    timeout = min(timeout, self._timers[0][0] - now)
                if self._pending:
                    timeout = 0
            try:
                events = self._selector.select(max(0.0, timeout))
            except OSError:
                events = []
            for key, mask in events:
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    with self._lock:
                        self._woken = False
                    continue
                client: MqttClient = key.data
                if mask & selectors.EVENT_WRITE:
                    self._guard(client._on_writable)
                if mask & selectors.EVENT_READ:
                    self._guard(client._on_readable)
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._timers or self._timers[0][0] > now:
                        break
                    _, _, handle = heapq.heappop(self._timers)
                if not handle.cancelled:
                    self._guard(handle.callback)
            if now >= next_misc:
                next_misc = now + _MISC_INTERVAL_S
                for client in list(self._clients):
                    self._guard(client._on_misc)
        self._close_resources()

    def _close_resources(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    @staticmethod
    def _guard(callback: Callable[[], None]) -> None:
        # One client's failure must never stop the loop that serves a thousand others.
        try:
            callback()
        except Exception:
            log.exception("network loop callback failed")
