"""The coordinator: an aggregator whose updates are taken by ingest workers.

`edgefl aggregate --workers N`. The coordinator is the `Aggregator` (statuses, selection, tasks,
deadline, results, the SQLite record, the privacy ledger, the server optimizer) with its update
intake handed to workers (`edgefl.roles.ingest_worker`) that share the update topic through an
MQTT shared subscription. Per round (docs/protocol.md, "Ingest workers"):

1. before the task goes out, it publishes the round on `ingest/round` (retained, sealed) and
   waits until every online worker's status acknowledges it, so no update meets a worker that
   does not know its round;
2. it takes the workers' verdict notes into a `PartialRoundEngine` and records each as the
   aggregator records a verdict, so the round closes early when every selected device answered;
3. when the round is due it asks the workers to `close` (each says what it holds, after its
   last notes), plans each held update's influence bound, asks them to `fold`, and aggregates
   the partial sums (or the gathered deltas of a robust strategy). A worker that does not
   answer within `collect_timeout_s`, or whose will says it went offline, loses only its share:
   those updates count as `worker-lost` and the round closes without them.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from edgefl.core.partial_aggregate import PartialSum
from edgefl.core.partial_rounds import WORKER_LOST, PartialRoundEngine
from edgefl.core.round_state import REJECTED, OpenRound
from edgefl.errors import FederationError, MessageError
from edgefl.roles.aggregator import Aggregator
from edgefl.roles.record import StoredUpdate
from edgefl.security.verifiers import TrustedSigners
from edgefl.transport import ingest
from edgefl.transport.client import Message
from edgefl.transport.sealed import SealError

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

# Seconds a round waits for the workers to acknowledge it, and for each phase of a close:
# long enough for a loaded machine, short enough that a dead worker costs little of a round.
DEFAULT_COLLECT_TIMEOUT_S = 10.0


class Coordinator(Aggregator):
    """An `Aggregator` fed by ingest workers; see the module docstring."""

    def __init__(
        self, *args: Any, workers: int = 1,
        collect_timeout_s: float = DEFAULT_COLLECT_TIMEOUT_S, **kwargs: Any,
    ) -> None:  # fmt: skip
        """Take `Aggregator`'s arguments, and:

        Args:
            workers: how many workers must be online before the first round.
            collect_timeout_s: how long an acknowledgement or a close phase waits for a worker.

        Raises:
            ValueError: workers < 1 or a timeout that is not positive; see `Aggregator`.
        """
        if workers < 1:
            raise ValueError("a coordinator needs at least one ingest worker")
        if not collect_timeout_s > 0:
            raise ValueError("collect_timeout_s must be positive")
        super().__init__(*args, **kwargs)
        self.expected_workers = workers
        self.collect_timeout_s = collect_timeout_s
        old = self.engine
        self.engine = PartialRoundEngine(
            old.heads, old.head_version, old.strategies, old.bundle_digest,
            old.policy, old.settings, old.acceptance,
        )  # fmt: skip
        key = self.auth.key
        self._trusted = (
            TrustedSigners([key.public_key()]) if key else TrustedSigners((), insecure=True)
        )
        self.workers: dict[str, ingest.WorkerStatus] = {}
        self._seqs: dict[tuple[str, str], int] = {}  # (worker, session) -> last batch taken
        # worker -> part -> the reply's part, for the pending collect request
        self._replies: dict[str, dict[int, tuple[ingest.PartialHeader, dict[str, Any]]]] = {}
        self._collect_id = ""
        self._resumed: set[tuple[str, str]] = set()  # (device, sha256) already recorded
        self.lost: list[str] = []  # devices whose update a worker lost, in the last round
        self.refused: Counter[str] = Counter()  # worker messages refused, by code

    # The engine attribute is typed by the base class; this narrows it for the methods here.
    engine: PartialRoundEngine

    # -- hooks of the aggregator --

    def _subscribe_updates(self) -> None:
        self.client.subscribe(ingest.all_worker_topics(self.config.fleet), self._on_worker)

    def _stored_updates(self, number: int) -> list[StoredUpdate]:
        # Their deltas are held by the workers, which note them again when the round is
        # re-announced; the record keeps no payload for them.
        self._resumed = {(u.device_id, u.sha256) for u in self.state.accepted_updates(number)}
        return []

    def _announce_round(self, open_round: OpenRound, task: bytes) -> None:
        # The first round waits for every expected worker; later ones go on with those left
        # (a dead worker lost its share; the round must not wait for it), at least one.
        needed = 1 if self.summaries else self.expected_workers
        wait_s = self.config.policy.wait_devices_s
        if not self._wait_for(lambda: len(self._online()) >= needed, wait_s):
            raise FederationError(
                f"only {len(self._online())} of {needed} ingest workers are online after "
                f"{wait_s:g} s (fleet {self.config.fleet!r})"
            )
        if len(self._online()) < self.expected_workers:
            log.warning("round %d: %d of %d ingest workers online", open_round.number,
                        len(self._online()), self.expected_workers)  # fmt: skip
        identity = (self.run_id, open_round.number, open_round.head_digest)
        with self._cond:
            announced = ingest.IngestRound(
                self.run_id, open_round.number, open_round.head_digest,
                _base64(task), dict(open_round.selected), self._device_keys(),
                self.config.acceptance.max_norm,
                list(self.config.acceptance.allow) if self.config.acceptance.allow else None,
                self.config.acceptance.max_update_bytes,
            )  # fmt: skip
        topic = ingest.ingest_round(self.config.fleet)
        self.client.publish(topic, self.auth.seal(topic, announced.encode()), qos=1, retain=True)

        def acknowledged() -> bool:
            return all(_holds(s) == identity for s in self._online().values())

        if not self._wait_for(acknowledged, self.collect_timeout_s):
            late = sorted(w for w, s in self._online().items() if _holds(s) != identity)
            log.warning("round %d: workers %s did not acknowledge it in %g s", open_round.number,
                        ", ".join(late), self.collect_timeout_s)  # fmt: skip

    def _gather_round(self, open_round: OpenRound) -> None:
        closed = self._collect(open_round, "close", {}, False)
        with self._cond:
            lost: list[str] = []
            for worker, devices in self.engine.holders().items():
                reply = closed.get(worker)
                held = set(reply[0].devices) if reply is not None else set()
                why = f"ingest worker {worker} " + (
                    "did not answer the close" if reply is None else "no longer holds it"
                )
                lost += self.engine.lose([d for d in devices if d not in held], why)
            gather = not self.engine.weighted_sum
            take = self.engine.plan_fold()
        folded = self._collect(open_round, "fold", take, gather)
        with self._cond:
            for worker, devices in self.engine.holders().items():
                reply = folded.get(worker)
                if reply is None:
                    why = f"ingest worker {worker} sent no partial"
                    lost += self.engine.lose(devices, why)
                    continue
                header, tensors = reply
                covered = set(header.devices)
                if gather:
                    deltas = ingest.gathered_deltas(header, tensors)
                    self.engine.take_deltas(deltas)
                    covered &= set(deltas)
                else:
                    sums = ingest.sums_by_task(tensors)
                    self.engine.take_sums({task: PartialSum(sums.get(task, {}), weight)
                                           for task, weight in header.weights.items()})  # fmt: skip
                # Missing from its reply: restarted, or accepted after the plan (a slow close).
                why = f"ingest worker {worker} did not deliver it"
                lost += self.engine.lose([d for d in devices if d not in covered], why)
        self.lost = lost
        if lost:
            log.warning("round %d: %d accepted updates lost with their ingest worker: %s",
                        open_round.number, len(lost), ", ".join(lost))  # fmt: skip
        for device in lost:
            # Beside its "accepted" row: the record's counts (metrics files) show the loss too.
            reason = open_round.reasons.get(device, "")
            self.state.record_update(open_round.number, device, "", REJECTED, WORKER_LOST, reason)

    # -- talking to workers --

    def _collect(
        self, open_round: OpenRound, phase: str, take: dict[str, Any], gather: bool
    ) -> dict[str, tuple[ingest.PartialHeader, dict[str, Any]]]:
        """Send one collect request; return the replies of the workers that answered in time
        (each after the notes it sent before it)."""
        collect_id = uuid.uuid4().hex
        with self._cond:
            self._collect_id, self._replies = collect_id, {}
            asked = set(self._online()) | set(self.engine.holders())
        request = ingest.Collect(self.run_id, open_round.number, open_round.head_digest,
                                 collect_id, phase, take, gather)  # fmt: skip
        topic = ingest.ingest_collect(self.config.fleet)
        self.client.publish(topic, self.auth.seal(topic, request.encode()), qos=1)

        def answered() -> bool:
            online = set(self._online())
            return all(self._complete(w) for w in asked if w in online)

        self._wait_for(answered, self.collect_timeout_s)
        with self._cond:
            self._collect_id = ""
            return {w: ingest.merge_parts([parts[i] for i in sorted(parts)])
                    for w, parts in self._replies.items() if self._complete(w)}  # fmt: skip

    def _complete(self, worker: str) -> bool:
        """Whether every part of `worker`'s reply came, after the notes it sent before it."""
        parts = self._replies.get(worker, {})
        first = next(iter(parts.values()), None)
        return first is not None and len(parts) == first[0].parts and self._caught_up(first[0])

    def _caught_up(self, header: ingest.PartialHeader) -> bool:
        """Whether every notes batch the worker sent before this reply was taken."""
        return self._seqs.get((header.worker, header.session), 0) >= header.notes_seq

    def _wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait (under the lock, woken by worker messages) until `done()`; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._cond.wait(min(remaining, 0.25))
        return True

    def _online(self) -> dict[str, ingest.WorkerStatus]:
        return {w: s for w, s in self.workers.items() if s.state == "online"}

    def _device_keys(self) -> dict[str, list[str]]:
        """Every device's [key hex, registry state, verified status's mac_key] for workers."""
        keys: dict[str, list[str]] = {}
        registry = self.auth.devices.registry
        for entry in registry.all() if registry is not None else []:
            keys[entry.device_id] = [entry.public_key.hex(), entry.state, ""]
        for device, status in self.engine.statuses.items():
            keys.setdefault(device, ["", "", ""])[2] = status.mac_key
        return keys

    def _on_worker(self, message: Message) -> None:
        parsed = ingest.parse_worker_topic(self.config.fleet, message.topic)
        if parsed is None or not message.payload:
            return
        worker, kind = parsed
        if kind == "probe":
            return  # a worker checking the broker's shared subscriptions
        try:
            payload = self._trusted.open(message.topic, message.payload)
            if kind == "status":
                self._on_worker_status(worker, ingest.WorkerStatus.decode(payload))
            elif kind == "notes":
                self._on_notes(worker, ingest.VerdictNotes.decode(payload))
            elif kind == "partial":
                self._on_partial(worker, *ingest.decode_partial(payload))
        except SealError as exc:
            self.refused[exc.code] += 1
            log.warning("refused %s: %s: %s", message.topic, exc.code, exc.reason)
        except MessageError as exc:
            log.warning("ignoring bad message on %s: %s", message.topic, exc)

    def _on_worker_status(self, worker: str, status: ingest.WorkerStatus) -> None:
        if status.worker != worker:
            log.warning("ignoring status of worker %r on %s's topic", status.worker, worker)
            return
        with self._cond:
            self.workers[worker] = status
            self._cond.notify_all()

    def _on_notes(self, worker: str, batch: ingest.VerdictNotes) -> None:
        if batch.worker != worker or batch.run_id != self.run_id:
            return  # another run's verdicts (a worker still holding its round): not this one's
        rows = batch.rows()
        sealed = not self.auth.is_insecure
        with self._cond:
            for row in rows:
                if (row["device"], row["sha256"]) in self._resumed:
                    self._resumed.discard((row["device"], row["sha256"]))
                    self.engine.note(worker, row, sealed)  # recorded before the restart
                    continue
                verdict = self.engine.note(worker, row, sealed)
                if verdict is not None:
                    # Recorded without its bytes (they stay on the worker): an empty payload.
                    self._record(verdict, b"")
                    if verdict.complete:
                        self._cond.notify_all()
            key = (worker, batch.session)
            self._seqs[key] = max(self._seqs.get(key, 0), batch.seq)
            if self._collect_id:
                self._cond.notify_all()  # a reply may have been waiting for these notes

    def _on_partial(
        self, worker: str, header: ingest.PartialHeader, tensors: dict[str, Any]
    ) -> None:
        with self._cond:
            if header.worker != worker or header.collect_id != self._collect_id:
                log.info("ignoring a stale reply of worker %s (round %d)", worker, header.round)
                return
            round_ = self.engine.round
            if round_ is None or (header.run_id, header.round, header.head_digest) != (
                self.run_id,
                round_.number,
                round_.head_digest,
            ):
                log.warning("ignoring worker %s's reply naming another round", worker)
                return
            if not 0 <= header.part < header.parts:
                log.warning("ignoring worker %s's reply part %d of %d", worker, header.part,
                            header.parts)  # fmt: skip
                return
            self._replies.setdefault(worker, {})[header.part] = (header, tensors)
            self._cond.notify_all()


def _holds(status: ingest.WorkerStatus) -> tuple[str, int, str]:
    return (status.run_id, status.round, status.head_digest)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
