"""What the dashboard knows of a fleet from its MQTT messages, folded in one message at a time.

Messages arrive as (topic, payload, retained, received_at) and nothing here reads a clock or a
socket, so tests feed it literal messages. Payloads are decoded with the protocol's own decoders.
A device's status and deploy report are shown only once its seal verifies against the key the
device is enrolled or pinned with (`DeviceVerifier`, as `edgefl fleet --state` checks them; the
verifier reads the registry); refused ones are counted per device. Without a verifier (or an
insecure one) the seal is only stripped. Tasks and results are shown with their seal stripped:
the boards check those, and the dashboard acts on nothing it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgefl.delivery.release import DeployReport
from edgefl.errors import EdgeflError
from edgefl.security.verifiers import INSECURE, DeviceVerifier
from edgefl.transport import presence, topics
from edgefl.transport.messages import DeviceStatus, RoundResult, decode_round_task
from edgefl.transport.sealed import BAD_SIGNATURE, SealError, is_sealed, strip_seal

# Refusals are kept by device for this many devices; beyond, only the totals grow (a stranger
# inventing device IDs must not grow the dashboard without bound).
MAX_REFUSED_DEVICES = 1000
UNSIGNED_HINT = "if the fleet runs --insecure, watch it with `edgefl dashboard --insecure`"
_NOT_CHECKED = DeviceVerifier(None, INSECURE)  # strips a seal, checks nothing


@dataclass(frozen=True)
class RefusedMessages:
    """The messages refused in one device's name: how many, how many of those were forged (sealed,
    but not by the device's key, or altered), and why the last one was refused."""

    count: int = 0
    forged: int = 0
    reason: str = ""  # e.g. "bad-signature: signed with key ..., but device pi-1 is enrolled ..."


@dataclass
class OpenTask:
    """A round whose task is retained (so it is running): what the dashboard shows as live."""

    round: int
    selected: int
    deadline_s: float
    seen_at: float  # reader's Unix time the task arrived
    task_bytes: int  # the task message's size: what each selected device downloads
    live: bool = True  # delivered as it was published (not retained): seen_at is its start


@dataclass
class FleetState:
    """The fleet as its messages tell it. `version` grows with every change that is shown."""

    fleet: str
    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # device -> when its status counts from
    reports: dict[str, DeployReport] = field(default_factory=dict)
    results: dict[int, RoundResult] = field(default_factory=dict)
    tasks: dict[int, OpenTask] = field(default_factory=dict)  # open rounds by number
    task_bytes: dict[int, int] = field(default_factory=dict)  # every round's task size seen
    round_seconds: dict[int, float] = field(default_factory=dict)  # task seen -> result seen
    ignored: int = 0  # messages that did not decode (shown, so a broken sender is noticed)
    version: int = 0
    # Whose seals statuses and deploy reports must carry (None: nothing is checked).
    devices: DeviceVerifier | None = None
    refused: dict[str, RefusedMessages] = field(default_factory=dict)
    refused_total: int = 0
    refused_unsigned: int = 0  # of them, messages without any seal (an --insecure fleet?)

    @property
    def checks_seals(self) -> bool:
        """Whether statuses and deploy reports are shown only once their seal verifies."""
        return self.devices is not None and not self.devices.insecure

    def copy(self) -> FleetState:
        """Return a copy whose collections later messages do not change (the messages inside are
        replaced, never mutated, so they are shared)."""
        return replace(
            self, statuses=dict(self.statuses), seen=dict(self.seen), reports=dict(self.reports),
            results=dict(self.results), tasks=dict(self.tasks), task_bytes=dict(self.task_bytes),
            round_seconds=dict(self.round_seconds), refused=dict(self.refused),
        )  # fmt: skip

    def observe(self, topic: str, payload: bytes, retained: bool, received_at: float) -> bool:
        """Fold one message in; return whether anything shown changed.

        Args:
            topic: the topic it arrived on.
            payload: its bytes (empty: a retained topic was cleared).
            retained: whether the broker delivered it as retained (on subscribe).
            received_at: the reader's Unix time when it arrived.
        """
        parsed = topics.parse(topic)
        if parsed is None or parsed.fleet != self.fleet:
            return False
        changed = False
        try:
            if parsed.kind == "deploy_report" and parsed.device_id is not None:
                changed = self._report(topic, parsed.device_id, payload)
            elif parsed.kind == "status" and parsed.device_id is not None:
                changed = self._status(topic, parsed.device_id, payload, retained, received_at)
            elif parsed.kind == "result" and parsed.round_number is not None:
                changed = self._result(parsed.round_number, payload, received_at)
            elif parsed.kind == "task" and parsed.round_number is not None:
                changed = self._task(parsed.round_number, payload, retained, received_at)
        except SealError as exc:
            self._refuse(parsed.device_id or "", payload, exc)
            changed = True
        except EdgeflError:
            self.ignored += 1
            changed = True
        if changed:
            self.version += 1
        return changed

    def _open(self, topic: str, device: str, payload: bytes) -> bytes:
        """Return a device's payload once its seal verifies (only stripped when not checking).

        Raises:
            SealError: the verifier refused it.
        """
        devices = self.devices or _NOT_CHECKED
        return devices.open(topic, device, payload)

    def _refuse(self, device: str, payload: bytes, error: SealError) -> None:
        unsigned = not is_sealed(payload)
        reason = f"{error} ({UNSIGNED_HINT})" if unsigned else str(error)
        self.refused_total += 1
        self.refused_unsigned += unsigned
        before = self.refused.get(device)
        if before is None and len(self.refused) >= MAX_REFUSED_DEVICES:
            return
        before = before or RefusedMessages()
        forged = error.code == BAD_SIGNATURE and not unsigned
        self.refused[device] = RefusedMessages(before.count + 1, before.forged + forged, reason)

    def _status(self, topic: str, device: str, payload: bytes, retained: bool, now: float) -> bool:
        if not payload:  # a retained status cleared (never sealed): the device left
            gone = self.statuses.pop(device, None) is not None
            self.seen.pop(device, None)
            return gone
        status = DeviceStatus.decode(self._open(topic, device, payload))
        if status.device_id != device:
            raise EdgeflError(f"status on {device}'s topic claims device {status.device_id!r}")
        if not presence.supersedes(status, self.statuses.get(device)):
            return False  # a late will of an earlier connection
        self.statuses[device] = status
        self.seen[device] = presence.seen_at(status, now, retained)
        return True

    def _result(self, number: int, payload: bytes, now: float) -> bool:
        if not payload:
            return self.results.pop(number, None) is not None
        result = RoundResult.decode(strip_seal(payload))
        self._end_task(number, now)
        self.results[number] = result
        return True

    def _end_task(self, number: int, now: float) -> bool:
        task = self.tasks.pop(number, None)
        if task is not None and task.live:
            self.round_seconds[number] = max(0.0, now - task.seen_at)
        return task is not None

    def _task(self, number: int, payload: bytes, retained: bool, now: float) -> bool:
        if not payload:  # the aggregator clears a round's task when it closes the round
            return self._end_task(number, now)
        task, _heads = decode_round_task(strip_seal(payload))
        self.tasks[number] = OpenTask(
            number, len(task.selected), task.deadline_s, now, len(payload), live=not retained
        )
        self.task_bytes[number] = len(payload)
        return True

    def _report(self, topic: str, device: str, payload: bytes) -> bool:
        if not payload:
            return self.reports.pop(device, None) is not None
        report = DeployReport.from_bytes(self._open(topic, device, payload))
        if report.device_id != device:
            raise EdgeflError(f"deploy report on {device}'s topic claims {report.device_id!r}")
        self.reports[device] = report
        return True
