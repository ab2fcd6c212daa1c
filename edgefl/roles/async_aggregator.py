"""The asynchronous aggregator (FedBuff): the aggregator's shell around `AsyncRoundEngine`.

Everything but the round rules is the synchronous `edgefl.roles.aggregator.Aggregator`'s: the
MQTT client and its seals (tasks and results sealed, updates and statuses opened with
`self.auth`), the SQLite record (each round a row: a buffer and the head version it made), the
privacy ledger (each buffer counts as a round), the metrics files, the plot and the callbacks.
Its `run()` loops: open round n on the newest head for every eligible online device (task
retained, the previous round's cleared) -> wait until K updates are buffered or the deadline
passes -> aggregate into head version n -> store, publish the result -> open round n + 1.
Updates that arrive meanwhile, answering any round within the staleness bound, fill the next
buffer (`edgefl.core.async_rounds`). After a kill, `run()` rebuilds the rounds still within the
staleness bound and the buffer from the record.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from edgefl.core.async_rounds import AsyncRoundEngine
from edgefl.core.settings import AsyncPolicy
from edgefl.data import Dataset
from edgefl.head import head_digest
from edgefl.roles.aggregator import (
    Aggregator,
    AggregatorConfig,
    FederationSummary,
    RoundCallback,
    VerdictCallback,
)
from edgefl.roles.record import FaultHook
from edgefl.transport.client import NetworkLoop

__all__ = ["AsyncAggregator"]

log = logging.getLogger(__name__)


class AsyncAggregator(Aggregator):
    """Runs a federation in buffered asynchronous rounds; `run()` returns the summary."""

    def __init__(
        self,
        config: AggregatorConfig,
        asynchronous: AsyncPolicy,
        network: NetworkLoop | None = None,
        eval_dataset: Dataset | None = None,
        on_round: RoundCallback | None = None,
        fault: FaultHook | None = None,
        on_verdict: VerdictCallback | None = None,
    ) -> None:
        """Load the bundle and state; nothing connects until run().

        Args:
            config: the aggregator's settings; `policy.rounds` is the number of buffers (head
                versions) to make, `policy.deadline_s` the longest one waits.
            asynchronous: the buffer size, staleness bound and function, and time limit
                (its `mode` is taken as "async").
            network, eval_dataset, on_round, fault, on_verdict: as `Aggregator`.

        Raises:
            ValueError: an invalid setting.
            BundleError: the bundle cannot be loaded.
            FederationError: the stored state belongs to another fleet or bundle.
        """
        asynchronous = dataclasses.replace(asynchronous, mode="async")
        asynchronous.check()
        super().__init__(config, network, eval_dataset, on_round, fault, on_verdict)
        self.asynchronous = asynchronous
        synchronous = self.engine
        self.engine = AsyncRoundEngine(
            synchronous.heads, synchronous.head_version, synchronous.strategies,
            synchronous.bundle_digest, config.policy, config.settings, config.acceptance,
            asynchronous=asynchronous,
        )  # fmt: skip
        self._timed_out = threading.Event()

    def run(self) -> FederationSummary:
        """Make head versions up to `policy.rounds` (resuming an open round), or until the time
        limit, which closes the buffer being filled; return the summary.

        Raises:
            TransportError: the broker cannot be reached.
            FederationError: fewer than `min_devices` devices came online in time.
        """
        limit = self.asynchronous.time_limit_s
        timer = None
        if limit is not None:
            timer = threading.Timer(limit, self._time_up)
            timer.daemon = True
            timer.start()
        try:
            summary = super().run()
        finally:
            if timer is not None:
                timer.cancel()
        if self._timed_out.is_set():
            # A planned end, unlike stop(): the run is over, so the next one is a new run.
            self.state.finish_run(self.run_id)
            self.stopped = f"time limit of {limit:g} s reached"
            summary = dataclasses.replace(summary, stopped=self.stopped)
        return summary

    def _time_up(self) -> None:
        self._timed_out.set()
        self.stop()

    def _resume(self) -> int | None:
        """Remember the closed rounds an update may still answer and the updates their buffers
        took, refill the buffer, then reopen the round left open (if any)."""
        oldest = self.head_version - self.asynchronous.max_staleness
        with self._cond:
            for record in self.state.rounds():
                if record.status == "open" or record.head_version < oldest:
                    continue
                tasks = sorted(set(record.selected.values()))
                try:
                    heads = {task: self.state.head(task, record.head_version) for task in tasks}
                except KeyError:  # a head the record no longer has: its updates are stale
                    continue
                self.engine.remember_task(
                    record.round, record.selected, record.head_version, record.config,
                    head_digest(heads),
                )  # fmt: skip
                self.engine.remember_answers(self.state.accepted_updates(record.round))
            if self.state.open_round_record() is None:
                # Updates buffered after the last close, before the next round was opened.
                following = self.state.last_round() + 1
                self.engine.restore_buffer(following, self.state.accepted_updates(following))
        return super()._resume()

    # The engine attribute is typed by the base class; this narrows it for the methods above.
    engine: AsyncRoundEngine
