"""The aggregator: runs rounds over MQTT, validates updates, aggregates per task, keeps a record.

A round: select online devices running the bundle's version (online: a fresh status, see
edgefl.transport.presence) -> publish the task (retained) -> collect updates until every
selected device answered or the deadline passed -> aggregate the accepted ones per task with the
strategy (pure core code) -> store the new head version, metrics and result. Updates are
validated on the network thread as they arrive; nothing a device sends can crash the aggregator,
and every rejection is recorded with its code and reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.bundle import ModelBundle, encode_head, load_bundle
from edgefl.core.codecs import CODEC_NAMES, decode_delta
from edgefl.core.strategies import STRATEGY_NAMES, Strategy, make_strategy
from edgefl.core.validation import UpdateRejected, validate_delta
from edgefl.data import Dataset, conform
from edgefl.errors import FederationError, MessageError
from edgefl.head import Weights, head_accuracy
from edgefl.roles.features import FeatureCache, shared_backbone
from edgefl.roles.record import AggregatorRecord
from edgefl.transport import presence, topics
from edgefl.transport.client import Message, MqttClient, NetworkLoop
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    RoundTask,
    encode_round_task,
    read_update_header,
)

log = logging.getLogger(__name__)

# Seconds run() waits for the broker before failing: long enough for a broker still starting
# beside it (systemd, docker compose), short enough that a wrong URL fails while someone watches.
CONNECT_TIMEOUT_S = 30.0


@dataclass
class AggregatorConfig:
    """How the aggregator runs a federation.

    Attributes:
        broker_url: `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet name.
        bundle_dir: the bundle whose heads are federated.
        rounds: the last round number to run (a resumed run continues up to it).
        strategy: one of edgefl.core.strategies.STRATEGY_NAMES; `strategy_params` its arguments.
        fraction: share of online devices selected per round (at least `min_devices`).
        min_devices: devices that must be online before a round starts.
        stale_after_s: a device whose status was not heard for this long is "stale" and not
            selected (None: `presence.STALE_HEARTBEATS` × the heartbeat interval it announces;
            devices announcing no heartbeat then count as online while their status says so).
        deadline_s: seconds a round waits for updates.
        quorum: share of selected devices whose accepted updates a round needs to aggregate;
            below it the round fails and the head stays as it was.
        wait_devices_s: how long to wait for `min_devices` online before giving up.
        epochs, lr, batch_size, weight_decay, seed: the local training settings sent in tasks.
        codec: update codec devices must use ("float32", "int8", "topk"); `topk_fraction`.
        max_update_bytes: larger updates are rejected unread ("oversized").
        max_norm: reject updates whose delta L2 norm exceeds it (None: no bound).
        clip_norm: devices clip their delta to this L2 norm before sending (None: no clip).
        noise_multiplier: devices add Gaussian noise of std noise_multiplier * clip_norm to the
            clipped delta (DP-FedAvg); needs clip_norm.
        allow: the fleet allow-list of device IDs (None: any device).
        eval_task: the task whose head is evaluated on `eval_dataset`.
        state_path: the SQLite file (None: in memory).
        out_dir: where metrics.csv/json and the final heads are written (None: nowhere).
    """

    broker_url: str
    fleet: str
    bundle_dir: Path
    rounds: int = 10
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    fraction: float = 1.0
    min_devices: int = 1
    stale_after_s: float | None = None
    deadline_s: float = 60.0
    quorum: float = 0.5
    wait_devices_s: float = 60.0
    epochs: int = 1
    lr: float = 0.1
    batch_size: int = 16
    weight_decay: float = 0.0
    seed: int = 0
    codec: str = "float32"
    topk_fraction: float = 0.01
    max_update_bytes: int = 16 * 1024 * 1024
    max_norm: float | None = None
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    allow: list[str] | None = None
    eval_task: str = "default"
    state_path: Path | None = None
    out_dir: Path | None = None

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        topics.check_name(self.fleet, "fleet")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if self.strategy not in STRATEGY_NAMES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGY_NAMES)}"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must not be negative")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise_multiplier needs clip_norm: the noise is scaled to the clip")
        if self.min_devices < 1:
            raise ValueError("min_devices must be at least 1")
        if self.stale_after_s is not None and not self.stale_after_s > 0:
            raise ValueError("stale_after_s must be positive")
        if not 0.0 <= self.quorum <= 1.0:
            raise ValueError("quorum must be in [0, 1]")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if self.codec not in CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}, not {self.codec!r}")


@dataclass
class RoundSummary:
    """What one round did; also the per-round row of metrics.csv."""

    round: int
    status: str  # "closed" | "failed"
    head_version: int
    selected: int
    accepted: int
    rejected: dict[str, int]
    late: int
    seconds: float
    metrics: dict[str, float]
    online: int = 0  # eligible devices with a fresh status when the round selected
    stale_devices: list[str] = field(default_factory=list)  # said online, not heard in time

    def row(self) -> dict[str, Any]:
        """Return a flat dict for CSV/JSON: metrics and rejection counts become columns."""
        flat: dict[str, Any] = {
            "round": self.round,
            "status": self.status,
            "head_version": self.head_version,
            "selected": self.selected,
            "online": self.online,
            "stale": len(self.stale_devices),
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "late": self.late,
            "seconds": round(self.seconds, 4),
        }
        flat.update(self.metrics)
        flat.update({f"rejected_{code}": n for code, n in sorted(self.rejected.items())})
        return flat


@dataclass
class FederationSummary:
    """What a whole run did."""

    rounds: list[RoundSummary]
    head_version: int
    accuracy: float | None
    seconds: float
    state_path: str


@dataclass
class _Accepted:
    delta: Weights
    samples: int
    sha256: str
    size: int
    metrics: dict[str, float]


@dataclass
class _OpenRound:
    number: int
    selected: dict[str, str]  # device -> task
    deadline: float
    head_version: int
    payload: bytes
    online: int = 0
    stale: list[str] = field(default_factory=list)
    accepted: dict[str, _Accepted] = field(default_factory=dict)
    answered: dict[str, str] = field(default_factory=dict)  # device -> sha256 (errors too)
    rejected: Counter[str] = field(default_factory=Counter)
    late: int = 0
    closed: bool = False


RoundCallback = Callable[[RoundSummary], None]


class Aggregator:
    """Runs a federation: `run()` blocks until the last round and returns the summary."""

    def __init__(
        self,
        config: AggregatorConfig,
        network: NetworkLoop | None = None,
        eval_dataset: Dataset | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        """Load the bundle and state; nothing connects until run().

        Args:
            config: the settings.
            network: a shared network loop (simulation); None gives the aggregator its own.
            eval_dataset: server-side evaluation samples (raw inputs; features via the runtime).
            on_round: called after every round (progress display, simulation).

        Raises:
            ValueError: an invalid setting.
            BundleError: the bundle cannot be loaded.
            FederationError: the stored state belongs to another fleet or bundle.
        """
        config.check()
        self.config = config
        self.on_round = on_round
        self.bundle: ModelBundle = load_bundle(config.bundle_dir)
        self.state = AggregatorRecord(config.state_path or ":memory:")
        self._check_state_identity()
        self.head_version, self.heads = self._initial_heads()
        self.strategies: dict[str, Strategy] = {}
        for task in self.heads:
            strategy = make_strategy(config.strategy, **config.strategy_params)
            stored = self.state.strategy_state(task)
            if stored:
                strategy.load_state_dict(stored)
            self.strategies[task] = strategy
        self.devices: dict[str, DeviceStatus] = {}
        self._seen: dict[str, float] = {}  # device -> Unix time its status counts from
        self.summaries: list[RoundSummary] = []
        self._cond = threading.Condition()
        self._round: _OpenRound | None = None
        self._stop = threading.Event()
        self._eval = self._eval_features(eval_dataset)
        self.client = MqttClient(
            config.broker_url,
            client_id=f"edgefl-{config.fleet}-aggregator",
            network=network,
            max_payload_bytes=config.max_update_bytes,
            on_oversized=self._on_oversized,
        )

    # -- setup --

    def _check_state_identity(self) -> None:
        identity = json.dumps(
            {"fleet": self.config.fleet, "bundle": self.bundle.manifest.name,
             "version": self.bundle.manifest.version},
            sort_keys=True,
        )  # fmt: skip
        stored = self.state.meta("identity")
        if stored is None:
            self.state.set_meta("identity", identity)
        elif stored != identity:
            raise FederationError(
                f"state {self.state.path} belongs to another federation ({stored}); "
                "pass a new --state file"
            )

    def _initial_heads(self) -> tuple[int, dict[str, Weights]]:
        version, heads = self.state.latest_heads()
        if heads:
            return version, heads
        heads = {task: self.bundle.head_weights(task) for task in self.bundle.manifest.heads}
        for task, weights in heads.items():
            self.state.save_head(task, 0, 0, weights)
        return 0, heads

    def _eval_features(self, dataset: Dataset | None) -> tuple[np.ndarray, np.ndarray] | None:
        if dataset is None or self.config.eval_task not in self.heads:
            return None
        dataset = conform(dataset, self.bundle.manifest.input.shape)
        artifact = self.bundle.manifest.select_backbone([("onnx", "*"), ("tflite", "*")])
        runner, lock = shared_backbone(self.bundle.file(artifact), artifact.sha256)
        features = FeatureCache().features(artifact.sha256, dataset.X, runner, lock)
        return features, dataset.y

    def evaluate(self, task: str | None = None) -> float | None:
        """Return the accuracy of a task's current global head on the eval set (None: no set)."""
        task = task or self.config.eval_task
        if self._eval is None or task not in self.heads:
            return None
        features, labels = self._eval
        return head_accuracy(self.bundle.head_spec(task).layers, self.heads[task], features, labels)

    # -- the run --

    def stop(self) -> None:
        """Ask run() to close the current round now and return."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> FederationSummary:
        """Run rounds up to `config.rounds` (resuming an open one) and return the summary.

        Raises:
            TransportError: the broker cannot be reached.
            FederationError: fewer than `min_devices` devices came online in time.
        """
        started = time.perf_counter()
        self.client.subscribe(topics.all_statuses(self.config.fleet), self._on_status)
        self.client.subscribe(topics.all_updates(self.config.fleet), self._on_update)
        self.client.on_connect(self._on_connect)
        self.client.connect(timeout=CONNECT_TIMEOUT_S)
        try:
            resumed = self._resume()
            first = resumed.number if resumed else self.state.last_round() + 1
            for number in range(first, self.config.rounds + 1):
                if self._stop.is_set():
                    break
                open_round = resumed if resumed and resumed.number == number else None
                summary = self._run_round(number, open_round)
                self.summaries.append(summary)
                self._write_metrics()
                if self.on_round is not None:
                    self.on_round(summary)
            self._write_heads()
        finally:
            self.client.close()
        return FederationSummary(
            rounds=self.summaries,
            head_version=self.head_version,
            accuracy=self.evaluate(),
            seconds=time.perf_counter() - started,
            state_path=self.state.path,
        )

    def _resume(self) -> _OpenRound | None:
        record = self.state.open_round_record()
        if record is None:
            return None
        # A resumed round gets a fresh deadline: devices need time to see the task again.
        deadline = time.time() + self.config.deadline_s
        task = self._task_message(record.round, record.selected, deadline, record.config)
        open_round = _OpenRound(record.round, record.selected, deadline, record.head_version, task)
        for stored in self.state.accepted_updates(record.round):
            try:
                delta, _ = decode_delta(stored.payload)
            except MessageError as exc:  # stored by this code, so only a corrupt file gets here
                log.error("round %d: stored update of %s unreadable: %s", record.round,
                          stored.device_id, exc)  # fmt: skip
                continue
            open_round.accepted[stored.device_id] = _Accepted(
                delta, stored.samples, stored.sha256, len(stored.payload), stored.metrics
            )
            open_round.answered[stored.device_id] = stored.sha256
        log.info("resuming round %d with %d accepted updates", record.round,
                 len(open_round.accepted))  # fmt: skip
        return open_round

    def _task_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "epochs": self.config.epochs,
            "lr": self.config.lr,
            "batch_size": self.config.batch_size,
            "weight_decay": self.config.weight_decay,
            "seed": self.config.seed,
            "codec": self.config.codec,
            "topk_fraction": self.config.topk_fraction,
            "strategy": self.config.strategy,
        }
        if self.config.clip_norm is not None:
            config["clip_norm"] = self.config.clip_norm
            config["noise_multiplier"] = self.config.noise_multiplier
        # Every task runs the same strategy with the same parameters, so any one instance says
        # what devices need (its per-task optimizer state does not go on the wire).
        strategy = next(iter(self.strategies.values()), None)
        if strategy is not None:
            config.update(strategy.client_config())
        return config

    def _task_message(
        self, number: int, selected: dict[str, str], deadline: float, config: dict[str, Any]
    ) -> bytes:
        tasks = sorted(set(selected.values()))
        task = RoundTask(
            round=number,
            selected=sorted(selected),
            tasks=tasks,
            head_version=self.head_version,
            model_version=self.bundle.manifest.version,
            deadline=deadline,
            config=config,
        )
        return encode_round_task(task, {name: self.heads[name] for name in tasks})

    def device_presence(self, now: float | None = None) -> dict[str, str]:
        """Return "online", "stale" or "offline" for every device that could train this bundle.

        Only devices on the allow-list (if any) that run the bundle's version and declare a task
        it has a head for are listed; `now` defaults to the current Unix time.
        """
        now = time.time() if now is None else now
        allow = set(self.config.allow) if self.config.allow is not None else None
        with self._cond:
            known = [(s, self._seen.get(s.device_id, 0.0)) for s in self.devices.values()]
        return {
            s.device_id: presence.presence(s, seen, now, self.config.stale_after_s)
            for s, seen in known
            if (allow is None or s.device_id in allow)
            and s.model_version == self.bundle.manifest.version
            and s.task in self.heads
        }

    def online_devices(self) -> dict[str, DeviceStatus]:
        """Return the devices that can train this bundle now: online with a fresh status."""
        states = self.device_presence()
        with self._cond:
            return {d: self.devices[d] for d, state in states.items() if state == presence.ONLINE}

    def stale_devices(self) -> list[str]:
        """Return the eligible devices whose status says online but was not heard in time."""
        return sorted(d for d, state in self.device_presence().items() if state == presence.STALE)

    def _select(self, number: int) -> dict[str, str]:
        deadline = time.monotonic() + self.config.wait_devices_s
        with self._cond:
            # Polled, not only woken by statuses: a device turns stale by time passing alone.
            while len(self.online_devices()) < self.config.min_devices:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    stale = self.stale_devices()
                    raise FederationError(
                        f"only {len(self.online_devices())} of {self.config.min_devices} devices "
                        f"needed are online after {self.config.wait_devices_s:g} s "
                        f"(fleet {self.config.fleet!r}, bundle v{self.bundle.manifest.version})"
                        + (f"; stale (no recent heartbeat): {', '.join(stale)}" if stale else "")
                    )
                self._cond.wait(min(remaining, 0.5))
        online = self.online_devices()
        count = max(self.config.min_devices, math.ceil(self.config.fraction * len(online)))
        ids = sorted(online)
        rng = np.random.default_rng([self.config.seed, number])
        chosen = ids if count >= len(ids) else sorted(rng.choice(ids, size=count, replace=False))
        return {str(device): online[str(device)].task for device in chosen}

    def _run_round(self, number: int, open_round: _OpenRound | None) -> RoundSummary:
        started = time.perf_counter()
        resumed = open_round is not None
        if open_round is None:
            selected = self._select(number)
            deadline = time.time() + self.config.deadline_s
            config = self._task_config()
            payload = self._task_message(number, selected, deadline, config)
            self.state.open_round(number, selected, deadline, self.head_version, config)
            open_round = _OpenRound(number, selected, deadline, self.head_version, payload)
            self._count_presence(open_round)
        with self._cond:
            self._round = open_round
        task_topic = topics.round_task(self.config.fleet, number)
        self.client.publish(task_topic, open_round.payload, qos=1, retain=True)
        log.info("round %d: %d devices selected of %d online, %d stale", number,
                 len(open_round.selected), open_round.online, len(open_round.stale))  # fmt: skip
        with self._cond:
            while not self._stop.is_set() and len(open_round.answered) < len(open_round.selected):
                remaining = open_round.deadline - time.time()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
                self.state.flush()
            open_round.closed = True
            accepted = dict(open_round.accepted)
        if resumed:
            # Selected before the restart; right after connecting the statuses had not arrived.
            self._count_presence(open_round)
        # Clear the retained task so devices that connect later do not train for a closed round.
        self.client.publish(task_topic, b"", qos=1, retain=True)
        return self._close_round(open_round, accepted, time.perf_counter() - started)

    def _count_presence(self, open_round: _OpenRound) -> None:
        states = self.device_presence()
        open_round.online = sum(state == presence.ONLINE for state in states.values())
        open_round.stale = sorted(d for d, state in states.items() if state == presence.STALE)
        if open_round.stale:
            log.warning("round %d: stale devices left out (status not refreshed in time): %s",
                        open_round.number, ", ".join(open_round.stale))  # fmt: skip

    def _close_round(
        self, open_round: _OpenRound, accepted: dict[str, _Accepted], seconds: float
    ) -> RoundSummary:
        number = open_round.number
        needed = max(1, math.ceil(self.config.quorum * len(open_round.selected)))
        status = "closed" if len(accepted) >= needed else "failed"
        reason = "" if status == "closed" else f"{len(accepted)} accepted, quorum is {needed}"
        if status == "closed":
            by_task: dict[str, list[tuple[Weights, int]]] = {}
            for device, update in accepted.items():
                by_task.setdefault(open_round.selected[device], []).append(
                    (update.delta, update.samples)
                )
            new_heads = dict(self.heads)
            for task, deltas in by_task.items():
                new_heads[task] = self.strategies[task].aggregate(self.heads[task], deltas)
            self.heads = new_heads
            self.head_version += 1
            for task, weights in self.heads.items():
                self.state.save_head(task, self.head_version, number, weights)
                self.state.save_strategy_state(task, self.strategies[task].state_dict())
        metrics = self._round_metrics(accepted)
        with self._cond:
            rejected = dict(open_round.rejected)
            late = open_round.late
        result = RoundResult(
            round=number,
            status=status,
            head_version=self.head_version,
            selected=len(open_round.selected),
            accepted=len(accepted),
            rejected=rejected,
            late=late,
            metrics=metrics,
            reason=reason,
            online=open_round.online,
            stale=len(open_round.stale),
        )
        self.state.close_round(number, status, asdict(result), metrics)
        self.client.publish(
            topics.round_result(self.config.fleet, number), result.encode(), qos=1, retain=True
        )
        log.info("round %d %s: %d/%d accepted, head v%d, %s", number, status, len(accepted),
                 len(open_round.selected), self.head_version, metrics)  # fmt: skip
        return RoundSummary(
            number, status, self.head_version, len(open_round.selected), len(accepted),
            rejected, late, seconds, metrics, open_round.online, list(open_round.stale),
        )  # fmt: skip

    def _round_metrics(self, accepted: dict[str, _Accepted]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        accuracy = self.evaluate()
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        if accepted:
            samples = np.array([u.samples for u in accepted.values()], dtype=np.float64)
            metrics["samples"] = float(samples.sum())
            metrics["bytes_per_update"] = float(np.mean([u.size for u in accepted.values()]))
            for name in ("loss", "global_accuracy", "personal_accuracy"):
                values = [u.metrics.get(name) for u in accepted.values()]
                if all(v is not None for v in values):
                    weights = samples / max(samples.sum(), 1.0)
                    metrics[f"device_{name}"] = float(np.dot(weights, np.array(values, float)))
        return metrics

    # -- network thread --

    def _on_connect(self, _session_present: bool) -> None:
        # A broker restart loses retained messages when it has no persistence: re-publish the
        # open round's task so devices that reconnect see it (they re-send identical updates).
        with self._cond:
            open_round = self._round
        if open_round is not None and not open_round.closed:
            topic = topics.round_task(self.config.fleet, open_round.number)
            self.client.publish(topic, open_round.payload, qos=1, retain=True)

    def _on_status(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        if parsed is None or parsed.device_id is None or not message.payload:
            return
        try:
            status = DeviceStatus.decode(message.payload)
        except MessageError as exc:
            log.warning("ignoring bad status on %s: %s", message.topic, exc)
            return
        if status.device_id != parsed.device_id:
            log.warning("ignoring status on %s claiming device %r", message.topic, status.device_id)
            return
        seen = presence.seen_at(status, time.time(), message.retain)
        with self._cond:
            self.devices[status.device_id] = status
            # The broker re-sends retained statuses after a reconnect, dated by the device's
            # clock; the broker keeps the newest, so it is no older than what was heard live.
            self._seen[status.device_id] = max(seen, self._seen.get(status.device_id, 0.0))
            self._cond.notify_all()

    def _reject(
        self, number: int, device: str, code: str, reason: str, size: int, task: str = ""
    ) -> None:
        log.warning("round %d: rejected update from %s: %s: %s", number, device, code, reason)
        outcome = "late" if code == "round-closed" else "rejected"
        self.state.record_update(number, device, task, outcome, code, reason, size)
        with self._cond:
            if self._round is not None and not self._round.closed:
                if outcome == "late":
                    self._round.late += 1
                else:
                    self._round.rejected[code] += 1

    def _on_oversized(self, topic: str, size: int) -> None:
        parsed = topics.parse(topic)
        number = parsed.round_number if parsed and parsed.round_number is not None else -1
        device = parsed.device_id if parsed and parsed.device_id else "?"
        limit = self.config.max_update_bytes
        self._reject(number, device, "oversized", f"{size} bytes exceeds the limit {limit}", size)

    def _on_update(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        size = len(message.payload)
        if parsed is None or parsed.round_number is None or parsed.device_id is None:
            self._reject(-1, "?", "bad-topic", f"{message.topic} is not an update topic", size)
            return
        number, device = parsed.round_number, parsed.device_id
        if not message.payload:
            return  # an empty retained message clears a topic; nothing was sent
        try:
            self._accept(number, device, message.payload)
        except UpdateRejected as exc:
            self._reject(number, device, exc.code, exc.reason, size)

    def _accept(self, number: int, device: str, payload: bytes) -> None:
        """Validate one update and take it into the open round, or raise UpdateRejected."""
        if self.config.allow is not None and device not in self.config.allow:
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
        digest = hashlib.sha256(payload).hexdigest()
        with self._cond:
            open_round = self._round
            if open_round is None or number > open_round.number:
                raise UpdateRejected("round-unknown", f"round {number} has not started")
            if number < open_round.number or open_round.closed:
                raise UpdateRejected("round-closed", f"round {number} is closed")
            if device not in open_round.selected:
                raise UpdateRejected(
                    "not-selected", f"{device} was not selected for round {number}"
                )
            previous = open_round.answered.get(device)
            if previous == digest:
                return  # the same bytes again (re-delivery after a reconnect): already counted
            if previous is not None:
                raise UpdateRejected("duplicate", f"{device} already answered round {number}")
            task = open_round.selected[device]
            head_version = open_round.head_version
        if header.status == "error":
            with self._cond:
                open_round.answered[device] = digest
                if len(open_round.answered) >= len(open_round.selected):
                    self._cond.notify_all()
            raise UpdateRejected(
                f"device:{header.error_code or 'error'}", header.reason or "device reported failure"
            )
        if header.task != task:
            raise UpdateRejected(
                "task-mismatch", f"update is for task {header.task!r}, not {task!r}"
            )
        if header.head_version != head_version:
            raise UpdateRejected(
                "stale-head",
                f"trained from head v{header.head_version}, round uses v{head_version}",
            )
        if header.samples < 1:
            raise UpdateRejected("no-samples", "update reports no training samples")
        try:
            delta, _ = decode_delta(payload)
        except MessageError as exc:
            raise UpdateRejected("malformed", str(exc)) from None
        validate_delta(delta, self.heads[task], self.config.max_norm)
        with self._cond:
            if open_round.closed:
                raise UpdateRejected("round-closed", f"round {number} closed while validating")
            if device in open_round.answered:
                return
            open_round.accepted[device] = _Accepted(
                delta, header.samples, digest, len(payload), dict(header.metrics)
            )
            open_round.answered[device] = digest
            complete = len(open_round.answered) >= len(open_round.selected)
        # Recorded before the round can close, so the last update's record is in the batch that
        # closing the round writes.
        self.state.record_update(
            number, device, task, "accepted", size=len(payload), samples=header.samples,
            sha256=digest, metrics=header.metrics, payload=payload,
        )  # fmt: skip
        if complete:
            # Only the last answer wakes run(): waking it per update cost a thread switch (and,
            # through its periodic flush, a SQLite commit) for every message.
            with self._cond:
                self._cond.notify_all()

    # -- outputs --

    def _write_metrics(self) -> None:
        if self.config.out_dir is None:
            return
        out = self.config.out_dir
        out.mkdir(parents=True, exist_ok=True)
        rows = [s.row() for s in self.summaries]
        (out / "metrics.json").write_text(json.dumps(rows, indent=2))
        columns: list[str] = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
        with (out / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def _write_heads(self) -> None:
        if self.config.out_dir is None:
            return
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        for task, weights in self.heads.items():
            name = "head.safetensors" if task == "default" else f"head-{task}.safetensors"
            (self.config.out_dir / name).write_bytes(encode_head(weights))
