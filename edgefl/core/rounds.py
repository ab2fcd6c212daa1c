"""The round engine: who is online, who is selected, which updates count, when a round ends.

`RoundEngine` holds every rule of a federated round and none of its I/O: no threads, no MQTT, no
SQLite, no clock (every time-dependent call takes `now`, Unix seconds). The aggregator
(`edgefl.roles.aggregator`) feeds it statuses and update bytes from the network, records what it
answers, and publishes what it produces. A round:

1. `observe_status` keeps each device's latest status and when it was heard; a device is
   eligible only when its status names the exact bundle digest federated (not a version number);
2. `ready` and `settled` say when the first round may select: `min_devices` online, and no new
   eligible device came online for `settle_s` seconds;
3. `open_round` asks the strategy which online devices train and with which `RoundSettings`; the
   round is named by the run ID, the head digest and the bundle digest, which updates echo;
4. `receive` judges each update's bytes: a `Verdict` accepted, rejected (with a code and reason),
   late, or a re-delivery of bytes already counted (nothing to do). A rejected update from a
   selected device for the open round is that device's answer, so the round need not wait;
5. `due` says when every selected device answered or the deadline passed;
6. `close_round` checks the quorum and, if met, bounds each update's influence
   (`edgefl.core.influence`) and aggregates per task with the strategy.

A rejection is counted in the round its topic names: one for a closed round is the record's to
keep under that round, never the open round's. An aggregator restarted mid-round calls `resume`
with the stored round and its stored answers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from edgefl.core.codecs import decode_delta
from edgefl.core.round_state import (
    ACCEPTED,
    DEVICE_METRICS,
    LATE,
    NO_ANSWER,
    REJECTED,
    REPEATED,
    AcceptedUpdate,
    ClosedRound,
    OpenRound,
    StoredAnswer,
    Verdict,
    update_metrics,
)
from edgefl.core.settings import AcceptancePolicy, RoundPolicy, RoundSettings
from edgefl.core.strategies import Strategy
from edgefl.core.task_aggregation import aggregate_tasks
from edgefl.core.update_checks import (
    AnyHeader,
    TaskIdentity,
    check_run,
    check_update,
    decode_compact_body,
    read_header,
    refuse_error_update,
)
from edgefl.core.validation import NOT_AN_ANSWER, UpdateRejected
from edgefl.errors import MessageError
from edgefl.head import Weights, head_digest
from edgefl.transport import presence
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.update_frame import is_compact, read_compact

__all__ = [
    "ACCEPTED", "DEVICE_METRICS", "LATE", "NO_ANSWER", "REJECTED", "REPEATED", "AcceptedUpdate",
    "ClosedRound", "OpenRound", "RoundEngine", "StoredAnswer", "StoredRejection", "Verdict",
    "decode_stored", "update_metrics",
]  # fmt: skip

log = logging.getLogger(__name__)

# A rejected answer as a record keeps it: (device, code, reason, sha256 of the update).
StoredRejection = tuple[str, str, str, str]


class RoundEngine:
    """The rules of a federation's rounds, fed plain values; see the module docstring.

    Not thread-safe: the aggregator calls it under its own lock.
    """

    def __init__(
        self,
        heads: Mapping[str, Weights],
        head_version: int,
        strategies: Mapping[str, Strategy],
        bundle_digest: str,
        policy: RoundPolicy | None = None,
        settings: RoundSettings | None = None,
        acceptance: AcceptancePolicy | None = None,
        run_id: str = "",
    ) -> None:
        """Args:
        heads: the current global head of every task.
        head_version: their version (0: the bundle's own heads).
        strategies: one strategy per task (see `edgefl.core.strategies.build_strategies`).
        bundle_digest: the digest of the bundle devices must run to be selected
            (`edgefl.bundle.ModelBundle.digest`).
        policy: rounds, fraction, quorum, deadline, staleness, settling (default `RoundPolicy()`).
        settings: what tasks ask of boards before the strategy's `configure_round`.
        acceptance: size and norm bounds, influence bounds and the allow-list.
        run_id: the aggregation run rounds belong to; updates must echo it (may be set later,
            before the first round opens).

        Raises:
            ValueError: a task without a strategy.
        """
        missing = sorted(set(heads) - set(strategies))
        if missing:
            raise ValueError(f"no strategy for task {', '.join(missing)}")
        self.heads: dict[str, Weights] = dict(heads)
        self.head_version = head_version
        self.strategies = dict(strategies)
        self.bundle_digest = bundle_digest
        self.run_id = run_id
        self.policy = policy or RoundPolicy()
        self.settings = settings or RoundSettings()
        self.acceptance = acceptance or AcceptancePolicy()
        self._allow = (
            frozenset(self.acceptance.allow) if self.acceptance.allow is not None else None
        )
        self.statuses: dict[str, DeviceStatus] = {}
        self._seen: dict[str, float] = {}  # device -> Unix time its status counts from
        self._joined: dict[str, float] = {}  # eligible device -> when it was heard coming online
        self._last_joined = -math.inf  # max(self._joined.values()), kept as they change
        self.round: OpenRound | None = None

    # -- presence --

    def observe_status(self, status: DeviceStatus, seen: float, now: float | None = None) -> None:
        """Keep a device's latest status.

        Args:
            status: the status as received.
            seen: when it counts from (`presence.seen_at`).
            now: when the aggregator heard it (default `seen`): settling is measured by it.
        """
        device = status.device_id
        if not presence.supersedes(status, self.statuses.get(device)):
            log.info("%s: ignored a late last will of an earlier connection", device)
            return
        self.statuses[device] = status
        # The broker re-sends retained statuses after a reconnect, dated by the device's clock;
        # it keeps the newest, so a re-sent status is no older than what was heard live.
        self._seen[device] = max(seen, self._seen.get(device, 0.0))
        if status.state == "online" and self._eligible(status):
            joined = self._joined.setdefault(device, seen if now is None else now)
            self._last_joined = max(self._last_joined, joined)
        elif self._joined.pop(device, -math.inf) >= self._last_joined:
            self._last_joined = max(self._joined.values(), default=-math.inf)

    def _eligible(self, status: DeviceStatus) -> bool:
        return (
            (self._allow is None or status.device_id in self._allow)
            and status.bundle_digest == self.bundle_digest
            and status.task in self.heads
        )

    def device_presence(self, now: float) -> dict[str, str]:
        """Return "online", "stale" or "offline" for every device that could train this bundle.

        Eligible: on the allow-list (if any), running the bundle's exact digest, and declaring a
        task there is a head for.
        """
        return {
            device: presence.presence(
                status, self._seen.get(device, 0.0), now, self.policy.stale_after_s
            )
            for device, status in self.statuses.items()
            if self._eligible(status)
        }

    def online_devices(self, now: float) -> dict[str, DeviceStatus]:
        """Return the eligible devices online with a fresh status and samples to train on."""
        states = self.device_presence(now)
        online = (d for d, state in states.items() if state == presence.ONLINE)
        return {d: self.statuses[d] for d in online if self.statuses[d].samples > 0}

    def stale_devices(self, now: float) -> list[str]:
        """Return the eligible devices whose status says online but was not heard in time."""
        return sorted(
            d for d, state in self.device_presence(now).items() if state == presence.STALE
        )

    def ready(self, now: float) -> bool:
        """Whether `policy.min_devices` eligible devices are online, so a round can start."""
        # Asked after every status while a fleet comes up: while fewer have come online than
        # needed, the answer needs no pass over every device (10,000 statuses made that 10^8).
        if len(self._joined) < self.policy.min_devices:
            return False
        return len(self.online_devices(now)) >= self.policy.min_devices

    def settled(self, now: float) -> bool:
        """Whether the online set has settled: no eligible device came online in the last
        `policy.settle_s` seconds (statuses arrive on connect, so a fleet shows up in a burst).
        """
        return now - self._last_joined >= self.policy.settle_s

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
        self.round = self._new_round(number, selected, plan.settings.to_wire(), now)
        self.round.announced = {device: online[device].samples for device in selected}
        self.count_presence(now)
        return self.round

    def _new_round(
        self, number: int, selected: Mapping[str, str], config: Mapping[str, Any], now: float
    ) -> OpenRound:
        tasks = sorted(set(selected.values()))
        return OpenRound(
            number, dict(selected), dict(config), now + self.policy.deadline_s, self.head_version,
            run_id=self.run_id, bundle_digest=self.bundle_digest,
            head_digest=head_digest({task: self.heads[task] for task in tasks}),
            privacy=RoundSettings.from_wire(config).privacy,
        )  # fmt: skip

    def withdraw_round(self) -> None:
        """Forget the round just opened, before its task was sent (the run stops instead)."""
        self.round = None

    def task_heads(self) -> dict[str, Weights]:
        """Return the heads the open round's task carries (those its head digest names)."""
        if self.round is None:
            return {}
        return {task: self.heads[task] for task in sorted(set(self.round.selected.values()))}

    def resume(
        self,
        number: int,
        selected: Mapping[str, str],
        head_version: int,
        config: Mapping[str, Any],
        stored: Iterable[StoredAnswer],
        now: float,
        rejected: Iterable[StoredRejection] = (),
    ) -> OpenRound:
        """Reopen a round left open by a restart, with the answers stored for it.

        The round gets a fresh deadline (`now + deadline_s`): devices need time to see the task
        again. A stored update that cannot be decoded is logged and left out.

        Args:
            number, selected, head_version, config: the round as recorded (config: as sent).
            stored: its accepted updates, in arrival order.
            now: the current Unix time.
            rejected: its rejected answers (device, code, reason, sha256), in arrival order.

        Returns:
            The reopened round.

        Raises:
            ValueError: the round was selected from another head version than the engine's
                (the record lost a close, or the heads were not the stored ones).
        """
        if head_version != self.head_version:
            raise ValueError(
                f"round {number} was opened on head v{head_version}, the heads are "
                f"v{self.head_version}"
            )
        self.round = self._new_round(number, selected, config, now)
        self._restore_answers(self.round, stored, rejected)
        return self.round

    def _restore_answers(
        self, round_: OpenRound, stored: Iterable[StoredAnswer], rejected: Iterable[StoredRejection]
    ) -> None:
        """Put a reopened round's stored answers back (see `resume`)."""
        for update in stored:
            head = self.heads.get(round_.selected.get(update.device_id, ""))
            delta = decode_stored(round_.number, update, head)
            if delta is None:
                continue
            round_.accepted[update.device_id] = AcceptedUpdate(
                delta, update.samples, update.sha256, len(update.payload), dict(update.metrics)
            )
            round_.answered[update.device_id] = update.sha256
            round_.answers[update.device_id] = ACCEPTED
        for device, code, reason, sha256 in rejected:
            if device in round_.selected and device not in round_.answered:
                round_.answered[device] = sha256
                round_.answers[device], round_.reasons[device] = code, reason

    def count_presence(self, now: float) -> None:
        """Note in the open round how many eligible devices are online and which are stale."""
        if self.round is None:
            return
        states = self.device_presence(now)
        self.round.online = sum(state == presence.ONLINE for state in states.values())
        self.round.stale = sorted(d for d, state in states.items() if state == presence.STALE)
        for device in self.round.selected:
            if device not in self.round.announced and device in self.statuses:
                self.round.announced[device] = self.statuses[device].samples

    # -- updates --

    def receive(self, number: int, device: str, payload: bytes) -> Verdict:
        """Judge one update that arrived on `number`'s topic for `device`.

        Accepted updates join the open round. A rejected one from a selected device for the
        open round is that device's answer; a later, different update from it is a
        "duplicate", and the same bytes again are `REPEATED` and change nothing.

        Returns:
            The verdict; never raises for anything a device can send.
        """
        digest = hashlib.sha256(payload).hexdigest()
        previous = self._answer_of(number, device)
        if previous == digest:
            return self._repeated(number, device, digest, len(payload))
        if previous is not None:
            reason = f"{device} already answered round {number}"
            return self.refuse(number, device, "duplicate", reason, len(payload))
        try:
            return self._admit(number, device, payload, digest)
        except UpdateRejected as exc:
            return self.refuse(number, device, exc.code, exc.reason, len(payload), digest)

    def _answer_of(self, number: int, device: str) -> str | None:
        """Return the SHA-256 of what `device` already answered round `number` with (None:
        nothing counted, or not the open round)."""
        round_ = self.round
        if round_ is not None and not round_.closed and number == round_.number:
            return round_.answered.get(device)
        return None

    def _repeated(self, number: int, device: str, digest: str, size: int) -> Verdict:
        task = self.round.selected[device] if self.round is not None else ""
        return Verdict(REPEATED, number, device, task=task, sha256=digest, size=size)

    def refuse(
        self, number: int, device: str, code: str, reason: str, size: int, sha256: str = "",
        answers: bool = True,
    ) -> Verdict:  # fmt: skip
        """Count an update refused before or while reading it (e.g. "oversized", "bad-topic").

        Counted in the open round only when it names that round (or no round: `number` < 0);
        one for another round is the record's to count under that round. From a selected
        device that had not answered it, it is its answer (codes in NOT_AN_ANSWER never are,
        nor a message with `answers` False: one that cannot be attributed to its device).

        Returns:
            A `LATE` verdict for code "round-closed", else `REJECTED`.
        """
        outcome = LATE if code == "round-closed" else REJECTED
        round_ = self.round
        complete = False
        if round_ is not None and not round_.closed and number in (round_.number, -1):
            if outcome == LATE:
                round_.late += 1
            else:
                round_.rejected[code] += 1
            answer = answers and code not in NOT_AN_ANSWER
            if number == round_.number and device in round_.selected and answer:
                round_.answered.setdefault(device, sha256)
                round_.answers.setdefault(device, code)
                round_.reasons.setdefault(device, reason)
                complete = round_.complete
        log.warning("round %d: rejected update from %s: %s: %s", number, device, code, reason)
        return Verdict(outcome, number, device, code, reason, size=size, sha256=sha256,
                       complete=complete)  # fmt: skip

    def _admit(self, number: int, device: str, payload: bytes, digest: str) -> Verdict:
        header = read_header(device, number, payload, self._allow)
        round_, task = self._identify(number, device, header)
        delta = self._checked_delta(header, round_, task, payload)
        round_.accepted[device] = AcceptedUpdate(
            delta, header.samples, digest, len(payload), dict(header.metrics)
        )
        round_.answered[device] = digest
        round_.answers[device] = ACCEPTED
        return Verdict(
            ACCEPTED, number, device, task=task, samples=header.samples, sha256=digest,
            size=len(payload), metrics=dict(header.metrics), complete=round_.complete,
        )  # fmt: skip

    def _checked_delta(
        self, header: AnyHeader, round_: OpenRound, task: str, payload: bytes
    ) -> Weights:
        """Return the validated delta of an update answering `round_`'s task (see
        `edgefl.core.update_checks`); an error update is refused with the device's code."""
        refuse_error_update(header)
        identity = TaskIdentity(
            round_.bundle_digest, round_.head_digest, round_.head_version, round_.privacy,
            self.run_id, round_.number,
        )  # fmt: skip
        return check_update(
            header, task, identity, self.heads[task], self.acceptance.max_norm, payload
        )

    def _identify(self, number: int, device: str, header: AnyHeader) -> tuple[OpenRound, str]:
        """Return the open round an update answers and the device's task in it.

        The one place that matches an update to a round: by run ID first (a round number alone
        is shared by every run), then round and selection.
        """
        check_run(header, self.run_id)
        round_ = self.round
        if round_ is None or number > round_.number:
            raise UpdateRejected("round-unknown", f"round {number} has not started")
        if number < round_.number or round_.closed:
            raise UpdateRejected("round-closed", f"round {number} is closed")
        if device not in round_.selected:
            raise UpdateRejected("not-selected", f"{device} was not selected for round {number}")
        return round_, round_.selected[device]

    # -- closing --

    def due(self, now: float) -> bool:
        """Whether the open round should close: every selected device answered, or time is up."""
        round_ = self.round
        return round_ is None or round_.complete or now >= round_.deadline

    def close_round(self) -> ClosedRound:
        """Close the open round: bound and aggregate per task if the quorum is met, else fail it.

        Updates arriving afterwards are late. On success the heads and `head_version` advance.
        The metrics count the updates whose weight was capped ("capped") and whose norm was
        clipped ("clipped") by the influence bound.

        Raises:
            RuntimeError: no round is open.
            ValueError: the strategy refused the deltas (a bug: they were validated).
        """
        round_ = self._closing()
        accepted = round_.accepted
        needed = max(1, math.ceil(self.policy.quorum * len(round_.selected)))
        status = "closed" if len(accepted) >= needed else "failed"
        reason = "" if status == "closed" else f"{len(accepted)} accepted, quorum is {needed}"
        metrics = update_metrics(accepted.values())
        if status == "closed":
            clipped, capped = self._aggregate(round_)
            metrics.update(clipped=float(clipped), capped=float(capped))
            self.head_version += 1
        answers = {d: round_.answers.get(d, NO_ANSWER) for d in round_.selected}
        reasons = {d: round_.reasons.get(d, "no update before the round closed")
                   for d, answer in answers.items() if answer != ACCEPTED}  # fmt: skip
        return ClosedRound(
            round_.number, status, reason, self.head_version, len(round_.selected),
            len(accepted), dict(round_.rejected), round_.late, round_.online,
            list(round_.stale), metrics, answers, reasons,
        )  # fmt: skip

    def _closing(self) -> OpenRound:
        """Mark the open round closed and return it (RuntimeError: none is open)."""
        if self.round is None or self.round.closed:
            raise RuntimeError("no round is open")
        self.round.closed = True
        return self.round

    def _aggregate(self, round_: OpenRound) -> tuple[int, int]:
        """Bound each task's updates, aggregate them into new heads; return (clipped, capped)."""
        # By device ID, not arrival: the float sums (and a simulation's result) must not depend
        # on which board happened to answer first.
        updates = {
            device: (round_.selected[device], update.delta, update.samples)
            for device, update in sorted(round_.accepted.items())
        }
        self.heads, clipped, capped = aggregate_tasks(
            self.heads, self.strategies, updates, round_.announced, self.acceptance
        )
        return clipped, capped


def decode_stored(number: int, update: StoredAnswer, head: Weights | None) -> Weights | None:
    """Return a stored accepted update's delta; None (logged) when it cannot be decoded.

    `head` is the device's task's head: a compact update's tensors are shaped as it is.
    """
    try:
        if is_compact(update.payload):
            if head is None:
                raise MessageError("no head for its task")
            return decode_compact_body(read_compact(update.payload), head, update.payload)
        return decode_delta(update.payload)[0]
    except MessageError as exc:  # stored by this code, so only a corrupt file gets here
        log.error("round %d: stored update of %s unreadable: %s", number, update.device_id, exc)
        return None
