"""Open a broker client for a URL: `MqttClient` for `mqtt://`/`mqtts://`, `MemoryClient` for
`memory://NAME` (an in-process broker, `edgefl.transport.memory`). The roles build their client
here, so a simulation runs the same agent and aggregator code over either.
"""

from __future__ import annotations

from typing import Protocol

from edgefl.transport.client import (
    DEFAULT_MAX_PAYLOAD,
    ConnectHandler,
    MessageHandler,
    MqttClient,
    OversizeHandler,
    WillSource,
)
from edgefl.transport.memory import MemoryClient, memory_broker_name
from edgefl.transport.network_loop import NetworkLoop
from edgefl.transport.tls import TlsSettings


class Publication(Protocol):
    """What a publish returns: whether the broker took the message, and a wait for it."""

    @property
    def published(self) -> bool:
        """Whether the broker acknowledged the message."""
        ...

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait until published; False on timeout."""
        ...


class BrokerLocation(Protocol):
    """Where a client connects."""

    @property
    def url(self) -> str:
        """The broker's URL without credentials."""
        ...


class BrokerClient(Protocol):
    """The client interface the roles use; `MqttClient` and `MemoryClient` both provide it."""

    client_id: str
    network: NetworkLoop

    @property
    def address(self) -> BrokerLocation:
        """Where the client connects."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the connection is up."""
        ...

    def on_connect(self, hook: ConnectHandler) -> None:
        """Call `hook(session_present)` after every (re)connect."""
        ...

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `handler`."""
        ...

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter`."""
        ...

    def connect(self, timeout: float | None = 10.0) -> None:
        """Connect, waiting up to `timeout`."""
        ...

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected."""
        ...

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> Publication:
        """Send a message."""
        ...

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly."""
        ...


def is_memory_url(url: str) -> bool:
    """Whether `url` names an in-process broker (`memory://NAME`, or `memory` for a fresh one)."""
    return memory_broker_name(url) is not None


def open_client(
    url: str,
    client_id: str,
    *,
    network: NetworkLoop | None = None,
    will: WillSource | None = None,
    persistent_session: bool = False,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    on_oversized: OversizeHandler | None = None,
    tls: TlsSettings | None = None,
) -> BrokerClient:
    """Return an unconnected client for `url` (the arguments are `MqttClient`'s).

    Raises:
        TransportError: the URL is invalid or TLS files do not fit it (a BrokerUrlError).
    """
    kind: type[MqttClient] | type[MemoryClient] = MemoryClient if is_memory_url(url) else MqttClient
    return kind(
        url,
        client_id,
        network=network,
        will=will,
        persistent_session=persistent_session,
        max_payload_bytes=max_payload_bytes,
        on_oversized=on_oversized,
        tls=tls,
    )
