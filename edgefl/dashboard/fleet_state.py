"""What the dashboard knows of a fleet from its MQTT messages, folded in one message at a time.

Pure: messages arrive as (topic, payload, retained, received_at) and nothing here reads a clock,
a socket or a file, so tests feed it literal messages. Payloads are decoded with the protocol's
own decoders; a sealed payload (`edgefl.transport.sealed`) is displayed without its seal being
checked: the dashboard acts on nothing it shows (`edgefl fleet --state` checks every seal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefl.delivery.release import DeployReport
from edgefl.errors import EdgeflError
from edgefl.transport import presence, topics
from edgefl.transport.messages import DeviceStatus, RoundResult, decode_round_task
from edgefl.transport.sealed import strip_seal


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

    def copy(self) -> FleetState:
        """Return a copy whose collections later messages do not change (the messages inside are
        replaced, never mutated, so they are shared)."""
        return FleetState(
            self.fleet, dict(self.statuses), dict(self.seen), dict(self.reports),
            dict(self.results), dict(self.tasks), dict(self.task_bytes),
            dict(self.round_seconds), self.ignored, self.version,
        )  # fmt: skip

    def observe(self, topic: str, payload: bytes, retained: bool, received_at: float) -> bool:
        """Fold one message in; return whether anything shown changed.

        Args:
            topic: the topic it arrived on.
            payload: its bytes (empty: a retained topic was cleared).
            retained: whether the broker delivered it as retained (on subscribe).
            received_at: the reader's Unix time when it arrived.
        """
        levels = topic.split("/")
        # Deploy reports (devices/{id}/deploy) are delivery's topics, outside `topics.parse`.
        report = len(levels) == 6 and levels[3] == "devices" and levels[5] == "deploy"
        parsed = topics.parse(topic)
        fleet = levels[2] if report else parsed.fleet if parsed is not None else None
        if fleet != self.fleet:
            return False
        changed = False
        try:
            if report:
                changed = self._report(levels[4], payload)
            elif parsed is None:
                return False
            elif parsed.kind == "status" and parsed.device_id is not None:
                changed = self._status(parsed.device_id, payload, retained, received_at)
            elif parsed.kind == "result" and parsed.round_number is not None:
                changed = self._result(parsed.round_number, payload, received_at)
            elif parsed.kind == "task" and parsed.round_number is not None:
                changed = self._task(parsed.round_number, payload, retained, received_at)
        except EdgeflError:
            self.ignored += 1
            changed = True
        if changed:
            self.version += 1
        return changed

    def _status(self, device: str, payload: bytes, retained: bool, now: float) -> bool:
        if not payload:
            gone = self.statuses.pop(device, None) is not None
            self.seen.pop(device, None)
            return gone
        status = DeviceStatus.decode(strip_seal(payload))
        if status.device_id != device:
            raise EdgeflError(f"status on {device}'s topic claims device {status.device_id!r}")
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

    def _report(self, device: str, payload: bytes) -> bool:
        if not payload:
            return self.reports.pop(device, None) is not None
        report = DeployReport.from_bytes(strip_seal(payload))
        if report.device_id != device:
            raise EdgeflError(f"deploy report on {device}'s topic claims {report.device_id!r}")
        self.reports[device] = report
        return True
