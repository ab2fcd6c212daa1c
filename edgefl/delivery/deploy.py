"""The publisher side of a deploy: sign a bundle, publish it retained in chunks, follow the boards.

`plan_targets` and `summarize` are pure; `deploy` is the I/O shell over one MQTT client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.bundle import load_bundle
from edgefl.delivery.chunks import DEFAULT_CHUNK_SIZE, iter_file_chunks
from edgefl.delivery.fleet_view import StatusCollector, wait_for_retained
from edgefl.delivery.release import DeployReport, Release, Targets, build_release, open_release
from edgefl.errors import EdgeflError, InputError, TransportError
from edgefl.security.verifiers import DeviceVerifier
from edgefl.transport import presence, topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.tls import TlsSettings

# Outcomes in the final table.
UPDATED = "updated"
FAILED = "failed"
OFFLINE = "offline"

# The longest to wait for the retained statuses and releases before planning the targets.
_RETAINED_MAX_S = 3.0


@dataclass
class DeviceOutcome:
    """How one targeted board ended a deploy."""

    device_id: str
    outcome: str  # UPDATED | FAILED | OFFLINE
    state: str = ""  # the board's last report state ("installed", "refused", ...), or "timeout"
    reason: str = ""
    running_version: int | None = None


@dataclass
class DeployResult:
    """What a deploy did: the release, and each targeted board's outcome."""

    name: str
    version: int
    release_id: str
    targets: Targets
    bytes_published: int
    seconds: float
    devices: dict[str, DeviceOutcome] = field(default_factory=dict)
    # Messages in a board's name whose seal did not verify (never counted): device -> why.
    refused: dict[str, str] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        """Return how many boards ended with `outcome`."""
        return sum(1 for d in self.devices.values() if d.outcome == outcome)

    @property
    def failed(self) -> list[DeviceOutcome]:
        """Targeted boards that were online and did not end up running the release."""
        return [d for d in self.devices.values() if d.outcome == FAILED]


ProgressCallback = Callable[[DeployReport], None]


def plan_targets(
    statuses: dict[str, DeviceStatus],
    targets: Targets,
    seen: dict[str, float] | None = None,
    now: float | None = None,
) -> tuple[set[str], set[str]]:
    """Split the boards a release targets into online and offline.

    A board whose status says online but was not heard within its staleness window
    (`edgefl.transport.presence`) counts as offline: deploy does not wait for it, and it installs
    the retained release when it comes back.

    Args:
        statuses: the retained status of every board known to the fleet.
        targets: the release's targets.
        seen: when each status counts from (`presence.seen_at`); None trusts the stated state.
        now: the current Unix time (default: now).

    Returns:
        (online, offline) device IDs. Devices named in `targets.devices` that never reported a
        status count as offline.
    """
    now = time.time() if now is None else now
    online: set[str] = set()
    offline: set[str] = set()
    known = dict(statuses)
    for device in targets.devices or []:
        known.setdefault(device, DeviceStatus(device_id=device, state="offline"))
    for device, status in known.items():
        if targets.includes(device, status.group or None):
            last_seen = now if seen is None else seen.get(device, now)
            state = presence.presence(status, last_seen, now)
            (online if state == presence.ONLINE else offline).add(device)
    return online, offline


def summarize(
    online: set[str],
    offline: set[str],
    reports: dict[str, DeployReport],
) -> dict[str, DeviceOutcome]:
    """Turn the boards' last reports into outcomes; online boards without a final one timed out.

    A board that was offline at the start but reported during the deploy counts by its report.
    """
    outcomes: dict[str, DeviceOutcome] = {}
    for device in sorted(online | offline | set(reports)):
        report = reports.get(device)
        if report is not None and report.terminal:
            outcomes[device] = DeviceOutcome(
                device,
                UPDATED if report.succeeded else FAILED,
                report.state,
                report.reason,
                report.running_version,
            )
        elif device in online or report is not None:
            outcomes[device] = DeviceOutcome(
                device, FAILED, "timeout", "no final report before the deploy timed out"
            )
        else:
            outcomes[device] = DeviceOutcome(device, OFFLINE, "", "retained; installs on connect")
    return outcomes


def stale_chunk_topics(
    fleet: str, old: dict[str, Release], replaced_topic: str, new: Release
) -> list[str]:
    """Return retained chunk topics nothing points at once `new` replaces the release on a topic.

    Args:
        fleet: the fleet.
        old: release topic -> the release retained there before this deploy.
        replaced_topic: the topic `new` is published on.
        new: the new release.
    """

    def chunk_topics(release: Release) -> set[str]:
        version = release.manifest.version
        return {
            topics.artifact_chunk(fleet, version, file, index)
            for file, digests in release.chunks.items()
            for index in range(len(digests))
        }

    previous = old.get(replaced_topic)
    if previous is None:
        return []
    keep = chunk_topics(new)
    for topic, release in old.items():
        if topic != replaced_topic:
            keep |= chunk_topics(release)
    return sorted(chunk_topics(previous) - keep)


def _release_topics(fleet: str, targets: Targets) -> list[str]:
    """Return the topics a release for `targets` is retained on (one per device when listed).

    Raises:
        ValueError: the fleet, group or a device ID is not a valid topic level.
    """
    if targets.devices is not None:
        return [topics.device_release(fleet, device) for device in targets.devices]
    if targets.group is not None:
        return [topics.group_release(fleet, targets.group)]
    return [topics.fleet_release(fleet)]


def deploy(
    bundle_path: str | Path,
    broker_url: str,
    fleet: str,
    key: Ed25519PrivateKey,
    *,
    group: str | None = None,
    devices: list[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float = 120.0,
    on_report: ProgressCallback | None = None,
    on_targets: Callable[[set[str], set[str]], None] | None = None,
    tls: TlsSettings | None = None,
    device_keys: DeviceVerifier | None = None,
) -> DeployResult:
    """Sign a bundle and publish it to a fleet; wait for every targeted online board.

    The release and its chunks are retained, so boards offline now install it when they connect.

    Args:
        bundle_path: the bundle directory (from `edgefl compress`).
        broker_url: `mqtt://host[:port]`.
        fleet: the fleet name.
        key: the signing key (`edgefl keys init`).
        group: target one group (boards started with that `--group`).
        devices: target these device IDs (one release topic per device).
        chunk_size: bytes per chunk.
        timeout: seconds to wait for the online targeted boards to report a final state.
        on_report: called with every report of a targeted board (progress), on the network
            thread.
        on_targets: called once with (online, offline) targeted boards before publishing.
        tls: the CA file and client certificate (an operator's) for an `mqtts://` broker.
        device_keys: whose seals boards' statuses and deploy reports must carry (None: nothing
            is checked); a forged report is never counted.

    Returns:
        The outcome per board. Callers treat `result.failed` as the exit status.

    Raises:
        BundleError: the bundle is invalid.
        InputError: both group and devices given, or an ID is not a valid topic level.
        TransportError: the broker cannot be reached or does not acknowledge the release.
    """
    if group is not None and devices is not None:
        raise InputError("target either a group or a list of devices, not both")
    targets = Targets(group=group, devices=sorted(set(devices)) if devices is not None else None)
    if targets.devices == []:
        raise InputError("`devices` names no device")
    try:
        release_topics = _release_topics(fleet, targets)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    bundle = load_bundle(bundle_path)
    release = build_release(bundle, key, targets, chunk_size)
    version = bundle.manifest.version
    started = time.monotonic()

    collector = StatusCollector(device_keys)
    lock = collector.lock
    reports: dict[str, DeployReport] = {}
    retained: dict[str, Release] = {}
    # `waiting` is filled only once the targets are known (`ready`): a board that reports before
    # then must not end the wait early.
    ready = threading.Event()
    done = threading.Event()
    waiting: set[str] = set()

    def on_deploy_report(message: Message) -> None:
        report = collector.read_report(message)
        if report is None or report.release_id != release.release_id:
            return  # a report about an earlier release (retained)
        with lock:
            reports[report.device_id] = report
            if report.terminal:
                waiting.discard(report.device_id)
                if not waiting and ready.is_set():
                    done.set()
        if on_report is not None:
            on_report(report)

    trusted = key.public_key()

    def on_release(message: Message) -> None:
        if not message.payload:
            return
        try:
            release_seen = open_release(message.payload, trusted)
        except EdgeflError:
            return  # not ours (another key, forged or malformed): its chunks are not ours either
        with lock:
            retained[message.topic] = release_seen
            collector.last_message[0] = time.monotonic()

    client = MqttClient(
        broker_url, client_id=f"edgefl-deploy-{fleet}-{time.time_ns() % 10**9}", tls=tls
    )
    client.subscribe(topics.all_statuses(fleet), collector.on_status)
    client.subscribe(topics.all_deploy_reports(fleet), on_deploy_report)
    for topic_filter in topics.all_release_topics(fleet):
        client.subscribe(topic_filter, on_release)
    client.connect(timeout=10.0)
    try:
        wait_for_retained(collector.last_message, lock, _RETAINED_MAX_S)
        with lock:
            online, offline = plan_targets(collector.statuses, targets, collector.seen)
            old_releases = dict(retained)
        if on_targets is not None:
            on_targets(online, offline)
        published = _publish_release(client, fleet, bundle.path, release, release_topics)
        for topic in release_topics:
            for stale in stale_chunk_topics(fleet, old_releases, topic, release):
                client.publish(stale, b"", qos=1, retain=True)
        with lock:
            waiting.update(d for d in online if not (d in reports and reports[d].terminal))
            ready.set()
            if not waiting:
                done.set()
        done.wait(max(0.0, timeout - (time.monotonic() - started)))
        with lock:
            outcomes = summarize(online, offline, dict(reports))
            refused = dict(collector.refused)
    finally:
        client.close()
    return DeployResult(
        name=bundle.manifest.name,
        version=version,
        release_id=release.release_id,
        targets=targets,
        bytes_published=published,
        seconds=time.monotonic() - started,
        devices=outcomes,
        refused=refused,
    )


def _publish_release(
    client: MqttClient,
    fleet: str,
    root: Path,
    release: Release,
    release_topics: list[str],
    ack_timeout: float = 60.0,
) -> int:
    """Publish the chunks, then the release on each topic; wait for the broker's acks.

    Chunks go first so that a board that reads the release finds every chunk already retained.

    Returns:
        Bytes published.

    Raises:
        TransportError: the broker did not acknowledge in time.
    """
    manifest = release.manifest
    handles = []
    sent = 0
    for artifact in manifest.artifacts:
        for index, chunk in enumerate(iter_file_chunks(root / artifact.file, release.chunk_size)):
            topic = topics.artifact_chunk(fleet, manifest.version, artifact.file, index)
            handles.append(client.publish(topic, chunk, qos=1, retain=True))
            sent += len(chunk)
    payload = release.to_bytes()
    for topic in release_topics:
        handles.append(client.publish(topic, payload, qos=1, retain=True))
        sent += len(payload)
    deadline = time.monotonic() + ack_timeout
    for handle in handles:
        if not handle.wait(max(0.0, deadline - time.monotonic())):
            raise TransportError(
                f"the broker at {client.address.url} did not acknowledge the release in"
                f" {ack_timeout:.0f} s"
            )
    return sent
