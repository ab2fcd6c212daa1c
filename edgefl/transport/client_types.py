"""What a client's callers see: a received message, the last will, handlers, a publish handle;
and the wait for a first connection that both clients (`MqttClient`, `MemoryClient`) share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefl.errors import TransportError

if TYPE_CHECKING:  # paho is imported by the client, which makes the handles
    import paho.mqtt.client as paho


@dataclass(frozen=True)
class Message:
    """A message received on a subscribed topic."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes for a client that vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


# A last will, or what makes it anew before each connection attempt (a board's will names the
# connection it belongs to, `DeviceStatus.connected_at`).
WillSource = Will | Callable[[], Will]
MessageHandler = Callable[[Message], None]
OversizeHandler = Callable[[str, int], None]
ConnectHandler = Callable[[bool], None]


class PublishHandle:
    """The result of a publish; wait() blocks until the broker acknowledged it (QoS 1)."""

    def __init__(self, info: paho.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def published(self) -> bool:
        """Whether the message left (QoS 0) or was acknowledged by the broker (QoS 1/2)."""
        try:
            return bool(self._info.is_published())
        except (RuntimeError, ValueError):
            # paho raises when the publish call found no connection, yet keeps a QoS >= 1
            # message queued and marks it published once the broker acknowledges it later.
            return bool(getattr(self._info, "_published", False))

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until published (False on timeout); never on the loop thread. A message published
        while disconnected stays queued (QoS >= 1) and goes after the reconnect, so this waits
        across a broker restart."""
        deadline = time.monotonic() + timeout
        while not self.published:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True


def wait_first_connection(
    url: str,
    timeout: float,
    connected: threading.Event,
    refused: threading.Event,
    last_error: Callable[[], str],
    close: Callable[[], None],
) -> None:
    """Wait until `connected` is set; at the timeout or a refusal, `close()` and raise.

    Args:
        url: the broker's URL, for the message.
        timeout: seconds to wait.
        connected: set when the broker accepted the connection.
        refused: set when retrying cannot help (a refused login, a failed TLS handshake).
        last_error: what went wrong last ("" for nothing known).
        close: stops the attempts.

    Raises:
        TransportError: not connected within `timeout`, or refused.
    """
    deadline = time.monotonic() + timeout
    while not connected.wait(0.01):
        if refused.is_set() or time.monotonic() >= deadline:
            break
    if not connected.is_set():
        error = last_error()
        close()
        raise TransportError(
            f"cannot connect to the broker at {url}" + (f": {error}" if error else "")
        )
