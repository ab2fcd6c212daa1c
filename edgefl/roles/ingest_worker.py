"""An ingest worker: judges its share of a round's updates and folds it for the coordinator.

`edgefl aggregate --workers N` starts N of these beside the coordinator; `edgefl
aggregate-worker` starts one on any machine that reaches the broker. Workers share the update
topic through an MQTT shared subscription, so each update reaches one of them. A worker:

1. takes the open round from the retained `ingest/round` (sealed by the fleet key): the task,
   the selection, the device keys and MAC keys; builds a `RoundEngine` holding that round, and
   acknowledges it in its retained status (the coordinator publishes the task only then);
2. judges every update it receives with the aggregator's own code (`UpdateIntake`,
   `RoundEngine.receive`) and sends its verdicts to the coordinator in batches (`ingest/workers/
   {id}/notes`), with each accepted delta's norm;
3. on the coordinator's `close`, closes its round (later updates are late) and says which
   updates it holds; on `fold`, sends the weighted sum of the ones it is asked for, bounded as
   asked (or the deltas themselves, for a robust strategy).

It keeps no state on disk: a worker that dies loses its share of the open round, and a
restarted one starts from the retained round with nothing held.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.core.influence import BoundPlan
from edgefl.core.partial_aggregate import fold_weighted
from edgefl.core.privacy import global_norm
from edgefl.core.round_state import ACCEPTED, REPEATED, Verdict
from edgefl.core.rounds import RoundEngine
from edgefl.core.settings import AcceptancePolicy
from edgefl.core.strategies import FedAvg
from edgefl.errors import MessageError, TransportError
from edgefl.roles.update_intake import UpdateIntake
from edgefl.security.device_registry import REVOKED, DeviceRegistry
from edgefl.security.identity import AggregatorAuth
from edgefl.security.verifiers import STRICT, DeviceVerifier, TrustedSigners
from edgefl.transport import ingest, topics
from edgefl.transport.client import Message, MqttClient, NetworkLoop, Will
from edgefl.transport.messages import decode_round_task
from edgefl.transport.sealed import SealError
from edgefl.transport.tls import TlsSettings

log = logging.getLogger(__name__)

# Seconds a worker waits for its own message through a shared subscription at start.
PROBE_TIMEOUT_S = 5.0


@dataclass
class IngestWorkerConfig:
    """How a worker joins its aggregator.

    Attributes:
        broker_url: `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet name.
        worker_id: unique among the fleet's workers (its client ID and topics).
        key: the fleet's signing key, the aggregator's (None: insecure, nothing sealed).
        tls: the CA file and client certificate for an `mqtts://` broker.
        flush_s: verdicts wait at most this long to be sent in one batch.
        batch: a batch is sent at once when it holds this many verdicts.
    """

    broker_url: str
    fleet: str
    worker_id: str
    key: Ed25519PrivateKey | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)
    flush_s: float = 0.02
    batch: int = 500


class IngestWorker:
    """One ingest worker; see the module docstring. `run_forever()` blocks until `stop()`."""

    def __init__(self, config: IngestWorkerConfig, network: NetworkLoop | None = None) -> None:
        """Configure the worker; nothing connects until start().

        Raises:
            ValueError: an invalid worker ID or fleet.
            TransportError: an invalid broker URL.
        """
        self.config = config
        fleet, worker = config.fleet, config.worker_id
        self.session = uuid.uuid4().hex  # names this process's notes, so a restart is told apart
        registry = DeviceRegistry(":memory:")
        if config.key is None:
            self.auth = AggregatorAuth.insecure()
            self.trusted = TrustedSigners((), insecure=True)
        else:
            self.auth = AggregatorAuth(config.key, DeviceVerifier(registry, STRICT))
            self.trusted = TrustedSigners([config.key.public_key()])
        self._registry = registry
        self._lock = threading.Condition()
        self.engine: RoundEngine | None = None
        self.identity: tuple[str, int, str] | None = None  # (run_id, round, head_digest) held
        self._pending: list[list[Any]] = []
        self._seq = 0
        self._flush_timer: Any = None
        self._stop = threading.Event()
        self.intake = UpdateIntake(
            lambda: self.engine, self._lock, self.auth,
            lambda: self.client.max_payload_bytes, self._note,
        )  # fmt: skip
        self._status_topic = ingest.worker_topic(fleet, worker, "status")
        will = Will(self._status_topic, self._status("offline"), qos=1, retain=True)
        self.client = MqttClient(
            config.broker_url, client_id=f"edgefl-{fleet}-ingest-{worker}", network=network,
            will=will, on_oversized=self.intake.on_oversized, tls=config.tls,
        )  # fmt: skip
        self.client.subscribe(ingest.ingest_round(fleet), self._on_round)
        self.client.subscribe(ingest.ingest_collect(fleet), self._on_collect)
        self._ready = threading.Event()  # set once updates reach it: only then it says online
        self.client.on_connect(lambda _present: self._publish_status())

    # -- life --

    def start(self, timeout: float = 30.0) -> None:
        """Connect and check that the broker delivers shared subscriptions.

        Raises:
            TransportError: the broker cannot be reached in `timeout`, or it does not deliver
                a message through a `$share/...` subscription (amqtt, `edgefl broker`, has none).
        """
        self.client.connect(timeout=timeout)
        self.client.subscribe(ingest.shared_updates(self.config.fleet), self.intake.on_update)
        try:
            # Its SUBSCRIBE follows the updates' on the same connection, so once the probe came
            # back the broker has both: updates reach this worker from now on.
            self._probe_shared(min(timeout, PROBE_TIMEOUT_S))
        except TransportError:
            self.client.close()
            raise
        self._ready.set()
        self._publish_status()  # online, and holding the retained round if one came

    def _probe_shared(self, timeout: float) -> None:
        """Send a message to itself through a shared subscription; wait until it arrives."""
        fleet, worker = self.config.fleet, self.config.worker_id
        topic = ingest.worker_topic(fleet, worker, "probe")
        arrived = threading.Event()
        token = uuid.uuid4().hex.encode()

        def on_probe(message: Message) -> None:
            if message.payload == token:
                arrived.set()

        shared = f"{topics.SHARED_PREFIX}edgefl-probe-{worker}/{topic}"
        self.client.subscribe(shared, on_probe, qos=1)
        deadline = time.monotonic() + timeout
        while not arrived.is_set() and time.monotonic() < deadline:
            self.client.publish(topic, token, qos=1)  # again: the SUBSCRIBE may not be in yet
            arrived.wait(0.2)
        self.client.unsubscribe(shared)
        if not arrived.is_set():
            raise TransportError(
                f"the broker at {self.client.address.url} delivered nothing through an MQTT "
                f"shared subscription ($share/...) in {timeout:g} s: ingest workers need a broker "
                "that has them (Mosquitto >= 1.6, EMQX, HiveMQ, VerneMQ); the embedded `edgefl "
                "broker` (amqtt) has none"
            )

    def stop(self) -> None:
        """Ask run_forever() to return."""
        self._stop.set()

    def run_forever(self, timeout: float = 30.0) -> None:
        """Connect, work until stop(), then say offline and disconnect."""
        self.start(timeout)
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.close()

    def close(self) -> None:
        """Send what is pending, say offline (retained) and disconnect."""
        self._flush()
        self.client.publish(self._status_topic, self._status("offline"), qos=1, retain=True)
        self.client.close()

    def _status(self, state: str) -> bytes:
        run_id, number, digest = self.identity or ("", 0, "")
        status = ingest.WorkerStatus(
            self.config.worker_id, state, run_id, number, digest, time.time()
        )
        return self.auth.seal(self._status_topic, status.encode())

    def _publish_status(self) -> None:
        if not self._ready.is_set():
            return
        with self._lock:
            payload = self._status("online")
        self.client.publish(self._status_topic, payload, qos=1, retain=True)

    def _open(self, message: Message) -> bytes | None:
        try:
            return self.trusted.open(message.topic, message.payload)
        except SealError as exc:
            log.warning("refused %s: %s: %s", message.topic, exc.code, exc.reason)
            return None

    # -- the round --

    def _on_round(self, message: Message) -> None:
        if not message.payload:
            return
        payload = self._open(message)
        if payload is None:
            return
        try:
            announced = ingest.IngestRound.decode(payload)
            task, heads = decode_round_task(announced.task_bytes())
        except MessageError as exc:
            log.warning("ignoring bad ingest round: %s", exc)
            return
        identity = (announced.run_id, announced.round, announced.head_digest)
        if (task.run_id, task.round, task.head_digest) != identity:
            log.warning("ignoring ingest round %d: its task names another round", task.round)
            return
        self._flush()  # the previous round's verdicts go first
        with self._lock:
            if identity == self.identity:
                self._replay()  # a restarted coordinator: it learns again what this holds
            else:
                self._learn_devices(announced)
                engine = RoundEngine(
                    heads, task.head_version, {name: FedAvg() for name in heads},
                    task.bundle_digest,
                    acceptance=AcceptancePolicy(
                        max_update_bytes=announced.max_update_bytes, max_norm=announced.max_norm,
                        allow=tuple(announced.allow) if announced.allow is not None else None,
                    ),
                    run_id=task.run_id,
                )  # fmt: skip
                held = engine.resume(task.round, announced.selected, task.head_version,
                                     task.config, [], time.time())  # fmt: skip
                if held.head_digest != task.head_digest:
                    log.error("ingest round %d: heads do not hash to its digest", task.round)
                    return
                self.engine, self.identity = engine, identity
                self.client.max_payload_bytes = announced.max_update_bytes
        self._flush()
        self._publish_status()  # the acknowledgement the coordinator waits for
        log.info("%s holds round %d", self.config.worker_id, task.round)

    def _learn_devices(self, announced: ingest.IngestRound) -> None:
        """Know the devices' keys and MAC keys as the coordinator does (it checked statuses)."""
        if self.config.key is None:
            return
        for device, entry in announced.devices.items():
            key_hex, state, mac_key = [*entry, "", "", ""][:3]
            try:
                if key_hex:
                    self._registry.enroll(device, bytes.fromhex(key_hex))
                    if state == REVOKED:
                        self._registry.revoke(device)
            except ValueError as exc:
                log.warning("ingest round: bad key for %s: %s", device, exc)
                continue
            self.auth.learn_mac_key(device, mac_key)
        self.auth.devices.refresh()

    def _replay(self) -> None:
        """Note again every accepted update held (a coordinator restarted mid-round)."""
        round_ = self.engine.round if self.engine is not None else None
        if round_ is None or round_.closed:
            return  # after a close the coordinator has them (or counted them lost)
        for device, update in round_.accepted.items():
            verdict = Verdict(ACCEPTED, round_.number, device, task=round_.selected[device],
                              samples=update.samples, sha256=update.sha256, size=update.size,
                              metrics=update.metrics)  # fmt: skip
            self._note(verdict, None)

    # -- verdicts --

    def _note(self, verdict: Verdict, _payload: bytes | None) -> None:
        """Queue a verdict for the coordinator (called under the lock)."""
        if verdict.outcome == REPEATED:
            return
        norm = 0.0
        round_ = self.engine.round if self.engine is not None else None
        if verdict.outcome == ACCEPTED and round_ is not None:
            norm = global_norm(round_.accepted[verdict.device].delta)
        self._pending.append([
            verdict.outcome, verdict.round, verdict.device, verdict.code, verdict.reason,
            verdict.task, verdict.samples, verdict.sha256, verdict.size, verdict.metrics, norm,
        ])  # fmt: skip
        if len(self._pending) >= self.config.batch:
            self.client.network.call_soon(self._flush)
        elif self._flush_timer is None:
            self._flush_timer = self.client.network.call_later(self.config.flush_s, self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._flush_timer = None
            if not self._pending:
                return
            run_id = self.identity[0] if self.identity else ""
            self._seq += 1
            batch = ingest.VerdictNotes(self.config.worker_id, run_id, self._pending,
                                        self.session, self._seq)  # fmt: skip
            self._pending = []
            topic = ingest.worker_topic(self.config.fleet, self.config.worker_id, "notes")
            # Published under the lock, so batches leave in the order of their sequence numbers.
            self.client.publish(topic, self.auth.seal(topic, batch.encode()), qos=1)

    # -- close and fold --

    def _on_collect(self, message: Message) -> None:
        payload = self._open(message)
        if payload is None:
            return
        try:
            request = ingest.Collect.decode(payload)
        except MessageError as exc:
            log.warning("ignoring bad collect request: %s", exc)
            return
        if request.phase == "close":
            with self._lock:
                if self._holds(request) and self.engine is not None and self.engine.round:
                    self.engine.round.closed = True  # later updates are late
        self._flush()  # every verdict reached so far goes before the reply
        with self._lock:
            header, tensors = self._reply(request)
        topic = ingest.worker_topic(self.config.fleet, self.config.worker_id, "partial")
        for part in ingest.split_partial(header, tensors):
            self.client.publish(topic, self.auth.seal(topic, ingest.encode_partial(*part)), qos=1)

    def _holds(self, request: ingest.Collect) -> bool:
        return self.identity == (request.run_id, request.round, request.head_digest)

    def _reply(self, request: ingest.Collect) -> tuple[ingest.PartialHeader, dict[str, np.ndarray]]:
        """Build the reply to `request` (called under the lock)."""
        header = ingest.PartialHeader(
            self.config.worker_id, request.run_id, request.round, request.head_digest,
            request.collect_id, request.phase, session=self.session, notes_seq=self._seq,
        )  # fmt: skip
        round_ = self.engine.round if self.engine is not None and self._holds(request) else None
        accepted = round_.accepted if round_ is not None else {}
        tensors: dict[str, np.ndarray] = {}
        if request.phase == "close":
            header.devices = sorted(accepted)
            header.sha256 = [accepted[d].sha256 for d in header.devices]
            return header, tensors
        try:
            wanted = request.take_of(self.config.worker_id)
        except MessageError as exc:
            log.warning("ignoring what collect %s asks: %s", request.collect_id, exc)
            wanted = {}
        header.missing = sorted(d for d in wanted if d not in accepted)
        header.devices = sorted(d for d in wanted if d in accepted)
        if request.gather:
            for index, device in enumerate(header.devices):
                for name, values in accepted[device].delta.items():
                    tensors[f"delta/{index}/{name}"] = np.ascontiguousarray(values)
            return header, tensors
        assert round_ is not None or not header.devices
        by_task: dict[str, list[tuple[dict[str, np.ndarray], BoundPlan]]] = {}
        for device in header.devices:
            weight, clip_to = wanted[device]
            plan = BoundPlan(weight, clip_to)
            task = round_.selected[device] if round_ is not None else ""
            by_task.setdefault(task, []).append((accepted[device].delta, plan))
        for task, updates in by_task.items():
            part = fold_weighted(updates)
            if part is None:
                continue
            header.weights[task] = part.weight
            for name, values in part.total.items():
                tensors[f"sum/{task}/{name}"] = values
        return header, tensors
