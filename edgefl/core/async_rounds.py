"""Buffered asynchronous rounds (FedBuff): every K accepted updates make a new head version.

`AsyncRoundEngine` keeps the synchronous engine's presence, selection and identity rules
(`edgefl.core.rounds.RoundEngine`, whose update checks live in `edgefl.core.update_checks`) and
changes what a round is. Round n's task carries the current head to every eligible online device
(the strategy's selection; `fraction` 1 selects all) and stays open until the buffer holds
`AsyncPolicy.buffer` accepted updates, or its deadline passes with at least one; closing it
aggregates the buffer into the next head version and round n + 1 opens on it. Boards answer
whenever they are idle, on the newest task they have, so an update may answer an older round's
task: it is accepted while its staleness s (head versions published since the one it trained
from) is at most `max_staleness`, refused "stale" beyond that, and its delta is weighted by the
staleness function (`edgefl.core.staleness`) before the strategy aggregates the buffer.

Every update is counted in the buffer being filled when it arrived (`Verdict.round`), whatever
round its topic names; its metrics carry `trained_round` and `staleness`, which is how a
restarted aggregator rebuilds its buffer and the answers already counted (`resume`,
`remember_task`, `remember_answers`). Like the synchronous engine: no threads, no MQTT, no
SQLite, the clock passed in.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefl.core.rounds import (
    ACCEPTED,
    REJECTED,
    REPEATED,
    AcceptedUpdate,
    ClosedRound,
    OpenRound,
    RoundEngine,
    StoredAnswer,
    StoredRejection,
    Verdict,
    decode_stored,
    update_metrics,
)
from edgefl.core.settings import AsyncPolicy
from edgefl.core.staleness import parse_staleness
from edgefl.core.task_aggregation import aggregate_tasks
from edgefl.core.update_checks import check_run, read_header
from edgefl.core.validation import NOT_AN_ANSWER, UpdateRejected
from edgefl.head import Weights
from edgefl.transport.messages import UpdateHeader

__all__ = ["AsyncRoundEngine", "Buffer", "BufferedUpdate"]

log = logging.getLogger(__name__)

# (device, the round whose task it trained): a device answers each task at most once.
BufferKey = tuple[str, int]


@dataclass
class BufferedUpdate(AcceptedUpdate):
    """An accepted update waiting in the buffer: which task it trained and from which round."""

    task: str = "default"
    trained_round: int = 0
    trained_version: int = 0  # the head version it trained from: its staleness when aggregated


@dataclass
class Buffer:
    """The updates gathered for one round (the next head version), and what was refused."""

    number: int  # the round the record counts these updates under
    updates: dict[BufferKey, BufferedUpdate] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    answers: dict[str, str] = field(default_factory=dict)  # device -> its last verdict here
    reasons: dict[str, str] = field(default_factory=dict)


class AsyncRoundEngine(RoundEngine):
    """The rules of buffered asynchronous rounds; see the module docstring.

    Not thread-safe: the aggregator calls it under its own lock.
    """

    def __init__(self, *args: Any, asynchronous: AsyncPolicy | None = None, **kwargs: Any) -> None:
        """Args: those of `RoundEngine`, and `asynchronous`: the buffer size, the staleness
        bound and function (default `AsyncPolicy(mode="async")`).

        Raises:
            ValueError: a task without a strategy, or an invalid async setting.
        """
        super().__init__(*args, **kwargs)
        self.asynchronous = asynchronous or AsyncPolicy(mode="async")
        self.asynchronous.check()
        self.weight = parse_staleness(self.asynchronous.staleness)
        # Rounds whose task an update may still answer, by number (the open one included).
        self.tasks: dict[int, OpenRound] = {}
        # (device, trained round) -> SHA-256 of its accepted update: a device answers each task
        # once, and the same bytes again (a re-delivery) change nothing.
        self.answered: dict[BufferKey, str] = {}
        # The open round's buffer, or the next round's between a close and an open. Updates
        # arriving after it holds K, before the round closes, join it too: queueing them for
        # the next version instead made every later version staler (a backlog that grows
        # whenever updates arrive faster than versions are made).
        self.buffer = Buffer(1)

    # -- opening --

    def open_round(self, number: int, now: float) -> OpenRound:
        """Open round `number` on the current heads, selecting as the strategy says.

        Updates buffered since the last round closed stay in the buffer, now this round's.
        """
        round_ = super().open_round(number, now)
        self.tasks[number] = round_
        self.buffer.number = number
        self._forget_old_tasks()
        return round_

    def remember_task(
        self,
        number: int,
        selected: Mapping[str, str],
        head_version: int,
        config: Mapping[str, Any],
        head_digest: str,
        announced: Mapping[str, int] | None = None,
    ) -> None:
        """Remember a closed round's task (after a restart), so updates answering it count.

        Args:
            number, selected, head_version, config: the round as recorded.
            head_digest: the digest of the heads its task carried.
            announced: device -> samples its status announced (default: none known).
        """
        round_ = self._new_round(number, selected, config, 0.0)
        round_.head_version, round_.head_digest, round_.closed = head_version, head_digest, True
        round_.announced = dict(announced or {})
        self.tasks[number] = round_
        self._forget_old_tasks()

    def remember_answers(self, stored: Iterable[StoredAnswer]) -> None:
        """Note updates accepted into a closed buffer (after a restart): never counted again."""
        for update in stored:
            trained = int(update.metrics.get("trained_round", -1))
            if trained in self.tasks:
                self.answered[(update.device_id, trained)] = update.sha256

    def _restore_answers(
        self, round_: OpenRound, stored: Iterable[StoredAnswer], rejected: Iterable[StoredRejection]
    ) -> None:
        """Refill the reopened round's buffer (`resume`). Call `remember_task` for the closed
        rounds still within the staleness bound first, so buffered updates that answered them
        are restored with their task."""
        self.tasks[round_.number] = round_
        self.restore_buffer(round_.number, stored)
        for device, code, reason, _sha256 in rejected:
            self.buffer.rejected[code] += 1
            self.buffer.answers[device], self.buffer.reasons[device] = code, reason

    def restore_buffer(self, number: int, stored: Iterable[StoredAnswer]) -> None:
        """Refill the buffer of round `number` with its stored accepted updates (arrival order);
        one that cannot be decoded, or answers a task no longer known, is logged and left out."""
        buffer = self.buffer = Buffer(number)
        for update in stored:
            trained = int(update.metrics.get("trained_round", number))
            task_round = self.tasks.get(trained)
            task = task_round.selected.get(update.device_id, "") if task_round else ""
            delta = decode_stored(number, update, self.heads.get(task))
            if task_round is None or delta is None:
                if task_round is None:
                    log.error("round %d: stored update of %s answers round %d, not known",
                              number, update.device_id, trained)  # fmt: skip
                continue
            buffer.updates[(update.device_id, trained)] = BufferedUpdate(
                delta, update.samples, update.sha256, len(update.payload), dict(update.metrics),
                task_round.selected.get(update.device_id, "default"), trained,
                task_round.head_version,
            )  # fmt: skip
            buffer.answers[update.device_id] = ACCEPTED
            self.answered[(update.device_id, trained)] = update.sha256

    def _forget_old_tasks(self) -> None:
        oldest = self.head_version - self.asynchronous.max_staleness
        for number in [n for n, r in self.tasks.items() if r.head_version < oldest]:
            del self.tasks[number]
        self.answered = {k: v for k, v in self.answered.items() if k[1] in self.tasks}

    # -- updates --

    def _answer_of(self, number: int, device: str) -> str | None:
        # Any round's, not only the open one's: an update is counted once whichever buffer
        # it joined, so a re-delivery after that buffer closed is still REPEATED.
        return self.answered.get((device, number))

    def _repeated(self, number: int, device: str, digest: str, size: int) -> Verdict:
        return Verdict(REPEATED, self.buffer.number, device, sha256=digest, size=size)

    def refuse(
        self, number: int, device: str, code: str, reason: str, size: int, sha256: str = "",
        answers: bool = True,
    ) -> Verdict:  # fmt: skip
        """Count a refused update in the buffer being filled, whatever round it names; as the
        device's answer unless `answers` is False or the code is in NOT_AN_ANSWER.

        Returns:
            A `REJECTED` verdict (async mode has no "late": an old update is "stale").
        """
        self.buffer.rejected[code] += 1
        if answers and code not in NOT_AN_ANSWER and device != "?":
            self.buffer.answers[device], self.buffer.reasons[device] = code, reason
        log.warning("round %d: rejected update from %s: %s: %s", number, device, code, reason)
        return Verdict(REJECTED, self.buffer.number, device, code, reason, size=size,
                       sha256=sha256)  # fmt: skip

    def staleness_of(self, number: int, claimed_version: int | None) -> int:
        """Return how many head versions were made after round `number`'s task.

        Args:
            number: the round the update answers.
            claimed_version: the head version its header names (a compact frame names none),
                used only to say how old an update answering a forgotten round is.

        Raises:
            UpdateRejected: "round-unknown" (no such task yet) or "stale" (beyond the bound,
                its task forgotten for that reason).
        """
        if number > max(self.tasks, default=0):
            raise UpdateRejected("round-unknown", f"round {number} has not started")
        bound = self.asynchronous.max_staleness
        round_ = self.tasks.get(number)
        trained = round_.head_version if round_ is not None else claimed_version
        if trained is None:  # forgotten, so beyond the bound
            raise UpdateRejected("stale", f"update trained on round {number}'s head is more "
                                 f"than {bound} versions old")  # fmt: skip
        staleness = self.head_version - trained
        if round_ is None or staleness > bound:
            raise UpdateRejected(
                "stale",
                f"update trained on round {number}'s head is {staleness} versions old "
                f"(bound {bound})",
            )
        return staleness

    def _admit(self, number: int, device: str, payload: bytes, digest: str) -> Verdict:
        header = read_header(device, number, payload, self._allow)
        check_run(header, self.run_id)
        claimed = header.head_version if isinstance(header, UpdateHeader) else None
        staleness = self.staleness_of(number, claimed)
        round_ = self.tasks[number]
        if device not in round_.selected:
            raise UpdateRejected("not-selected", f"{device} was not selected for round {number}")
        task = round_.selected[device]
        delta = self._checked_delta(header, round_, task, payload)
        metrics = {**header.metrics, "trained_round": float(number), "staleness": float(staleness)}
        buffer = self.buffer
        buffer.updates[(device, number)] = BufferedUpdate(
            delta, header.samples, digest, len(payload), metrics, task, number,
            round_.head_version,
        )  # fmt: skip
        self.answered[(device, number)] = digest
        buffer.answers[device] = ACCEPTED
        buffer.reasons.pop(device, None)
        return Verdict(
            ACCEPTED, buffer.number, device, task=task, samples=header.samples,
            sha256=digest, size=len(payload), metrics=metrics, complete=self.buffer_full,
        )  # fmt: skip

    @property
    def buffer_full(self) -> bool:
        """Whether the buffer holds `AsyncPolicy.buffer` accepted updates (or more: those that
        arrive before the round closes join it)."""
        return len(self.buffer.updates) >= self.asynchronous.buffer

    # -- closing --

    def due(self, now: float) -> bool:
        """Whether the open round should close: its buffer is full, or its deadline passed."""
        round_ = self.round
        return round_ is None or self.buffer_full or now >= round_.deadline

    def close_round(self) -> ClosedRound:
        """Close the open round: aggregate its buffer into the next head version.

        A round whose deadline passed with a partial buffer aggregates what it has; one with
        an empty buffer fails (heads unchanged). The metrics add the buffer's size and the
        mean and largest staleness of its updates. Updates arriving afterwards fill the next
        round's buffer.

        Raises:
            RuntimeError: no round is open.
        """
        round_ = self._closing()
        buffer = self.buffer
        updates = buffer.updates
        wanted = self.asynchronous.buffer
        status = "closed" if updates else "failed"
        reason = "" if len(updates) >= wanted else (
            f"closed at its deadline (or a stop) with {len(updates)} of {wanted} updates buffered"
        )  # fmt: skip
        metrics = update_metrics(updates.values())
        if updates:
            staleness = np.array(
                [self.head_version - u.trained_version for u in updates.values()], np.float64
            )
            clipped, capped = self._aggregate_buffer(updates)
            metrics.update(
                clipped=float(clipped), capped=float(capped), buffer=float(len(updates)),
                staleness_mean=float(staleness.mean()), staleness_max=float(staleness.max()),
            )  # fmt: skip
            self.head_version += 1
        self.buffer = Buffer(round_.number + 1)
        self._forget_old_tasks()
        return ClosedRound(
            round_.number, status, reason, self.head_version, len(round_.selected),
            len(updates), dict(buffer.rejected), 0, round_.online, list(round_.stale), metrics,
            dict(buffer.answers), dict(buffer.reasons),
        )  # fmt: skip

    def _aggregate_buffer(
        self, updates: Mapping[tuple[str, int], BufferedUpdate]
    ) -> tuple[int, int]:
        """Bound, weight by staleness and aggregate each task's buffered updates; return
        (clipped, capped). Sorted by device and round, so the sums never depend on arrival."""
        keyed: dict[str, tuple[str, Weights, int]] = {}
        announced: dict[str, int] = {}
        weights: dict[str, float] = {}
        for (device, trained), update in sorted(updates.items()):
            key = f"{device}@{trained}"
            keyed[key] = (update.task, update.delta, update.samples)
            task_round = self.tasks.get(trained)
            if task_round is not None and device in task_round.announced:
                announced[key] = task_round.announced[device]
            weights[key] = self.weight(self.head_version - update.trained_version)
        self.heads, clipped, capped = aggregate_tasks(
            self.heads, self.strategies, keyed, announced, self.acceptance, weights
        )
        return clipped, capped
