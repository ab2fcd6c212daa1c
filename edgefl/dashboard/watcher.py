"""The dashboard's MQTT side: subscribes to a fleet's statuses, tasks, results and deploy
reports and folds them into a `FleetState`. It never publishes (no will, no retained clears).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from edgefl.dashboard.fleet_state import FleetState
from edgefl.security.verifiers import REFRESH_S, DeviceVerifier
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.tls import TlsSettings

log = logging.getLogger(__name__)


class FleetWatcher:
    """Keeps a fleet's `FleetState` current from the broker; thread-safe reads via `snapshot`."""

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        tls: TlsSettings | None = None,
        clock: Callable[[], float] = time.time,
        devices: DeviceVerifier | None = None,
    ) -> None:
        """Configure the subscriptions; nothing connects until `start`.

        Args:
            broker_url: `mqtt://host[:port]` or `mqtts://...`.
            fleet: the fleet to watch.
            tls: the CA file and client certificate for `mqtts://`.
            clock: Unix time (tests pass their own).
            devices: whose seals statuses and deploy reports must carry (None: nothing is
                checked); its registry is read again every `REFRESH_S` while messages come, so
                enrollments and revocations made meanwhile apply.

        Raises:
            TransportError: the URL or the TLS settings are invalid.
        """
        self.state = FleetState(topics.check_name(fleet, "fleet"), devices=devices)
        self._registry_read = time.monotonic()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._clock = clock
        self.client = MqttClient(
            broker_url, client_id=f"edgefl-dashboard-{fleet}-{time.time_ns() % 10**9}", tls=tls
        )
        for topic_filter in (
            topics.all_statuses(fleet),
            topics.all_results(fleet),
            topics.all_tasks(fleet),
            topics.all_deploy_reports(fleet),
        ):
            self.client.subscribe(topic_filter, self._on_message)

    def _on_message(self, message: Message) -> None:
        now = self._clock()
        try:
            self._read_registry()
            with self.lock:
                if self.state.observe(message.topic, message.payload, message.retain, now):
                    self.changed.notify_all()
        except sqlite3.Error as exc:
            # The state file is the aggregator's: a moment's trouble reading it drops one
            # message (shown as nothing new), and the next message reads the file again.
            log.warning("cannot read the device keys in the state file: %s", exc)

    def _read_registry(self) -> None:
        """Read the device keys again when `REFRESH_S` passed: a device the verifier knows is not
        looked up again on its own, and a revocation must not wait for the dashboard's restart."""
        devices = self.state.devices
        moment = time.monotonic()
        if devices is not None and moment - self._registry_read >= REFRESH_S:
            self._registry_read = moment
            devices.refresh()

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up now."""
        return self.client.connected

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe.

        Raises:
            TransportError: the broker cannot be reached within `timeout` seconds.
        """
        self.client.connect(timeout=timeout)

    def stop(self) -> None:
        """Disconnect (the state keeps what was seen) and close the device keys' file."""
        self.client.close()
        devices = self.state.devices
        if devices is not None and devices.registry is not None:
            devices.registry.close()
