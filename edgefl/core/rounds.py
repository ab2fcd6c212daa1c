"""The round engine: who is online, who is selected, which updates count, when a round ends.

`RoundEngine` holds every rule of a federated round and none of its I/O: no threads, no MQTT, no
SQLite, no clock (every time-dependent call takes `now`, Unix seconds). The aggregator
(`edgefl.roles.aggregator`) feeds it statuses and update bytes from the network, records what it
answers, and publishes what it produces. A round:

1. `observe_status` keeps each device's latest status and when it was heard;
2. `open_round` asks the strategy which online devices train and with which `RoundSettings`;
3. `receive` judges each update's bytes: a `Verdict` accepted, rejected (with a code and reason),
   late, or a re-delivery of bytes already counted (nothing to do);
4. `due` says when every selected device answered or the deadline passed;
5. `close_round` checks the quorum and, if met, aggregates per task with the strategy.

An aggregator restarted mid-round calls `resume` with the stored round and its accepted updates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgefl.core.codecs import decode_delta
from edgefl.core.settings import AcceptancePolicy, RoundPolicy, RoundSettings
from edgefl.core.strategies import Strategy
from edgefl.core.validation import UpdateRejected, validate_delta
from edgefl.errors import MessageError
from edgefl.head import Weights
from edgefl.transport import presence
from edgefl.transport.messages import DeviceStatus, UpdateHeader, read_update_header

log = logging.getLogger(__name__)

# What `RoundEngine.receive` decided about an update.
ACCEPTED = "accepted"
REJECTED = "rejected"
LATE = "late"  # for a round already closed; recorded, counted apart from rejections
REPEATED = "repeated"  # the same bytes again (re-delivery after a reconnect): already counted

# Device metrics averaged over a round's accepted updates, weighted by samples.
DEVICE_METRICS = ("loss", "global_accuracy", "personal_accuracy")


@dataclass(frozen=True)
class Verdict:
    """What the engine decided about one update, with what the record needs to keep."""

    outcome: str  # ACCEPTED | REJECTED | LATE | REPEATED
    round: int
    device: str
    code: str = ""  # why it was rejected or late
    reason: str = ""
    task: str = ""
    samples: int = 0
    sha256: str = ""
    size: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    complete: bool = False  # every selected device of the open round has now answered


@dataclass
class AcceptedUpdate:
    """An update taken into a round: the decoded delta and what it reported."""

    delta: Weights
    samples: int
    sha256: str
    size: int
    metrics: dict[str, float]


@dataclass
class OpenRound:
    """A round from selection to close. `config` is the task's settings as sent on the wire."""

    number: int
    selected: dict[str, str]  # device -> task
    config: dict[str, Any]
    deadline: float  # Unix time
    head_version: int
    online: int = 0
    stale: list[str] = field(default_factory=list)
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    answered: dict[str, str] = field(default_factory=dict)  # device -> sha256 (errors too)
    rejected: Counter[str] = field(default_factory=Counter)
    late: int = 0
    closed: bool = False

    @property
    def complete(self) -> bool:
        """Whether every selected device has answered (an error answer counts)."""
        return len(self.answered) >= len(self.selected)


@dataclass(frozen=True)
class ClosedRound:
    """What closing a round produced."""

    number: int
    status: str  # "closed" (aggregated) | "failed" (below quorum; heads unchanged)
    reason: str
    head_version: int  # after the round
    selected: int
    accepted: int
    rejected: dict[str, int]
    late: int
    online: int
    stale: list[str]
    metrics: dict[str, float]  # from the accepted updates: samples, bytes, device_* averages


class StoredAnswer(Protocol):
    """An accepted update as a record keeps it (`edgefl.roles.record.StoredUpdate` is one)."""

    device_id: str
    samples: int
    sha256: str
    payload: bytes
    metrics: dict[str, float]


class RoundEngine:
    """The rules of a federation's rounds, fed plain values; see the module docstring.

    Not thread-safe: the aggregator calls it under its own lock.
    """

    def __init__(
        self,
        heads: Mapping[str, Weights],
        head_version: int,
        strategies: Mapping[str, Strategy],
        model_version: int,
        policy: RoundPolicy | None = None,
        settings: RoundSettings | None = None,
        acceptance: AcceptancePolicy | None = None,
    ) -> None:
        """Args:
        heads: the current global head of every task.
        head_version: their version (0: the bundle's own heads).
        strategies: one strategy per task (see `edgefl.core.strategies.build_strategies`).
        model_version: the bundle version devices must run to be selected.
        policy: rounds, fraction, quorum, deadline, staleness (default `RoundPolicy()`).
        settings: what tasks ask of boards before the strategy's `configure_round`.
        acceptance: size and norm bounds and the allow-list.

        Raises:
            ValueError: a task without a strategy.
        """
        missing = sorted(set(heads) - set(strategies))
        if missing:
            raise ValueError(f"no strategy for task {', '.join(missing)}")
        self.heads: dict[str, Weights] = dict(heads)
        self.head_version = head_version
        self.strategies = dict(strategies)
        self.model_version = model_version
        self.policy = policy or RoundPolicy()
        self.settings = settings or RoundSettings()
        self.acceptance = acceptance or AcceptancePolicy()
        self._allow = (
            frozenset(self.acceptance.allow) if self.acceptance.allow is not None else None
        )
        self.statuses: dict[str, DeviceStatus] = {}
        self._seen: dict[str, float] = {}  # device -> Unix time its status counts from
        self.round: OpenRound | None = None

    # -- presence --

    def observe_status(self, status: DeviceStatus, seen: float) -> None:
        """Keep a device's latest status; `seen` is when it counts from (`presence.seen_at`)."""
        self.statuses[status.device_id] = status
        # The broker re-sends retained statuses after a reconnect, dated by the device's clock;
        # it keeps the newest, so a re-sent status is no older than what was heard live.
        self._seen[status.device_id] = max(seen, self._seen.get(status.device_id, 0.0))

    def device_presence(self, now: float) -> dict[str, str]:
        """Return "online", "stale" or "offline" for every device that could train this bundle.

        Eligible: on the allow-list (if any), running the bundle's version, and declaring a task
        there is a head for.
        """
        return {
            device: presence.presence(
                status, self._seen.get(device, 0.0), now, self.policy.stale_after_s
            )
            for device, status in self.statuses.items()
            if (self._allow is None or device in self._allow)
            and status.model_version == self.model_version
            and status.task in self.heads
        }

    def online_devices(self, now: float) -> dict[str, DeviceStatus]:
        """Return the eligible devices online with a fresh status at `now`."""
        states = self.device_presence(now)
        return {d: self.statuses[d] for d, state in states.items() if state == presence.ONLINE}

    def stale_devices(self, now: float) -> list[str]:
        """Return the eligible devices whose status says online but was not heard in time."""
        return sorted(
            d for d, state in self.device_presence(now).items() if state == presence.STALE
        )

    def ready(self, now: float) -> bool:
        """Whether `policy.min_devices` eligible devices are online, so a round can start."""
        return len(self.online_devices(now)) >= self.policy.min_devices

    # -- opening --

    def open_round(self, number: int, now: float) -> OpenRound:
        """Select the round's devices with the strategy and open it until `now + deadline_s`.

        Raises:
            ValueError: the strategy selected no device, or a device that is not online.
        """
        online = self.online_devices(now)
        # Every task runs the same strategy with the same parameters, so the first task's
        # instance speaks for the round (its per-task server state plays no part in selection).
        strategy = next(iter(self.strategies.values()))
        plan = strategy.configure_round(
            number, online, self.settings, self.policy, self.settings.train.seed
        )
        unknown = sorted(set(plan.selected) - set(online))
        if unknown or not plan.selected:
            what = f"devices that are not online: {', '.join(unknown)}" if unknown else "nobody"
            raise ValueError(f"strategy {strategy!r} selected {what} for round {number}")
        selected = {device: online[device].task for device in sorted(plan.selected)}
        self.round = OpenRound(
            number, selected, plan.settings.to_wire(), now + self.policy.deadline_s,
            self.head_version,
        )  # fmt: skip
        self.count_presence(now)
        return self.round

    def resume(
        self,
        number: int,
        selected: Mapping[str, str],
        head_version: int,
        config: Mapping[str, Any],
        stored: Iterable[StoredAnswer],
        now: float,
    ) -> OpenRound:
        """Reopen a round left open by a restart, with the accepted updates stored for it.

        The round gets a fresh deadline (`now + deadline_s`): devices need time to see the task
        again. A stored update that cannot be decoded is logged and left out.

        Args:
            number, selected, head_version, config: the round as recorded (config: as sent).
            stored: its accepted updates, in arrival order.
            now: the current Unix time.

        Returns:
            The reopened round.
        """
        round_ = OpenRound(
            number, dict(selected), dict(config), now + self.policy.deadline_s, head_version
        )
        for update in stored:
            try:
                delta, _ = decode_delta(update.payload)
            except MessageError as exc:  # stored by this code, so only a corrupt file gets here
                log.error("round %d: stored update of %s unreadable: %s", number,
                          update.device_id, exc)  # fmt: skip
                continue
            round_.accepted[update.device_id] = AcceptedUpdate(
                delta, update.samples, update.sha256, len(update.payload), dict(update.metrics)
            )
            round_.answered[update.device_id] = update.sha256
        self.round = round_
        return round_

    def count_presence(self, now: float) -> None:
        """Note in the open round how many eligible devices are online and which are stale."""
        if self.round is None:
            return
        states = self.device_presence(now)
        self.round.online = sum(state == presence.ONLINE for state in states.values())
        self.round.stale = sorted(d for d, state in states.items() if state == presence.STALE)

    # -- updates --

    def receive(self, number: int, device: str, payload: bytes) -> Verdict:
        """Judge one update that arrived on `number`'s topic for `device`.

        Accepted updates join the open round; rejected and late ones are counted in it. The
        same bytes from the same device again are `REPEATED` and change nothing.

        Returns:
            The verdict; never raises for anything a device can send.
        """
        try:
            return self._admit(number, device, payload)
        except UpdateRejected as exc:
            return self.refuse(number, device, exc.code, exc.reason, len(payload))

    def refuse(self, number: int, device: str, code: str, reason: str, size: int) -> Verdict:
        """Count an update refused before or while reading it (e.g. "oversized", "bad-topic").

        Returns:
            A `LATE` verdict for code "round-closed", else `REJECTED`.
        """
        outcome = LATE if code == "round-closed" else REJECTED
        round_ = self.round
        if round_ is not None and not round_.closed:
            # Counted in the round that is open, whichever round the update named.
            if outcome == LATE:
                round_.late += 1
            else:
                round_.rejected[code] += 1
        log.warning("round %d: rejected update from %s: %s: %s", number, device, code, reason)
        return Verdict(outcome, number, device, code, reason, size=size)

    def _admit(self, number: int, device: str, payload: bytes) -> Verdict:
        header = self._read_header(device, number, payload)
        round_, task = self._identify(number, device)
        digest = hashlib.sha256(payload).hexdigest()
        previous = round_.answered.get(device)
        if previous == digest:
            return Verdict(REPEATED, number, device, task=task, sha256=digest, size=len(payload))
        if previous is not None:
            raise UpdateRejected("duplicate", f"{device} already answered round {number}")
        if header.status == "error":
            # The device answered, so the round need not wait for it until the deadline.
            round_.answered[device] = digest
            verdict = self.refuse(
                number, device, f"device:{header.error_code or 'error'}",
                header.reason or "device reported failure", len(payload),
            )  # fmt: skip
            return dataclasses.replace(verdict, complete=round_.complete)
        delta = self._check_update(header, round_, task, payload)
        round_.accepted[device] = AcceptedUpdate(
            delta, header.samples, digest, len(payload), dict(header.metrics)
        )
        round_.answered[device] = digest
        return Verdict(
            ACCEPTED, number, device, task=task, samples=header.samples, sha256=digest,
            size=len(payload), metrics=dict(header.metrics), complete=round_.complete,
        )  # fmt: skip

    def _read_header(self, device: str, number: int, payload: bytes) -> UpdateHeader:
        """Check the sender may send at all, and that the header matches the topic."""
        if self._allow is not None and device not in self._allow:
            raise UpdateRejected("unknown-device", f"device {device!r} is not in the fleet list")
        try:
            header = read_update_header(payload)
        except MessageError as exc:
            raise UpdateRejected("malformed", str(exc)) from None
        if header.device_id != device:
            raise UpdateRejected(
                "device-mismatch", f"update from {header.device_id!r} on {device!r}'s topic"
            )
        if header.round != number:
            raise UpdateRejected(
                "round-mismatch", f"update for round {header.round} on round {number}'s topic"
            )
        return header

    def _identify(self, number: int, device: str) -> tuple[OpenRound, str]:
        """Return the open round an update answers and the device's task in it.

        The one place that matches an update to a round: run IDs and bundle digests belong here.
        """
        round_ = self.round
        if round_ is None or number > round_.number:
            raise UpdateRejected("round-unknown", f"round {number} has not started")
        if number < round_.number or round_.closed:
            raise UpdateRejected("round-closed", f"round {number} is closed")
        if device not in round_.selected:
            raise UpdateRejected("not-selected", f"{device} was not selected for round {number}")
        return round_, round_.selected[device]

    def _check_update(
        self, header: UpdateHeader, round_: OpenRound, task: str, payload: bytes
    ) -> Weights:
        """Check what an "ok" update claims and return its validated delta."""
        if header.task != task:
            raise UpdateRejected(
                "task-mismatch", f"update is for task {header.task!r}, not {task!r}"
            )
        if header.head_version != round_.head_version:
            raise UpdateRejected(
                "stale-head",
                f"trained from head v{header.head_version}, round uses v{round_.head_version}",
            )
        if header.samples < 1:
            raise UpdateRejected("no-samples", "update reports no training samples")
        try:
            delta, _ = decode_delta(payload)
        except MessageError as exc:
            raise UpdateRejected("malformed", str(exc)) from None
        validate_delta(delta, self.heads[task], self.acceptance.max_norm)
        return delta

    # -- closing --

    def due(self, now: float) -> bool:
        """Whether the open round should close: every selected device answered, or time is up."""
        round_ = self.round
        return round_ is None or round_.complete or now >= round_.deadline

    def close_round(self) -> ClosedRound:
        """Close the open round: aggregate per task if the quorum is met, else fail it.

        Updates arriving afterwards are late. On success the heads and `head_version` advance.

        Raises:
            RuntimeError: no round is open.
            ValueError: the strategy refused the deltas (a bug: they were validated).
        """
        round_ = self.round
        if round_ is None or round_.closed:
            raise RuntimeError("no round is open")
        round_.closed = True
        accepted = round_.accepted
        needed = max(1, math.ceil(self.policy.quorum * len(round_.selected)))
        status = "closed" if len(accepted) >= needed else "failed"
        reason = "" if status == "closed" else f"{len(accepted)} accepted, quorum is {needed}"
        if status == "closed":
            by_task: dict[str, list[tuple[Weights, int]]] = {}
            for device, update in accepted.items():
                by_task.setdefault(round_.selected[device], []).append(
                    (update.delta, update.samples)
                )
            heads = dict(self.heads)
            for task, deltas in by_task.items():
                heads[task] = self.strategies[task].aggregate(self.heads[task], deltas)
            self.heads = heads
            self.head_version += 1
        return ClosedRound(
            round_.number, status, reason, self.head_version, len(round_.selected),
            len(accepted), dict(round_.rejected), round_.late, round_.online,
            list(round_.stale), update_metrics(accepted.values()),
        )  # fmt: skip


def update_metrics(accepted: Iterable[AcceptedUpdate]) -> dict[str, float]:
    """Summarise a round's accepted updates: total samples, mean bytes, device metric averages.

    A device metric (`DEVICE_METRICS`) is averaged, weighted by samples, only when every update
    reports it.
    """
    updates = list(accepted)
    if not updates:
        return {}
    samples = np.array([u.samples for u in updates], dtype=np.float64)
    metrics = {
        "samples": float(samples.sum()),
        "bytes_per_update": float(np.mean([u.size for u in updates])),
    }
    weights = samples / max(samples.sum(), 1.0)
    for name in DEVICE_METRICS:
        values = [u.metrics.get(name) for u in updates]
        if all(v is not None for v in values):
            metrics[f"device_{name}"] = float(np.dot(weights, np.array(values, float)))
    return metrics
