"""The aggregator: runs rounds over MQTT, validates updates, aggregates per task, keeps a record.

The rules of a round (selection, acceptance, quorum, deadline, resume) live in the pure
`edgefl.core.rounds.RoundEngine`; this module is its shell: the MQTT client feeds it statuses
and updates on the network thread, the `AggregatorRecord` keeps what it decides (closing a round
is one transaction), and `run()` loops rounds: wait for devices -> open a round -> publish the
task (retained) -> wait for every answer or the deadline -> close -> store, then publish the
result. Each `run()` has a run ID; retained tasks and results of other runs are cleared.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict

from edgefl.bundle import ModelBundle, load_bundle
from edgefl.core.accounting import PrivacyBudgetSpent, PrivacyLedger, open_round_privacy
from edgefl.core.rounds import (
    ACCEPTED,
    REPEATED,
    ClosedRound,
    OpenRound,
    RoundEngine,
    Verdict,
)
from edgefl.core.strategies import Strategy, build_strategies
from edgefl.data import Dataset
from edgefl.errors import FederationError, MessageError
from edgefl.head import Weights
from edgefl.roles.aggregator_config import AggregatorConfig
from edgefl.roles.record import AggregatorRecord, FaultHook, StoredUpdate
from edgefl.roles.server_eval import ServerEvaluation
from edgefl.roles.summary import (
    FederationSummary,
    RoundSummary,
    summaries_from_record,
    write_heads,
    write_metrics,
)
from edgefl.roles.update_intake import UpdateIntake
from edgefl.security.identity import AggregatorAuth
from edgefl.transport import presence, topics
from edgefl.transport.client import Message, NetworkLoop
from edgefl.transport.connect import open_client
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    decode_round_task,
    encode_round_task,
)
from edgefl.transport.sealed import SealError, strip_seal

__all__ = ["Aggregator", "AggregatorConfig", "FederationSummary", "RoundSummary"]

log = logging.getLogger(__name__)

# Seconds run() waits for the broker before failing: long enough for a broker still starting
# beside it (systemd, docker compose), short enough that a wrong URL fails while someone watches.
CONNECT_TIMEOUT_S = 30.0

RoundCallback = Callable[[RoundSummary], None]
VerdictCallback = Callable[[Verdict], None]


class Aggregator:
    """Runs a federation: `run()` blocks until the last round and returns the summary."""

    def __init__(
        self,
        config: AggregatorConfig,
        network: NetworkLoop | None = None,
        eval_dataset: Dataset | None = None,
        on_round: RoundCallback | None = None,
        fault: FaultHook | None = None,
        on_verdict: VerdictCallback | None = None,
    ) -> None:
        """Load the bundle and state; nothing connects until run().

        Args:
            config: the settings.
            network: a shared network loop (simulation); None gives the aggregator its own.
            eval_dataset: server-side evaluation samples (raw inputs; features via the runtime).
            on_round: called after every round (progress display, simulation).
            fault: passed to the record, called between the steps of closing a round (tests).
            on_verdict: called with every update's verdict, on the network thread (metrics).

        Raises:
            ValueError: an invalid setting.
            BundleError: the bundle cannot be loaded.
            FederationError: the stored state belongs to another fleet or bundle.
        """
        config.check()
        self.config = config
        self.on_round = on_round
        self.on_verdict = on_verdict
        self.auth = config.auth or AggregatorAuth.insecure()
        self.bundle: ModelBundle = load_bundle(config.bundle_dir)
        self.state = AggregatorRecord(config.state_path or ":memory:", fault)
        self._check_state_identity()
        head_version, heads = self._initial_heads()
        strategies = build_strategies(config.strategy, config.strategy_params, heads)
        for task, strategy in strategies.items():
            stored = self.state.strategy_state(task)
            if stored:
                strategy.load_state_dict(stored)
        self.engine = RoundEngine(
            heads, head_version, strategies, self.bundle.digest,
            config.policy, config.settings, config.acceptance,
        )  # fmt: skip
        self.summaries: list[RoundSummary] = []
        self.run_id = ""
        # Every finished round in the record counts, of all runs: they trained the same boards.
        self.ledger = PrivacyLedger.from_rounds(
            config.policy.target_delta, config.policy.target_epsilon,
            self.state.finished_round_sizes(),
        )  # fmt: skip
        self.stopped = ""  # why the run ended before its last round (the privacy budget)
        # Guards the engine: the network thread feeds it, run() opens and closes rounds.
        self._cond = threading.Condition()
        self._task_payload: bytes | None = None  # the open round's task, re-sent on reconnect
        self._stop = threading.Event()
        self._eval: ServerEvaluation | None = None
        if eval_dataset is not None and config.eval_task in self.heads:
            self._eval = ServerEvaluation(self.bundle, eval_dataset)
        self.intake = UpdateIntake(
            lambda: self.engine, self._cond, self.auth,
            lambda: config.acceptance.max_update_bytes, self._record,
        )  # fmt: skip
        self.client = open_client(
            config.broker_url,
            client_id=f"edgefl-{config.fleet}-aggregator",
            network=network,
            max_payload_bytes=config.acceptance.max_update_bytes,
            on_oversized=self.intake.on_oversized,
            tls=config.tls,
        )

    @property
    def heads(self) -> dict[str, Weights]:
        """The current global head of every task."""
        return self.engine.heads

    @property
    def head_version(self) -> int:
        """The current head version (0: the bundle's own heads)."""
        return self.engine.head_version

    @property
    def strategies(self) -> dict[str, Strategy]:
        """The strategy of every task."""
        return self.engine.strategies

    # -- setup --

    def _check_state_identity(self) -> None:
        manifest = self.bundle.manifest
        self.state.claim_identity(json.dumps(
            {"fleet": self.config.fleet, "bundle": manifest.name, "version": manifest.version},
            sort_keys=True,
        ))  # fmt: skip

    def _initial_heads(self) -> tuple[int, dict[str, Weights]]:
        version, heads = self.state.latest_heads()
        if heads:
            return version, heads
        heads = {task: self.bundle.head_weights(task) for task in self.bundle.manifest.heads}
        for task, weights in heads.items():
            self.state.save_head(task, 0, 0, weights)
        return 0, heads

    def evaluate(self, task: str | None = None) -> float | None:
        """Return the accuracy of a task's current global head on the eval set (None: no set)."""
        task = task or self.config.eval_task
        if self._eval is None or task not in self.heads:
            return None
        return self._eval.accuracy(task, self.heads[task])

    # -- presence --

    def device_presence(self, now: float | None = None) -> dict[str, str]:
        """Return "online", "stale" or "offline" for every device that could train this bundle.

        Only devices on the allow-list (if any) that run the bundle's version and declare a task
        it has a head for are listed; `now` defaults to the current Unix time.
        """
        with self._cond:
            return self.engine.device_presence(time.time() if now is None else now)

    def online_devices(self) -> dict[str, DeviceStatus]:
        """Return the devices that can train this bundle now: online with a fresh status."""
        with self._cond:
            return self.engine.online_devices(time.time())

    def stale_devices(self) -> list[str]:
        """Return the eligible devices whose status says online but was not heard in time."""
        with self._cond:
            return self.engine.stale_devices(time.time())

    # -- the run --

    def stop(self) -> None:
        """Ask run() to close the current round now and return."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> FederationSummary:
        """Run rounds up to `policy.rounds` (resuming an open one) and return the summary.

        Raises:
            TransportError: the broker cannot be reached.
            FederationError: fewer than `min_devices` devices came online in time.
        """
        started = time.perf_counter()
        if self.auth.is_insecure:
            log.warning("insecure: tasks and results are not signed, devices are not checked")
        self.run_id = self.state.begin_run(uuid.uuid4().hex)
        with self._cond:
            self.engine.run_id = self.run_id
        fleet = self.config.fleet
        self.client.subscribe(topics.all_statuses(fleet), self._on_status)
        self._subscribe_updates()
        self.client.subscribe(topics.all_tasks(fleet), self._on_retained)
        self.client.subscribe(topics.all_results(fleet), self._on_retained)
        self.client.on_connect(self._on_connect)
        self.client.connect(timeout=CONNECT_TIMEOUT_S)
        try:
            self._write_metrics()  # a restart's files hold every round before it too
            resumed = self._resume()
            first = resumed if resumed is not None else self.state.last_round() + 1
            for number in range(first, self.config.policy.rounds + 1):
                if self._stop.is_set():
                    break
                try:
                    summary = self._run_round(
                        number, resumed=number == resumed, first=not self.summaries
                    )
                except PrivacyBudgetSpent as exc:  # a planned end: the budget is spent
                    self.stopped = str(exc)
                    log.warning("%s", exc)
                    break
                self.summaries.append(summary)
                self._write_metrics()
                if self.on_round is not None:
                    self.on_round(summary)
            if self.config.out_dir is not None:
                write_heads(self.config.out_dir, self.heads)
            if not self._stop.is_set():
                self.state.finish_run(self.run_id)
        finally:
            self.client.close()
        return FederationSummary(
            rounds=self.summaries,
            head_version=self.head_version,
            accuracy=self.evaluate(),
            seconds=time.perf_counter() - started,
            state_path=self.state.path,
            stopped=self.stopped,
        )

    # -- where ingest workers plug in (`edgefl.roles.coordinator`); alone, the aggregator
    # takes every update itself --

    def _subscribe_updates(self) -> None:
        """Subscribe to what brings the verdicts on updates: here, the updates themselves."""
        self.client.subscribe(topics.all_updates(self.config.fleet), self.intake.on_update)

    def _stored_updates(self, number: int) -> list[StoredUpdate]:
        """Return the accepted updates a resumed round restores from the record."""
        return self.state.accepted_updates(number)

    def _announce_round(self, open_round: OpenRound, task: bytes) -> None:
        """Called with the round's task bytes (unsealed) before the task is published."""

    def _gather_round(self, open_round: OpenRound) -> None:
        """Called (without the lock) when the round is due, before it closes."""

    def _write_metrics(self) -> None:
        if self.config.out_dir is not None:
            write_metrics(self.config.out_dir, summaries_from_record(self.state))

    def _resume(self) -> int | None:
        """Reopen the round a previous run left open; return its number (None: none open).

        A round closed just before a crash gets its retained task cleared and its result
        published again, in case the crash came between storing and publishing.
        """
        record = self.state.open_round_record()
        if record is None:
            rounds = self.state.rounds()
            last = rounds[-1] if rounds else None
            if last is not None and last.result and last.result.get("run_id") == self.run_id:
                fleet = self.config.fleet
                self.client.publish(topics.round_task(fleet, last.round), b"", qos=1, retain=True)
                result = RoundResult.decode(json.dumps(last.result).encode())
                topic = topics.round_result(fleet, last.round)
                self.client.publish(topic, self.auth.seal(topic, result.encode()), qos=1,
                                    retain=True)  # fmt: skip
            return None
        stored = self._stored_updates(record.round)
        with self._cond:
            open_round = self.engine.resume(
                record.round, record.selected, record.head_version, record.config, stored,
                time.time(), self.state.rejected_answers(record.round),
            )  # fmt: skip
        log.info("resuming round %d with %d accepted updates", record.round,
                 len(open_round.accepted))  # fmt: skip
        return record.round

    def _wait_for_devices(self, settle: bool) -> None:
        """Wait until `min_devices` are online and, with `settle`, the online set settled
        (`RoundPolicy.settle_s`), at most `wait_devices_s` in all."""
        policy = self.config.policy
        deadline = time.monotonic() + policy.wait_devices_s
        with self._cond:
            # Polled, not only woken by statuses: a device turns stale by time passing alone.
            while True:
                now = time.time()
                ready = self.engine.ready(now)
                if ready and (not settle or self.engine.settled(now)):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    if ready:
                        return  # settling never waits past wait_devices_s
                    stale = self.engine.stale_devices(now)
                    raise FederationError(
                        f"only {len(self.engine.online_devices(now))} of {policy.min_devices} "
                        f"devices needed are online after {policy.wait_devices_s:g} s "
                        f"(fleet {self.config.fleet!r}, bundle v{self.bundle.manifest.version} "
                        f"{self.bundle.digest[:12]})"
                        + (f"; stale (no recent heartbeat): {', '.join(stale)}" if stale else "")
                    )
                self._cond.wait(min(remaining, 0.1 if ready else 0.5))

    def _run_round(self, number: int, resumed: bool, first: bool) -> RoundSummary:
        started = time.perf_counter()
        self.auth.devices.refresh()  # enrollments and revocations made while it ran
        if not resumed:
            self._wait_for_devices(settle=first)
            with self._cond:
                open_round = self.engine.open_round(number, time.time())
                try:
                    self.ledger.check_next(open_round_privacy(open_round))
                except PrivacyBudgetSpent:
                    self.engine.withdraw_round()
                    raise
            self.state.open_round(
                number, open_round.selected, open_round.deadline, open_round.head_version,
                open_round.config,
            )  # fmt: skip
        else:
            assert self.engine.round is not None
            open_round = self.engine.round
        task = open_round.task(self.bundle.manifest.version, time.time())
        task.mac_key = self.auth.mac_public
        task_topic = topics.round_task(self.config.fleet, number)
        with self._cond:
            task_bytes = encode_round_task(task, self.engine.task_heads())
        self._announce_round(open_round, task_bytes)
        payload = self.auth.seal(task_topic, task_bytes)
        with self._cond:
            self._task_payload = payload
        self.client.publish(task_topic, payload, qos=1, retain=True)
        log.info("round %d: %d devices selected of %d online, %d stale", number,
                 len(open_round.selected), open_round.online, len(open_round.stale))  # fmt: skip
        while True:
            with self._cond:
                if self._stop.is_set() or self.engine.due(time.time()):
                    break
                self._cond.wait(min(open_round.deadline - time.time(), 0.25))
            # Outside the engine's lock: updates go on being judged while SQLite writes.
            self.state.flush()
        self._gather_round(open_round)
        with self._cond:
            if resumed:
                # Selected before the restart; right after connecting the statuses had not come.
                self.engine.count_presence(time.time())
            closed = self.engine.close_round()
            self._task_payload = None
            privacy = self.ledger.add(open_round_privacy(open_round))
        if closed.stale:
            log.warning("round %d: stale devices left out (status not refreshed in time): %s",
                        number, ", ".join(closed.stale))  # fmt: skip
        metrics = {**closed.metrics, **privacy}
        return self._finish_round(closed, metrics, time.perf_counter() - started, task_topic)

    def _finish_round(
        self, closed: ClosedRound, round_metrics: dict[str, float], seconds: float, topic: str
    ) -> RoundSummary:
        """Store what closing a round produced (one transaction), then publish it."""
        number = closed.number
        metrics: dict[str, float] = {}
        accuracy = self.evaluate()
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        metrics.update(round_metrics)
        result = RoundResult(
            round=number, status=closed.status, head_version=closed.head_version,
            selected=closed.selected, accepted=closed.accepted, rejected=closed.rejected,
            late=closed.late, metrics=metrics, reason=closed.reason, online=closed.online,
            stale=len(closed.stale), run_id=self.run_id, answers=closed.answers,
            reasons=closed.reasons,
        )  # fmt: skip
        aggregated = closed.status == "closed"
        self.state.close_round(
            number, closed.status,
            {**asdict(result), "seconds": seconds, "stale_devices": closed.stale}, metrics,
            heads=self.heads if aggregated else None, head_version=self.head_version,
            strategy_states={t: s.state_dict() for t, s in self.strategies.items()}
            if aggregated else None,
        )  # fmt: skip
        # Clear the retained task so devices that connect later do not train for a closed round.
        self.client.publish(topic, b"", qos=1, retain=True)
        result_topic = topics.round_result(self.config.fleet, number)
        self.client.publish(result_topic, self.auth.seal(result_topic, result.encode()), qos=1,
                            retain=True)  # fmt: skip
        log.info("round %d %s: %d/%d accepted, head v%d, %s", number, closed.status,
                 closed.accepted, closed.selected, closed.head_version, metrics)  # fmt: skip
        return RoundSummary(
            number, closed.status, closed.head_version, closed.selected, closed.accepted,
            closed.rejected, closed.late, seconds, metrics, closed.online, closed.stale,
        )  # fmt: skip

    # -- network thread --

    def _on_connect(self, _session_present: bool) -> None:
        # A broker restart loses retained messages when it has no persistence: re-publish the
        # open round's task so devices that reconnect see it (they re-send identical updates).
        with self._cond:
            payload = self._task_payload
            number = self.engine.round.number if self.engine.round is not None else 0
        if payload is not None:
            self.client.publish(topics.round_task(self.config.fleet, number), payload, qos=1,
                                retain=True)  # fmt: skip

    def _on_retained(self, message: Message) -> None:
        """Clear a retained task or result that is not this run's (left by an earlier run)."""
        if not message.retain or not message.payload:
            return
        parsed = topics.parse(message.topic)
        payload = strip_seal(message.payload)
        try:
            if parsed is not None and parsed.kind == "task":
                run_id = decode_round_task(payload)[0].run_id
            else:
                run_id = RoundResult.decode(payload).run_id
        except MessageError:
            run_id = None  # not a message of this protocol: nobody's, so cleared too
        if run_id != self.run_id or not self.auth.sealed_by_me(message.topic, message.payload):
            log.info("clearing %s, retained by another run", message.topic)
            self.client.publish(message.topic, b"", qos=1, retain=True)

    def _on_status(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        if parsed is None or parsed.device_id is None or not message.payload:
            return
        try:
            status = DeviceStatus.decode(
                self.auth.open(message.topic, parsed.device_id, message.payload)
            )
        except SealError as exc:
            log.warning("refused status on %s: %s: %s", message.topic, exc.code, exc.reason)
            return
        except MessageError as exc:
            log.warning("ignoring bad status on %s: %s", message.topic, exc)
            return
        if status.device_id != parsed.device_id:
            log.warning("ignoring status on %s claiming device %r", message.topic, status.device_id)
            return
        self.auth.learn_mac_key(status.device_id, status.mac_key)  # its seal checked above
        now = time.time()
        seen = presence.seen_at(status, now, message.retain)
        with self._cond:
            self.engine.observe_status(status, seen, now)
            self._cond.notify_all()

    def _record(self, verdict: Verdict, payload: bytes | None = None) -> None:
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        if verdict.outcome == REPEATED:
            return
        if verdict.outcome == ACCEPTED:
            self.state.record_update(
                verdict.round, verdict.device, verdict.task, ACCEPTED, size=verdict.size,
                samples=verdict.samples, sha256=verdict.sha256, metrics=verdict.metrics,
                payload=payload,
            )  # fmt: skip
        else:
            self.state.record_update(verdict.round, verdict.device, "", verdict.outcome,
                                     verdict.code, verdict.reason, verdict.size,
                                     sha256=verdict.sha256)  # fmt: skip
