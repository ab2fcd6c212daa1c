"""Broker addresses (`mqtt://` / `mqtts://` URLs) and the embedded amqtt broker for a laptop."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgefl.errors import BrokerUrlError, InputError, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens; `tls` is True for `mqtts://`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """Return the address as a URL without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse `mqtt://[user:pass@]host[:port]` or `mqtts://...` (TLS); a bare `host[:port]` is mqtt.

    Raises:
        TransportError: the scheme is not mqtt/mqtts, the host is missing or the port is invalid.
    """
    text = url.strip()
    if "://" not in text:
        text = f"mqtt://{text}"
    parts = urlsplit(text)
    if parts.scheme not in DEFAULT_PORTS:
        raise BrokerUrlError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise BrokerUrlError(f"broker URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {url!r} has no host")
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        # Percent-encoded, as in any URL: a password may hold '@', ':' or '/'.
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )


class EmbeddedBroker:
    """An amqtt MQTT 3.1.1 broker running in a background thread with its own asyncio loop.

    For a laptop or a simulation; production fleets should use Mosquitto (see the README).
    amqtt is a host-side dependency (`pip install edgefl[host]`), imported only on start().
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        password_file: Path | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        cafile: Path | None = None,
    ) -> None:
        """Configure the broker; nothing listens until start().

        Args:
            host: the address to bind (0.0.0.0 for every interface).
            port: the TCP port; 0 picks a free one (read it back from `.port` after start()).
            password_file: `user:hash` lines (`password_line`); clients must then log in, and
                a wrong password is refused as "not authorized". None: anonymous clients.
            certfile: the broker's certificate (PEM): the listener speaks TLS (`mqtts://`).
            keyfile: the key of `certfile`.
            cafile: a CA whose client certificates the broker accepts (amqtt does not require
                one: identities come from the password file).
        """
        if (certfile is None) != (keyfile is None):
            raise InputError("the embedded broker needs both a certificate and its key for TLS")
        self.host = host
        self.port = port
        self.password_file = password_file
        self.certfile, self.keyfile, self.cafile = certfile, keyfile, cafile
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Return the URL clients connect to."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{'mqtts' if self.certfile else 'mqtt'}://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Start listening; returns once the port accepts connections.

        Raises:
            TransportError: amqtt is not installed, the port is taken, or start-up timed out.
        """
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise TransportError(
                "the embedded broker needs amqtt: pip install 'edgefl[host]'"
            ) from exc
        if self.port == 0:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = int(probe.getsockname()[1])
        config = self._config()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the caller of start()
                self._error = exc
                self._started.set()
                return
            self._started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="edgefl-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            self._thread.join(timeout)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = self._thread = None
            raise TransportError(
                f"embedded broker could not listen on {self.host}:{self.port}: {self._error}"
            )
        log.info("embedded broker listening on %s", self.url)

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.certfile is not None:
            listener.update(ssl=True, certfile=str(self.certfile), keyfile=str(self.keyfile))
            if self.cafile is not None:
                listener["cafile"] = str(self.cafile)
        auth: dict[str, Any]
        if self.password_file is not None:
            if not Path(self.password_file).is_file():
                raise InputError(f"password file {self.password_file} not found")
            auth = {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(self.password_file)
                }
            }
        else:
            auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        return {"listeners": {"default": listener}, "plugins": auth}

    @property
    def connection_count(self) -> int:
        """How many client connections the broker holds now (0 when not running)."""
        broker = self._broker
        if broker is None:
            return 0
        # amqtt keeps a per-listener count; there is no public accessor for it.
        return sum(int(getattr(server, "conn_count", 0)) for server in broker._servers.values())

    def wait_idle(self, timeout: float = 2.0) -> bool:
        """Wait until no client is connected; returns False on timeout.

        Call it before stop() after closing many clients at once (a simulation): stopping while
        disconnects are still in flight leaves amqtt's transports unclosed (ResourceWarning,
        an error under pytest's warnings-as-errors).
        """
        deadline = time.monotonic() + timeout
        while self.connection_count > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and join its thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception as exc:  # shutting down anyway; say why it was not clean
                log.warning("embedded broker shutdown: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        self._loop = self._thread = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def password_line(username: str, password: str) -> str:
    """Return a password-file line (`user:argon2-hash`) for `EmbeddedBroker(password_file=...)`.

    Raises:
        InputError: the user name contains ':' or is empty.
        TransportError: amqtt (and its password hasher) is not installed.
    """
    if not username or ":" in username:
        raise InputError(f"user name {username!r} must be non-empty and without ':'")
    try:
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher
    except ImportError as exc:
        raise TransportError("password files need amqtt: pip install 'edgefl[host]'") from exc
    return f"{username}:{PasswordHash((Argon2Hasher(),)).hash(password)}"
