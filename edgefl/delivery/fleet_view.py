"""The fleet view: who is online, on which profile and model version, from retained messages.

`fleet_view` is pure (statuses and deploy reports in, rows out), and so is `privacy_line` (the ε
spent, from the retained round results); `read_fleet` collects the retained messages from the
broker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from edgefl.delivery.release import DeployReport
from edgefl.errors import EdgeflError
from edgefl.security.verifiers import INSECURE, DeviceVerifier
from edgefl.transport import presence, topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import DeviceStatus, RoundResult
from edgefl.transport.sealed import SealError, strip_seal
from edgefl.transport.tls import TlsSettings

# Retained messages arrive right after SUBSCRIBE with no end marker: once none has come for this
# long, the broker has sent them all.
RETAINED_QUIET_S = 0.3


@dataclass
class FleetDevice:
    """One row of the fleet view."""

    device_id: str
    # "online" | "offline" | "stale" (says online, not refreshed in time: see
    # edgefl.transport.presence) | "unknown" (a deploy report but no status)
    state: str
    profile: str = ""
    group: str = ""
    model_version: int = 0
    bundle_digest: str = ""  # the bundle the board runs (`ModelBundle.digest`); "" for none
    last_seen: float = 0.0  # Unix time of the last status
    last_round: int = 0
    last_deploy: str = ""  # e.g. "v3 installed", "v4 refused"
    deploy_reason: str = ""
    samples: int = 0  # 0 on a board whose data folder is still empty (never selected)
    # What runs the backbone: artifact file, runtime, execution provider ("" for LiteRT).
    artifact: str = ""
    runtime: str = ""
    provider: str = ""
    # How the device's key is known: "enrolled", "pinned" (trust on first use), "revoked",
    # "unknown"; "" when nothing is checked (--insecure).
    key: str = ""
    refused: str = ""  # why the last message in its name was refused ("bad-signature: ...")


def fleet_view(
    statuses: dict[str, DeviceStatus],
    reports: dict[str, DeployReport],
    seen: dict[str, float] | None = None,
    now: float | None = None,
    keys: dict[str, str] | None = None,
    refused: dict[str, str] | None = None,
) -> list[FleetDevice]:
    """Join statuses and deploy reports into rows sorted by state (online first), then ID.

    `seen` maps a device to when its status counts from (`presence.seen_at`; default: the
    status's own `time`) and `now` is the current Unix time (default: the clock); a device whose
    status says online but is older than its staleness window shows as "stale". `keys` maps a
    device to how its key is known, `refused` to why a message in its name was refused (a device
    with only refused messages gets a row too).
    """
    now = time.time() if now is None else now
    rows = []
    keys, refused = keys or {}, refused or {}
    for device in sorted(set(statuses) | set(reports) | set(refused)):
        status = statuses.get(device)
        report = reports.get(device)
        row = FleetDevice(
            device, "unknown", key=keys.get(device, ""), refused=refused.get(device, "")
        )
        if status is not None:
            last_seen = (seen or {}).get(device, status.time)
            row.state = presence.presence(status, last_seen, now)
            row.profile = status.profile
            row.group = status.group
            row.model_version = status.model_version
            row.bundle_digest = status.bundle_digest
            row.last_seen = status.time
            row.last_round = status.last_round
            row.samples = status.samples
            row.artifact, row.runtime, row.provider = (
                status.artifact,
                status.runtime,
                status.provider,
            )
        if report is not None:
            row.last_deploy = f"v{report.version} {report.state}"
            row.deploy_reason = report.reason
            if status is None and report.running_version is not None:
                row.model_version = report.running_version
        rows.append(row)
    rows.sort(key=lambda r: (r.state != "online", r.device_id))
    return rows


def privacy_line(results: Iterable[RoundResult]) -> str:
    """Say what privacy the fleet's current run has spent, from its retained round results.

    The latest round's result carries the ε spent so far (`edgefl.core.accounting`); when it
    carries none, say why.
    """
    latest = max(results, key=lambda r: r.round, default=None)
    if latest is None:
        return "privacy: no round result is retained, so no ε to show"
    epsilon, delta = latest.metrics.get("epsilon"), latest.metrics.get("delta")
    if epsilon is None or delta is None:
        return (
            f"privacy: no ε after round {latest.round}: its run has a round without clip and "
            "noise (or an aggregator without privacy accounting)"
        )
    seen = latest.metrics.get("epsilon_unsampled", epsilon)
    return (
        f"privacy: ε={epsilon:.3g} spent at δ={delta:g} after round {latest.round} "
        f"(run {latest.run_id[:12] or '-'}); ε={seen:.3g} for whoever sees the updates"
    )


def running_text(row: FleetDevice) -> str:
    """Say what runs a board's backbone: "backbone-fp16.onnx onnxruntime/CUDAExecutionProvider",
    "backbone-int8.tflite litert", or "-" when it has not said (no backbone loaded, older agent).
    """
    if not row.artifact:
        return "-"
    runtime = "/".join(part for part in (row.runtime, row.provider) if part)
    return f"{row.artifact} {runtime}".strip()


def short_digest(digest: str) -> str:
    """Return the first 12 hex digits of a digest (what a table shows), or "-" for none."""
    return digest[:12] or "-"


def wait_for_retained(last_message: list[float], lock: threading.Lock, max_wait: float) -> None:
    """Wait until no message has arrived for RETAINED_QUIET_S, or at most `max_wait` seconds.

    Call right after connecting: the quiet time counts from the call, so a slow connect does not
    look like a quiet broker.

    Args:
        last_message: one-element list holding the `time.monotonic()` of the latest message;
            the message callbacks update it under `lock`.
        lock: guards `last_message`.
        max_wait: the longest to wait, in seconds.
    """
    start = time.monotonic()
    with lock:
        last_message[0] = max(last_message[0], start)
    while time.monotonic() - start < max_wait:
        with lock:
            if time.monotonic() - last_message[0] >= RETAINED_QUIET_S:
                return
        time.sleep(0.05)


class StatusCollector:
    """The device statuses a client receives, each with when it counts from.

    Every reader of a fleet's statuses (the fleet view, deploy) records them through this, so the
    freshness rule (`edgefl.transport.presence`) is applied the same way. `lock` and
    `last_message` are what `wait_for_retained` watches; the client's other callbacks share them.
    """

    def __init__(self, devices: DeviceVerifier | None = None) -> None:
        """Args:
        devices: whose seals are checked (None: nothing is checked).
        """
        self.devices = devices or DeviceVerifier(None, INSECURE)
        self.refused: dict[str, str] = {}  # device -> why its last refused message was refused
        self.reports: dict[str, DeployReport] = {}
        self.lock = threading.Lock()
        self.statuses: dict[str, DeviceStatus] = {}
        self.seen: dict[str, float] = {}
        self.last_message = [time.monotonic()]

    def on_status(self, message: Message) -> None:
        """Record one status message once its seal verifies (a malformed one is skipped)."""
        device, payload = self._open(message)
        try:
            status = DeviceStatus.decode(payload) if payload is not None else None
        except EdgeflError:
            return
        if status is None or status.device_id != device:
            return
        with self.lock:
            if not presence.supersedes(status, self.statuses.get(status.device_id)):
                return  # a late will of an earlier connection
            self.statuses[status.device_id] = status
            self.seen[status.device_id] = presence.seen_at(status, time.time(), message.retain)
            self.last_message[0] = time.monotonic()

    def on_report(self, message: Message) -> None:
        """Record one deploy report once its seal verifies."""
        self.read_report(message)

    def read_report(self, message: Message) -> DeployReport | None:
        """Record one deploy report once its seal verifies; return it (None: refused or bad)."""
        device, payload = self._open(message)
        try:
            report = DeployReport.from_bytes(payload) if payload is not None else None
        except EdgeflError:
            return None
        if report is None or report.device_id != device:
            return None
        with self.lock:
            self.reports[report.device_id] = report
            self.last_message[0] = time.monotonic()
        return report

    def key_states(self) -> dict[str, str]:
        """How each device seen is known by key ("" for all when nothing is checked)."""
        if self.devices.insecure:
            return {}
        with self.lock:
            seen = set(self.statuses) | set(self.reports) | set(self.refused)
        return {device: self.devices.state(device) for device in seen}

    def _open(self, message: Message) -> tuple[str, bytes | None]:
        """Return the device a message's topic names and its payload (None: refused)."""
        parsed = topics.parse(message.topic)
        if not message.payload or parsed is None or parsed.device_id is None:
            return "", None
        try:
            return parsed.device_id, self.devices.open(
                message.topic, parsed.device_id, message.payload
            )
        except SealError as exc:
            with self.lock:
                self.refused[parsed.device_id] = str(exc)
                self.last_message[0] = time.monotonic()
            return parsed.device_id, None


def read_fleet(
    broker_url: str,
    fleet: str,
    max_wait: float = 3.0,
    tls: TlsSettings | None = None,
    results: dict[int, RoundResult] | None = None,
    devices: DeviceVerifier | None = None,
) -> list[FleetDevice]:
    """Collect the fleet's retained statuses and deploy reports and return the fleet view.

    Args:
        broker_url: `mqtt://host[:port]`.
        fleet: the fleet name.
        max_wait: the longest to wait for retained messages (it stops earlier once quiet).
        tls: the CA file and client certificate for an `mqtts://` broker.
        results: when given, filled with the retained round results by round (for
            `privacy_line`).
        devices: whose seals statuses and deploy reports must carry (None: nothing is
            checked); a refused message is shown as the row's `refused`, never as its state.

    Raises:
        TransportError: the broker cannot be reached.
    """
    collector = StatusCollector(devices)
    client = MqttClient(
        broker_url, client_id=f"edgefl-fleet-{fleet}-{time.time_ns() % 10**9}", tls=tls
    )
    client.subscribe(topics.all_statuses(fleet), collector.on_status)
    client.subscribe(topics.all_deploy_reports(fleet), collector.on_report)
    if results is not None:

        def on_result(message: Message) -> None:
            try:
                # Shown, not acted on: the seal is the boards' to check.
                result = RoundResult.decode(strip_seal(message.payload))
            except EdgeflError:
                return  # an empty payload clears a topic; anything else is not a result
            with collector.lock:
                results[result.round] = result
                collector.last_message[0] = time.monotonic()

        client.subscribe(topics.all_results(fleet), on_result)
    client.connect(timeout=10.0)
    try:
        wait_for_retained(collector.last_message, collector.lock, max_wait)
    finally:
        client.close()
    keys = collector.key_states()
    with collector.lock:
        return fleet_view(dict(collector.statuses), dict(collector.reports), dict(collector.seen),
                          keys=keys, refused=dict(collector.refused))  # fmt: skip
