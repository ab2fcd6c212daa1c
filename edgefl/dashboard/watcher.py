"""The dashboard's MQTT side: subscribes to a fleet's statuses, tasks, results and deploy
reports and folds them into a `FleetState`. It never publishes (no will, no retained clears).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgefl.dashboard.fleet_state import FleetState
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.tls import TlsSettings


class FleetWatcher:
    """Keeps a fleet's `FleetState` current from the broker; thread-safe reads via `snapshot`."""

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        tls: TlsSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the subscriptions; nothing connects until `start`.

        Args:
            broker_url: `mqtt://host[:port]` or `mqtts://...`.
            fleet: the fleet to watch.
            tls: the CA file and client certificate for `mqtts://`.
            clock: Unix time (tests pass their own).

        Raises:
            TransportError: the URL or the TLS settings are invalid.
        """
        self.state = FleetState(topics.check_name(fleet, "fleet"))
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
        with self.lock:
            if self.state.observe(message.topic, message.payload, message.retain, now):
                self.changed.notify_all()

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
        """Disconnect (the state keeps what was seen)."""
        self.client.close()
