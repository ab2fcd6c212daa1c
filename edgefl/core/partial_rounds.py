"""The round engine of a coordinator whose updates are judged by ingest workers.

`RoundEngine` judges update bytes itself. With `aggregate --workers N` the workers judge them
(the same `RoundEngine.receive`, on their share) and send verdict notes; `PartialRoundEngine`
keeps every other rule of the round (selection, answers, quorum, deadline, close, results) and
takes the notes in place of the bytes: it counts each device's answer once, whichever worker
judged it, and remembers which worker holds each accepted delta. At close it plans how each held
update is bounded (`edgefl.core.influence.plan_bounds`, from claimed samples and norms), and
aggregates from the workers' partial sums (weighted-sum strategies) or their gathered deltas
(robust ones). An accepted update whose worker never delivered it is lost: not aggregated, and
counted under the code `worker-lost`. Pure: no threads, no MQTT, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from edgefl.core.influence import BoundPlan, InfluenceBound, plan_bounds
from edgefl.core.partial_aggregate import PartialSum, combine_sums, mean_delta
from edgefl.core.round_state import ACCEPTED, LATE, REPEATED, AcceptedUpdate, OpenRound, Verdict
from edgefl.core.rounds import RoundEngine
from edgefl.head import Weights

__all__ = ["WORKER_LOST", "PartialRoundEngine"]

# The answer of a device whose accepted update was held by a worker that never delivered it.
WORKER_LOST = "worker-lost"


class PartialRoundEngine(RoundEngine):
    """`RoundEngine` fed verdict notes and partial aggregates; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Take `RoundEngine`'s arguments."""
        super().__init__(*args, **kwargs)
        self.held: dict[str, tuple[str, float]] = {}  # device -> (worker, its delta's norm)
        self.plans: dict[str, BoundPlan] = {}
        self._sums: dict[str, list[PartialSum]] = {}

    @property
    def weighted_sum(self) -> bool:
        """Whether every task's strategy aggregates a weighted sum (workers fold, not gather)."""
        return all(strategy.weighted_sum for strategy in self.strategies.values())

    def open_round(self, number: int, now: float) -> OpenRound:
        """Open a round as `RoundEngine.open_round` does, holding nothing yet."""
        self._forget()
        return super().open_round(number, now)

    def resume(self, *args: Any, **kwargs: Any) -> OpenRound:
        """Reopen a round as `RoundEngine.resume` does; its accepted deltas come back from the
        workers' notes (a worker that still holds the round sends them again)."""
        self._forget()
        return super().resume(*args, **kwargs)

    def _forget(self) -> None:
        self.held, self.plans, self._sums = {}, {}, {}

    def note(self, worker: str, row: Mapping[str, Any], sealed: bool) -> Verdict | None:
        """Take one verdict a worker reached (a `VerdictNotes` row).

        Args:
            worker: the worker that judged it.
            row: the note (`edgefl.transport.ingest.NOTE_FIELDS`).
            sealed: the fleet checks seals, so an oversized update (dropped unread) cannot be
                attributed to the device it names and is not its answer.

        Returns:
            The verdict to record; None when it changes nothing (the same bytes judged again
            by another worker after a re-delivery, or sent again after a restart).
        """
        number, device, sha256 = int(row["round"]), str(row["device"]), str(row["sha256"])
        outcome, size = str(row["outcome"]), int(row["size"])
        round_ = self.round
        open_ = round_ is not None and not round_.closed and number == round_.number
        if outcome == REPEATED:
            return None
        if open_ and sha256:
            assert round_ is not None
            previous = round_.answered.get(device)
            if previous == sha256:
                return None
            if previous is not None and outcome == ACCEPTED:
                reason = f"{device} already answered round {number}"
                return self.refuse(number, device, "duplicate", reason, size, sha256)
        if outcome != ACCEPTED:
            code = "round-closed" if outcome == LATE else str(row["code"])
            answers = not (sealed and code == "oversized")
            return self.refuse(number, device, code, str(row["reason"]), size, sha256, answers)
        if not open_:
            reason = f"round {number} is closed"
            return self.refuse(number, device, "round-closed", reason, size, sha256, False)
        assert round_ is not None
        samples, metrics = int(row["samples"]), dict(row["metrics"])
        round_.accepted[device] = AcceptedUpdate({}, samples, sha256, size, metrics)
        round_.answered[device] = sha256
        round_.answers[device] = ACCEPTED
        self.held[device] = (worker, float(row["norm"]))
        return Verdict(
            ACCEPTED, number, device, task=str(row["task"]), samples=samples, sha256=sha256,
            size=size, metrics=metrics, complete=round_.complete,
        )  # fmt: skip

    def holders(self) -> dict[str, list[str]]:
        """Return worker -> the devices whose accepted update it holds (open round)."""
        by_worker: dict[str, list[str]] = {}
        for device, (worker, _) in sorted(self.held.items()):
            by_worker.setdefault(worker, []).append(device)
        return by_worker

    def lose(self, devices: Iterable[str], why: str) -> list[str]:
        """Drop accepted updates whose worker did not deliver them; return those dropped.

        Each becomes its device's answer `worker-lost` (with `why`), counted in the round.
        """
        round_ = self.round
        lost = []
        for device in devices:
            if round_ is None or device not in round_.accepted:
                continue
            del round_.accepted[device]
            self.held.pop(device, None)
            round_.answers[device], round_.reasons[device] = WORKER_LOST, why
            round_.rejected[WORKER_LOST] += 1
            lost.append(device)
        return sorted(lost)

    def plan_fold(self) -> dict[str, dict[str, list[float | None]]]:
        """Return, per worker, each held device's [weight, norm bound or None] to fold.

        The bounds are those `close_round` would apply (medians over all of the round's
        accepted updates of a task); the claims are the notes' samples and norms.
        """
        round_ = self.round
        if round_ is None:
            return {}
        acceptance = self.acceptance
        bound = InfluenceBound(acceptance.influence_factor or None, acceptance.max_samples)
        self.plans = {}
        for task in sorted(set(round_.selected.values())):
            claims = {
                device: (update.samples, self.held[device][1])
                for device, update in sorted(round_.accepted.items())
                if round_.selected[device] == task and device in self.held
            }
            self.plans.update(plan_bounds(claims, round_.announced, bound))
        take: dict[str, dict[str, list[float | None]]] = {}
        for device, plan in self.plans.items():
            take.setdefault(self.held[device][0], {})[device] = [float(plan.samples), plan.clip_to]
        return take

    def take_sums(self, sums: Mapping[str, PartialSum]) -> None:
        """Add one worker's partial sums (task -> sum) to what the close aggregates."""
        for task, part in sums.items():
            self._sums.setdefault(task, []).append(part)

    def take_deltas(self, deltas: Mapping[str, Weights]) -> None:
        """Give held accepted updates their deltas (a gathering worker's reply)."""
        round_ = self.round
        for device, delta in deltas.items():
            if round_ is not None and device in round_.accepted:
                round_.accepted[device].delta = dict(delta)

    def _aggregate(self, round_: OpenRound) -> tuple[int, int]:
        """Aggregate from partial sums (weighted-sum strategies) or from the gathered deltas."""
        if not self.weighted_sum:
            return super()._aggregate(round_)
        heads = dict(self.heads)
        for task, parts in sorted(self._sums.items()):
            combined = combine_sums(parts)
            if combined is None or combined.weight <= 0:
                continue
            # The strategy sees one update of weight 1: the mean its weighted mean would be.
            mean = mean_delta(combined, heads[task])
            heads[task] = self.strategies[task].aggregate(heads[task], [(mean, 1)])
        self.heads = heads
        plans = [self.plans[d] for d in round_.accepted if d in self.plans]
        clipped = sum(plan.clipped_norm is not None for plan in plans)
        capped = sum(plan.capped_samples is not None for plan in plans)
        return clipped, capped
