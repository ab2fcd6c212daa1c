"""A dashboard for one fleet: the watcher, the record, the view and the web server together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefl.dashboard.record_reader import RecordPoller
from edgefl.dashboard.server import DashboardServer, ViewSource, build_app, check_bind
from edgefl.dashboard.watcher import FleetWatcher
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.verifiers import INSECURE, STRICT, DeviceVerifier
from edgefl.transport.tls import TlsSettings

DEFAULT_PORT = 8050


@dataclass
class DashboardSettings:
    """What a dashboard watches and where it serves.

    Attributes:
        broker_url: the fleet's broker, `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet's name.
        state_path: the aggregator's SQLite record, read-only (None: rounds come from the
            retained round results alone, without the durations and late rejections it holds).
            Its device keys are what statuses and deploy reports are checked against: only
            those sealed by the key their device is enrolled or pinned with are shown.
        host: the address to bind; anything but loopback needs `token`.
        port: the port (0: any free one).
        token: required on every request when given.
        tls: the CA file and client certificate for `mqtts://`.
        insecure: check no seal even with `state_path` (a fleet running `--insecure`).
    """

    broker_url: str
    fleet: str
    state_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    tls: TlsSettings | None = None
    insecure: bool = False

    @property
    def checks_seals(self) -> bool:
        """Whether statuses and deploy reports are checked (a state file, and not insecure)."""
        return self.state_path is not None and not self.insecure

    def device_verifier(self) -> DeviceVerifier | None:
        """The verifier of the devices' seals, on the state file's keys opened read-only
        (strict: the dashboard never pins a key); an insecure one with `insecure`, None without
        a state file: nothing is checked then."""
        if self.insecure:
            return DeviceVerifier(None, INSECURE)
        if self.state_path is None:
            return None
        return DeviceVerifier(DeviceRegistry(self.state_path, read_only=True), STRICT)


class Dashboard:
    """Serves a fleet's dashboard on a thread: `start()`, then `wait()` or other work, `stop()`."""

    def __init__(self, settings: DashboardSettings) -> None:
        """Check the settings; nothing connects or listens yet.

        Raises:
            ValueError: a non-loopback host without a token, or an invalid fleet name.
            TransportError: the broker URL or the TLS settings are invalid.
        """
        check_bind(settings.host, settings.token)
        self.settings = settings
        self.watcher = FleetWatcher(
            settings.broker_url, settings.fleet, settings.tls, devices=settings.device_verifier()
        )
        record = RecordPoller(settings.state_path) if settings.state_path is not None else None
        self.source = ViewSource(self.watcher, record)
        self.server = DashboardServer(
            build_app(self.source, settings.token), settings.host, settings.port
        )
        self.source.stopping = lambda: bool(self.server.server.should_exit)
        self._stopped = False

    @property
    def url(self) -> str:
        """The page's URL, with the token when there is one."""
        return self.server.url(self.settings.token)

    def start(self, connect_timeout: float = 10.0) -> str:
        """Connect to the broker and serve on a daemon thread; return the page's URL.

        Raises:
            TransportError: the broker cannot be reached.
            OSError: the port cannot be bound.
        """
        self.watcher.start(connect_timeout)
        try:
            self.server.start()
        except BaseException:
            self.watcher.stop()
            raise
        return self.url

    def wait(self) -> None:
        """Block until the server stops (`stop`, from another thread or a signal handler)."""
        self.server.wait()

    def stop(self) -> None:
        """Stop serving and disconnect (again: nothing more happens)."""
        if self._stopped:
            return
        self._stopped = True
        self.server.stop()
        self.watcher.stop()
