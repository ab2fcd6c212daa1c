"""A slice of a simulated fleet: which devices shard I of N runs, and how the shards without the
aggregator follow the run to its end.

N processes (on one machine or several) run `edgefl simulate --shard I/N` with the same plan
(devices, partition, seed, fleet) against one broker: each starts its contiguous slice of the
fleet's devices, and shard 1 also runs the aggregator, which waits until every shard's devices
are online. The others learn the run from its first live task and stop after its last round's
result (`RunFollower`), printing the same round table from the results they receive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from edgefl.errors import MessageError, SimulationError
from edgefl.security.verifiers import TrustedSigners
from edgefl.transport import topics
from edgefl.transport.client import Message, NetworkLoop
from edgefl.transport.connect import open_client
from edgefl.transport.messages import RoundResult, decode_round_task
from edgefl.transport.sealed import SealError
from edgefl.transport.tls import TlsSettings

Item = TypeVar("Item")

# How long the aggregator (shard 1) waits for every shard's devices before round 1: the others
# may be started by hand on other machines.
SHARD_WAIT_S = 600.0


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """Parse "I/N".

        Raises:
            SimulationError: not two integers with 1 <= I <= N.
        """
        index, slash, count = text.strip().partition("/")
        if not slash or not index.strip().isdigit() or not count.strip().isdigit():
            raise SimulationError(f"shard {text!r} must be I/N, e.g. 1/2")
        spec = cls(int(index), int(count))
        if not 1 <= spec.index <= spec.count:
            raise SimulationError(f"shard {text!r}: I must be between 1 and N")
        return spec

    @property
    def runs_aggregator(self) -> bool:
        """Whether this shard also runs the aggregator (shard 1)."""
        return self.index == 1

    def take(self, items: Sequence[Item]) -> list[Item]:
        """Return this shard's contiguous slice; the N slices cover `items` once, sizes within 1."""
        start = (self.index - 1) * len(items) // self.count
        end = self.index * len(items) // self.count
        return list(items[start:end])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class RunFollower:
    """Follows an aggregator run from another process: its live tasks name the run, its live
    results report the rounds (retained ones are an earlier run's, or were seen already)."""

    def __init__(
        self,
        broker_url: str,
        fleet: str,
        network: NetworkLoop,
        trusted: TrustedSigners,
        rounds: int,
        on_result: Callable[[RoundResult], None],
        tls: TlsSettings | None = None,
        name: str = "follower",
    ) -> None:
        """Configure; call start() before the devices start.

        Args:
            broker_url: the broker every shard uses.
            fleet: the fleet.
            network: the loop the client runs on.
            trusted: the keys the devices trust (tasks and results are sealed by the aggregator).
            rounds: the round whose result ends the run.
            on_result: called (on the network thread) with each of the run's results.
            tls: the TLS files for an `mqtts://` broker.
            name: distinguishes the client ID of each shard's follower.
        """
        self.trusted = trusted
        self.rounds = rounds
        self.on_result = on_result
        self.run_id = ""
        self._done = threading.Event()
        self._last_heard = time.monotonic()
        self.client = open_client(
            broker_url, f"edgefl-{fleet}-sim-{name}", network=network, tls=tls
        )
        self.client.subscribe(topics.all_tasks(fleet), self._on_task)
        self.client.subscribe(topics.all_results(fleet), self._on_result)

    def start(self) -> None:
        """Connect (TransportError when the broker cannot be reached)."""
        self.client.connect(timeout=30.0)

    def close(self) -> None:
        """Disconnect."""
        self.client.close()

    def _open(self, message: Message) -> bytes | None:
        if message.retain or not message.payload:
            return None
        try:
            return self.trusted.open(message.topic, message.payload)
        except SealError:
            return None

    def _on_task(self, message: Message) -> None:
        payload = self._open(message)
        if payload is None:
            return
        try:
            self.run_id = decode_round_task(payload)[0].run_id
        except MessageError:
            return
        self._last_heard = time.monotonic()

    def _on_result(self, message: Message) -> None:
        payload = self._open(message)
        if payload is None:
            return
        try:
            result = RoundResult.decode(payload)
        except MessageError:
            return
        if not self.run_id or result.run_id != self.run_id:
            return
        self._last_heard = time.monotonic()
        self.on_result(result)
        if result.round >= self.rounds:
            self._done.set()

    def wait(self, idle_s: float) -> None:
        """Block until the run's last result.

        Raises:
            SimulationError: nothing of the run was heard for `idle_s` seconds (the aggregator's
                shard is not running, or failed).
        """
        while not self._done.wait(0.2):
            if time.monotonic() - self._last_heard > idle_s:
                raise SimulationError(
                    f"no task or result from the aggregator (shard 1) for {idle_s:g} s"
                )
