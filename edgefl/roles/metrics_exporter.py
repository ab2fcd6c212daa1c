"""The aggregator's Prometheus metrics: rounds, updates by outcome and code, bytes, devices.

Fed by the aggregator's own callbacks: `on_verdict` (every update, on the network thread: a few
counter increments on pre-bound children, so it stays cheap at thousands of updates a second) and
`on_round` (each round's summary); the devices online, stale and offline are read from
`Aggregator.device_presence` when Prometheus scrapes. `serve` exposes `/metrics` over HTTP with
prometheus-client's own server. Nothing here changes what the aggregator does.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from edgefl.core.round_state import ACCEPTED, LATE, REJECTED, REPEATED, Verdict
from edgefl.roles.summary import RoundSummary

PRESENCE_STATES = ("online", "stale", "offline")
OUTCOMES = (ACCEPTED, REJECTED, LATE, REPEATED)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

PresenceSource = Callable[[], Mapping[str, str]]


class _PresenceCollector(Collector):
    """Counts devices by presence when scraped (a device turns stale by time passing alone)."""

    def __init__(self) -> None:
        self.source: PresenceSource | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "edgefl_devices",
            "Devices that could train this bundle, by presence (online, stale: says online but "
            "not heard in time, offline).",
            labels=["state"],
        )
        counts = Tally((self.source or dict)().values())
        for state in PRESENCE_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


class AggregatorMetrics:
    """The metrics of one aggregator, in a registry of their own.

    Use: `metrics = AggregatorMetrics()`, then `Aggregator(..., on_verdict=metrics.on_verdict,
    on_round=metrics.on_round)`, `metrics.watch_presence(aggregator.device_presence)` and
    `metrics.serve(port)`.
    """

    def __init__(self, fleet: str = "", registry: CollectorRegistry | None = None) -> None:
        """Create the metrics.

        Args:
            fleet: shown in `edgefl_aggregator_info`.
            registry: where to register (None: a new one, with this process's CPU and memory).
        """
        self.registry = registry if registry is not None else CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.info = Gauge(
            "edgefl_aggregator_info", "The aggregator's fleet (value 1).", ["fleet"], registry=r
        )
        self.info.labels(fleet).set(1)
        self.rounds = Counter(
            "edgefl_rounds", "Finished rounds by status (closed, failed).", ["status"], registry=r
        )
        self.updates = Counter(
            "edgefl_updates",
            "Updates received by outcome (accepted, rejected, late, repeated re-deliveries).",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "edgefl_updates_rejected", "Rejected updates by rejection code.", ["code"], registry=r
        )
        self.update_bytes = Counter(
            "edgefl_update_bytes", "Bytes of updates received by outcome.", ["outcome"], registry=r
        )
        self.task_bytes = Counter(
            "edgefl_task_bytes",
            "Bytes of round tasks devices downloaded (task size × selected).",
            registry=r,
        )
        self.duration = Histogram(
            "edgefl_round_duration_seconds",
            "Wall time of each round.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ingest = Gauge(
            "edgefl_round_ingest_updates_per_second",
            "Answers (accepted and rejected) per second over the last round.",
            registry=r,
        )
        self.last_round = Gauge("edgefl_round", "Number of the last finished round.", registry=r)
        self.head_version = Gauge("edgefl_head_version", "Global head version.", registry=r)
        self.participants = Gauge(
            "edgefl_round_participants",
            "Devices of the last round: selected, accepted, online.",
            ["kind"],
            registry=r,
        )
        self.accuracy = Gauge(
            "edgefl_accuracy",
            "Global head accuracy on the server's eval set, last round.",
            registry=r,
        )
        self.epsilon = Gauge(
            "edgefl_privacy_epsilon",
            "Privacy spent by the run (epsilon at edgefl_privacy_delta).",
            registry=r,
        )
        self.delta = Gauge(
            "edgefl_privacy_delta", "The delta of edgefl_privacy_epsilon.", registry=r
        )
        self._presence = _PresenceCollector()
        r.register(self._presence)
        # Pre-bound children: labels() costs a lookup under a lock; on_verdict runs per update.
        self._by_outcome = {o: self.updates.labels(o) for o in OUTCOMES}
        self._bytes_by_outcome = {o: self.update_bytes.labels(o) for o in OUTCOMES}
        self._by_code: dict[str, Any] = {}
        for kind in ("selected", "accepted", "online"):
            self.participants.labels(kind)
        for status in ("closed", "failed"):
            self.rounds.labels(status)

    def watch_presence(self, source: PresenceSource) -> None:
        """Count devices by presence from `source` (`Aggregator.device_presence`) at scrape."""
        self._presence.source = source

    def on_verdict(self, verdict: Verdict) -> None:
        """Count one update (pass as the aggregator's `on_verdict`)."""
        outcome = verdict.outcome
        counter = self._by_outcome.get(outcome)
        if counter is None:  # an outcome this version does not know: counted, not dropped
            counter = self._by_outcome[outcome] = self.updates.labels(outcome)
            self._bytes_by_outcome[outcome] = self.update_bytes.labels(outcome)
        counter.inc()
        if verdict.size:
            self._bytes_by_outcome[outcome].inc(verdict.size)
        if outcome == REJECTED:
            code = self._by_code.get(verdict.code)
            if code is None:
                code = self._by_code[verdict.code] = self.rejected.labels(verdict.code)
            code.inc()

    def on_round(self, summary: RoundSummary, task_bytes: int | None = None) -> None:
        """Record a finished round (pass as, or call from, the aggregator's `on_round`).

        Args:
            summary: the round.
            task_bytes: the size of its task message, when the caller knows it.
        """
        self.rounds.labels(summary.status).inc()
        self.duration.observe(summary.seconds)
        self.last_round.set(summary.round)
        self.head_version.set(summary.head_version)
        answered = summary.accepted + sum(summary.rejected.values())
        if summary.seconds > 0:
            self.ingest.set(answered / summary.seconds)
        self.participants.labels("selected").set(summary.selected)
        self.participants.labels("accepted").set(summary.accepted)
        self.participants.labels("online").set(summary.online)
        if task_bytes:
            self.task_bytes.inc(task_bytes * summary.selected)
        metrics = summary.metrics
        if "accuracy" in metrics:
            self.accuracy.set(metrics["accuracy"])
        if "epsilon" in metrics and "delta" in metrics:
            self.epsilon.set(metrics["epsilon"])
            self.delta.set(metrics["delta"])

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve `/metrics` on a daemon thread; return the port (the OS's choice for 0).

        Raises:
            OSError: the port cannot be bound.
        """
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop serving (when `serve` was called)."""
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


def chain_rounds(
    *callbacks: Callable[[RoundSummary], None] | None,
) -> Callable[[RoundSummary], None]:
    """Return one `on_round` callback calling each given one in order (None skipped)."""
    present = [c for c in callbacks if c is not None]

    def call(summary: RoundSummary) -> None:
        for callback in present:
            callback(summary)

    return call


def parse_listen(text: str) -> tuple[str, int]:
    """Parse `--metrics-port`'s value: `PORT` (on 127.0.0.1) or `HOST:PORT`.

    Raises:
        ValueError: not a port, or a port outside 0..65535.
    """
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-port {text!r} must be PORT or HOST:PORT")
    return host, int(port)
