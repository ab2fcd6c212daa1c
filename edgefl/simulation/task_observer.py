"""What a simulation watches besides its devices: the size of each round's task on the wire."""

from __future__ import annotations

import threading

from edgefl.transport import topics
from edgefl.transport.client import Message, NetworkLoop
from edgefl.transport.connect import open_client
from edgefl.transport.tls import TlsSettings


class TaskObserver:
    """Counts the bytes of each round's task as devices receive it (one subscriber's view)."""

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        network: NetworkLoop,
        tls: TlsSettings | None = None,
        name: str = "observer",
    ) -> None:
        """Subscribe (connect `client` to start); `name` keeps the client IDs of several
        processes on one fleet apart (the shards of a simulation)."""
        self.sizes: dict[int, int] = {}
        self.url = broker_url
        self.client = open_client(
            broker_url, client_id=f"edgefl-{fleet}-sim-{name}", network=network, tls=tls
        )
        self.client.subscribe(topics.all_tasks(fleet), self._on_task)

        self._seen = threading.Condition()

    def _on_task(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        if parsed is not None and parsed.round_number is not None and message.payload:
            with self._seen:
                self.sizes[parsed.round_number] = len(message.payload)
                self._seen.notify_all()

    def task_size(self, round_number: int, timeout: float = 2.0) -> int:
        """Return the size of a round's task, waiting briefly: the network thread may still be
        delivering it to this observer when the round has already closed.

        Args:
            round_number: the round.
            timeout: the longest to wait. An async run passes 0: the next head version must
                not wait on the observer; the newest task seen stands in (tasks carrying the
                same heads have the same size), 0 before any.
        """
        with self._seen:
            self._seen.wait_for(lambda: round_number in self.sizes, timeout)
            newest = self.sizes[max(self.sizes)] if self.sizes else 0
            return self.sizes.get(round_number, newest)
