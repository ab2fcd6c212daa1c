"""The device agent: announces itself, trains the head on cached features when a round asks, and
publishes only the update (a delta, a sample count, local metrics) — never data or features.

One `Agent` is one device. Many agents can share one `NetworkLoop` (the simulation runs a
thousand in one process); their handlers run on that loop's thread, so training on cached
features must stay short, and the slow part (backbone features) happens in `start()`.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.atomic import write_atomic
from edgefl.bundle import Artifact, ModelBundle, decode_head, encode_head, load_bundle
from edgefl.core.codecs import CODEC_NAMES, ErrorFeedback, encode_delta
from edgefl.core.privacy import add_gaussian_noise, clip_by_norm
from edgefl.core.settings import TrainConfig
from edgefl.core.training import train_head
from edgefl.data import (
    DIGITS,
    Dataset,
    DataSource,
    conform,
    conform_batch,
    load_digits,
    open_source,
)
from edgefl.errors import BundleError, MessageError
from edgefl.head import Weights, head_accuracy, head_forward
from edgefl.profiles import load_profile
from edgefl.roles.features import (
    FeatureCache,
    Runner,
    batch_size_for,
    run_backbone,
    run_backbone_batches,
    shared_backbone,
)
from edgefl.transport import topics
from edgefl.transport.client import (
    Message,
    MessageHandler,
    MqttClient,
    NetworkLoop,
    TimerHandle,
    Will,
)
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    encode_update_error,
    update_metadata,
)

log = logging.getLogger(__name__)

_TRAIN_SETTINGS = tuple(f.name for f in fields(TrainConfig))

# Round outcomes an agent keeps in memory (`Agent.outcomes`), newest last.
KEPT_OUTCOMES = 100

# Simulation hook: round number -> None (skip the round) or seconds to delay the update.
ReplyHook = Callable[[int], float | None]

# Tasks carry the global heads; a 1280x10 head is 51 KB, so this leaves room for big heads.
AGENT_MAX_PAYLOAD = 64 * 1024 * 1024
RUNTIME_FORMATS = {"onnx": "onnx", "onnxruntime": "onnx", "tflite": "tflite", "litert": "tflite"}
# Re-sends only happen for the round in flight (a restart re-publishes its task); a few recent
# rounds cover a task seen again late without the agent holding every update it ever sent.
RESENT_ROUNDS = 4
# An error update's reason is one line for a log, not a traceback (docs/protocol.md).
MAX_REASON_CHARS = 500


@dataclass
class AgentConfig:
    """How a device agent runs.

    Attributes:
        broker_url: `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet name (a topic level).
        device_id: this device's ID, unique in the fleet (a topic level).
        data: local data: "digits", a `.npz` or an ImageFolder directory; None when a dataset
            is passed to `Agent` directly.
        bundle_dir: the bundle to run; None waits for one to be installed (delivery).
        state_dir: feature cache and personal heads; None keeps them in memory.
        task: which head of the bundle this device trains.
        runtime: "auto", "onnx" or "tflite": which backbone artifact to run; "auto" follows the
            board profile's preference, else ONNX before TFLite.
        threads: runtime threads for feature extraction; None takes the profile's, else 1.
        heartbeat_s: seconds between status refreshes.
        codec: force an update codec; None follows the round's task.
        personalize: keep a personal head (the global head fine-tuned locally) for inference.
        train_backend: "auto", "numpy" or "torch" (see edgefl.core.training).
        connect_timeout_s: how long start() waits for the broker; None does not wait.
        clip_norm: this board's own bound on its delta's L2 norm; the tighter of it and the
            round's `clip_norm` applies (None: only the round's).
        noise_multiplier: this board's own Gaussian noise (std = multiplier * clip norm); the
            larger of it and the round's applies. Needs a clip norm from either side.
        group: the device's group in the fleet (`edgefl deploy --group`), announced in its status.
        profile: the board profile, a name from `devices/` or a profile.toml path: which backbone
            artifact it prefers and how many threads it runs; announced in its status.
    """

    broker_url: str
    fleet: str
    device_id: str
    data: str | None = None
    bundle_dir: Path | None = None
    state_dir: Path | None = None
    task: str = "default"
    runtime: str = "auto"
    threads: int | None = None
    heartbeat_s: float = 30.0
    codec: str | None = None
    personalize: bool = True
    train_backend: str = "auto"
    connect_timeout_s: float | None = 30.0
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    group: str = ""
    profile: str = ""

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        topics.check_name(self.fleet, "fleet")
        topics.check_name(self.device_id, "device ID")
        topics.check_name(self.task, "task")
        if self.runtime != "auto" and self.runtime not in RUNTIME_FORMATS:
            raise ValueError(f"runtime must be auto, onnx or tflite, not {self.runtime!r}")
        if self.codec is not None and self.codec not in CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}, not {self.codec!r}")
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must not be negative")


@dataclass
class RoundOutcome:
    """What the agent did in a round (kept for the caller; the same numbers went on the wire)."""

    round: int
    status: str  # "ok" | "error"
    error_code: str
    metrics: dict[str, float]
    bytes_sent: int


def _memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError, AttributeError):
        return 0


def _runtimes() -> list[str]:
    try:
        from edgefl.runtime import available_runtimes

        return list(available_runtimes())
    except ImportError:
        return []


class Agent:
    """A device in the federation. start() -> (rounds happen) -> stop()."""

    def __init__(
        self,
        config: AgentConfig,
        dataset: Dataset | None = None,
        network: NetworkLoop | None = None,
        feature_cache: FeatureCache | None = None,
        reply_hook: ReplyHook | None = None,
    ) -> None:
        """Configure the agent; nothing loads or connects until start().

        Args:
            config: the settings.
            dataset: local samples held in memory (simulation); None reads `config.data` on
                start(): labels only, the samples in batches whenever features are computed.
            network: a shared network loop (simulation); None gives the agent its own.
            feature_cache: a shared cache; None uses `config.state_dir`/features or memory.
            reply_hook: simulation only (edgefl.simulation): called with the round number of a
                task this device was selected for; None means skip the round (a simulated
                dropout), a number of seconds delays the update (a simulated slow device).

        Raises:
            ValueError: an invalid setting.
        """
        config.check()
        self.config = config
        self.profile = load_profile(config.profile) if config.profile else None
        self.threads = config.threads or (self.profile.threads if self.profile else 1)
        self.dataset = dataset
        # Data on disk: only labels are held; features are computed from batches read from it.
        self.source: DataSource | None = None
        # The latest rounds only: an agent runs for months, and the status needs just the last.
        self.outcomes: deque[RoundOutcome] = deque(maxlen=KEPT_OUTCOMES)
        self.bundle: ModelBundle | None = None
        self._features: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._global: Weights | None = None
        self._personal: Weights | None = None
        self._feedback = ErrorFeedback()
        # Updates sent for recent rounds, re-sent as they are when a task is seen again (after a
        # broker or aggregator restart): the aggregator treats identical bytes as a re-delivery.
        self._sent: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._heartbeat: TimerHandle | None = None
        cache_dir = config.state_dir / "features" if config.state_dir else None
        self.features_cache = feature_cache or FeatureCache(cache_dir)
        self._reply_hook = reply_hook
        self.client = MqttClient(
            config.broker_url,
            client_id=f"edgefl-{config.fleet}-{config.device_id}",
            network=network,
            will=Will(self._status_topic, self._status("offline").encode(), qos=1, retain=True),
            persistent_session=True,
            max_payload_bytes=AGENT_MAX_PAYLOAD,
        )

    # -- public API --

    @property
    def device_id(self) -> str:
        """This device's ID."""
        return self.config.device_id

    @property
    def model_version(self) -> int:
        """The version of the installed bundle (0 when none)."""
        return self.bundle.manifest.version if self.bundle is not None else 0

    @property
    def samples(self) -> int:
        """How many local labelled samples the agent trains on."""
        if self.dataset is not None:
            return len(self.dataset)
        return 0 if self.source is None else len(self.source)

    def add_handler(self, topic_filter: str, handler: MessageHandler) -> None:
        """Also deliver messages matching `topic_filter` to `handler` (on the network thread).

        The delivery role registers its deploy and chunk handlers here.
        """
        self.client.subscribe(topic_filter, handler)

    def start(self) -> None:
        """Load data and bundle, compute features, connect, announce, and wait for tasks.

        Raises:
            DataError, BundleError: the local data or the bundle cannot be used.
            TransportError: the broker is not reachable within `connect_timeout_s`.
        """
        if self.dataset is None and self.source is None and self.config.data is not None:
            if self.config.data == DIGITS:
                self.dataset = load_digits()  # built in and small (0.5 MB)
            else:
                self.source = open_source(self.config.data)
        self._load_personal()
        if self.config.bundle_dir is not None:
            self.install_bundle(load_bundle(self.config.bundle_dir))
        self.client.subscribe(topics.all_tasks(self.config.fleet), self._on_task)
        self.client.on_connect(lambda _session: self._announce())
        self.client.connect(timeout=self.config.connect_timeout_s)
        self._schedule_heartbeat()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish "offline", disconnect and stop the heartbeat; safe to call twice."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.client.connected:
            handle = self.client.publish(
                self._status_topic, self._status("offline").encode(), qos=1, retain=True
            )
            if not self.client.network.in_loop_thread():
                handle.wait(timeout)
        self.client.close(timeout)

    def run_forever(self) -> None:
        """start(), then block until stop() is called from elsewhere or Ctrl-C; then stop()."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        finally:
            self.stop()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Classify raw inputs with the personal head (or the global one before any round).

        Args:
            x: (n, ...) samples, preprocessed like the training data; shaped as the bundle's
                input or holding as many values (flat digits for a (1, 8, 8) CNN), as in training.

        Returns:
            (n,) predicted class indices.

        Raises:
            BundleError: no bundle is installed or no head is known yet.
            DataError: the samples do not hold as many values as the bundle's input.
        """
        if self.bundle is None:
            raise BundleError("no bundle installed")
        head = self._personal if self.config.personalize and self._personal else self._global
        if head is None:
            raise BundleError("no head known yet")
        # Training conforms the local data to the bundle's input; predict takes the same data.
        x = conform_batch(np.asarray(x, dtype=np.float32), self.bundle.manifest.input.shape)
        features = self._compute_features(x, cache=False)
        layers = self.bundle.head_spec(self.config.task).layers
        return head_forward(layers, head, features).argmax(axis=1)

    # -- the bundle hook (delivery plugs signed, chunked deploys in here) --

    def install_bundle(self, bundle: ModelBundle) -> None:
        """Make `bundle` the one this agent runs: pick the backbone, compute or load features.

        Raises:
            BundleError: the bundle has no head for this device's task or no usable backbone.
            DataError: the local data does not fit the backbone's input.
        """
        spec = bundle.head_spec(self.config.task)
        with self._lock:
            previous = self.bundle
            self.bundle = bundle
            try:
                features: np.ndarray | None = None
                if self.dataset is not None:
                    self.dataset = conform(self.dataset, bundle.manifest.input.shape)
                    features, labels = self._compute_features(self.dataset.X), self.dataset.y
                elif self.source is not None:
                    features, labels = self._source_features(self.source), self.source.y
                if features is not None:
                    self._features, self._labels = features, labels
                    if self._features.shape[1] != spec.in_features:
                        raise BundleError(
                            f"backbone gives {self._features.shape[1]} features but head "
                            f"{self.config.task!r} takes {spec.in_features}"
                        )
            except BaseException:
                self.bundle = previous
                raise
            self._global = bundle.head_weights(self.config.task)
            if previous is None or previous.manifest.version != bundle.manifest.version:
                self._feedback.reset()
                if self._personal is not None and not _same_shapes(self._personal, self._global):
                    self._personal = None
        if self.client.connected:
            self._announce()
        log.info(
            "%s: running bundle %s v%d", self.device_id, bundle.manifest.name, self.model_version
        )

    @property
    def backbone(self) -> Artifact | None:
        """The backbone artifact this agent runs from its bundle (None without a bundle)."""
        if self.bundle is None:
            return None
        return self.bundle.manifest.select_backbone(self._preferences())

    def _backbone_runner(self) -> tuple[Artifact, Runner, threading.Lock]:
        """Return the backbone artifact this agent runs, its shared runner and the runner's lock."""
        artifact = self.backbone
        assert self.bundle is not None and artifact is not None
        runner, lock = shared_backbone(self.bundle.file(artifact), artifact.sha256, self.threads)
        return artifact, runner, lock

    def _compute_features(self, x: np.ndarray, cache: bool = True) -> np.ndarray:
        artifact, runner, lock = self._backbone_runner()
        if not cache:
            return run_backbone(runner, x, lock)
        return self.features_cache.features(artifact.sha256, x, runner, lock)

    def _source_features(self, source: DataSource) -> np.ndarray:
        """Return the features of the data on disk, reading it in batches only on a miss."""
        artifact, runner, lock = self._backbone_runner()
        assert self.bundle is not None
        spec = self.bundle.manifest.input
        # The bundle's preprocessing: it is what the backbone was trained and exported with.
        preprocess = spec.preprocess

        def compute() -> np.ndarray:
            batches = source.batches(preprocess, batch_size_for(spec.shape))
            conformed = (conform_batch(batch, spec.shape) for batch in batches)
            return run_backbone_batches(runner, conformed, lock)

        digest = f"{source.digest(preprocess)}-{'x'.join(map(str, spec.shape))}"
        return self.features_cache.lookup(artifact.sha256, digest, len(source), compute)

    def _preferences(self) -> list[tuple[str, str]]:
        available = {RUNTIME_FORMATS[r] for r in _runtimes() if r in RUNTIME_FORMATS}
        if self.config.runtime != "auto":
            return [(RUNTIME_FORMATS[self.config.runtime], "*")]
        if self.profile is not None:
            usable = [(f, p) for f, p in self.profile.prefer if f == "*" or f in available]
            if usable:
                return usable
        order = [fmt for fmt in ("onnx", "tflite") if fmt in available] or ["onnx", "tflite"]
        return [(fmt, "*") for fmt in order]

    # -- status --

    @property
    def _status_topic(self) -> str:
        return topics.device_status(self.config.fleet, self.config.device_id)

    def _status(self, state: str) -> DeviceStatus:
        return DeviceStatus(
            device_id=self.config.device_id,
            state=state,
            task=self.config.task,
            arch=platform.machine(),
            runtimes=_runtimes(),
            memory_mb=_memory_mb(),
            samples=self.samples,
            model_version=self.model_version,
            heartbeat_s=self.config.heartbeat_s,
            time=time.time(),
            group=self.config.group,
            profile=self.config.profile,
            last_round=max((o.round for o in self.outcomes), default=0),
        )

    def _announce(self) -> None:
        if not self._stopped.is_set():
            self.client.publish(self._status_topic, self._status("online").encode(), 1, retain=True)

    def _schedule_heartbeat(self) -> None:
        def beat() -> None:
            if self._stopped.is_set():
                return
            if self.client.connected:
                self._announce()
            self._heartbeat = self.client.network.call_later(self.config.heartbeat_s, beat)

        self._heartbeat = self.client.network.call_later(self.config.heartbeat_s, beat)

    # -- rounds --

    def _on_task(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained task: the round closed
        try:
            task, heads = decode_round_task(message.payload)
        except MessageError as exc:
            log.warning("%s: ignoring bad task on %s: %s", self.device_id, message.topic, exc)
            return
        if self.config.device_id not in task.selected:
            return
        # The simulation's hook decides here, before training, so a simulated dropout costs
        # nothing and a slow device's update is the one it would have sent on time.
        delay = 0.0
        if self._reply_hook is not None:
            decision = self._reply_hook(task.round)
            if decision is None:
                return
            delay = decision
        with self._lock:
            sent = self._sent.get(task.round)
            if sent is not None:
                self._publish_update(task.round, sent)
                return
            payload, outcome = self._answer(task, heads)
            self._sent[task.round] = payload
            while len(self._sent) > RESENT_ROUNDS:
                self._sent.popitem(last=False)
            self.outcomes.append(outcome)
        if delay > 0:  # simulation: the network thread must not sleep, so publish later
            self.client.network.call_later(delay, lambda: self._publish_update(task.round, payload))
            return
        self._publish_update(task.round, payload)

    def _publish_update(self, round_number: int, payload: bytes) -> None:
        topic = topics.round_update(self.config.fleet, round_number, self.config.device_id)
        self.client.publish(topic, payload, qos=1)

    def _error(self, task: RoundTask, code: str, reason: str) -> tuple[bytes, RoundOutcome]:
        log.warning("%s: round %d failed: %s: %s", self.device_id, task.round, code, reason)
        header = UpdateHeader(
            round=task.round,
            device_id=self.config.device_id,
            task=self.config.task,
            samples=0,
            head_version=task.head_version,
            model_version=self.model_version,
            status="error",
            error_code=code,
            reason=reason[:MAX_REASON_CHARS],
        )
        payload = encode_update_error(header)
        return payload, RoundOutcome(task.round, "error", code, {}, len(payload))

    def _answer(self, task: RoundTask, heads: dict[str, Weights]) -> tuple[bytes, RoundOutcome]:
        """Train on the task and return the update payload; failures become error updates."""
        if self.bundle is None:
            return self._error(task, "no-bundle", "no bundle is installed on this device")
        if task.model_version != self.model_version:
            return self._error(
                task,
                "model-version",
                f"task is for bundle v{task.model_version}, device runs v{self.model_version}",
            )
        if self.config.task not in heads:
            return self._error(task, "no-head", f"task carries no head for {self.config.task!r}")
        if self._features is None or self._labels is None or len(self._labels) == 0:
            return self._error(task, "no-data", "the device has no labelled samples")
        try:
            return self._train(task, heads[self.config.task])
        except Exception as exc:  # any training failure is reported, never kills the agent
            return self._error(task, "train-failed", f"{type(exc).__name__}: {exc}")

    def _train(self, task: RoundTask, global_head: Weights) -> tuple[bytes, RoundOutcome]:
        assert self.bundle is not None and self._features is not None and self._labels is not None
        layers = self.bundle.head_spec(self.config.task).layers
        config = task.config
        # The task's training settings, checked; the seed moves with the round so that minibatch
        # orders differ between rounds but replay identically when a round is resent.
        settings = {name: config[name] for name in _TRAIN_SETTINGS if name in config}
        settings["seed"] = int(config.get("seed", 0)) + task.round
        train_config = TrainConfig.from_dict(settings)
        started = time.perf_counter()
        global_accuracy = head_accuracy(layers, global_head, self._features, self._labels)
        result = train_head(
            layers,
            global_head,
            self._features,
            self._labels,
            train_config,
            self.config.train_backend,
        )
        self._global = global_head
        if self.config.personalize:
            self._personal = result.weights
            self._save_personal()
        delta = self._privatize(
            {key: result.weights[key] - global_head[key] for key in global_head}, config
        )
        # Rounded: every digit is sent with every update, and 5 significant digits are plenty.
        metrics = {
            "loss": float(f"{result.loss:.5g}"),
            "global_accuracy": float(f"{global_accuracy:.5g}"),
            "personal_accuracy": float(f"{result.accuracy:.5g}"),
            "train_seconds": float(f"{time.perf_counter() - started:.3g}"),
        }
        header = UpdateHeader(
            round=task.round,
            device_id=self.config.device_id,
            task=self.config.task,
            samples=int(result.samples),
            head_version=task.head_version,
            model_version=self.model_version,
            metrics=metrics,
        )
        codec = self.config.codec or str(config.get("codec", "float32"))
        payload = encode_delta(
            delta,
            codec,
            feedback=self._feedback if codec != "float32" else None,
            topk_fraction=float(config.get("topk_fraction", 0.01)),
            metadata=update_metadata(header),
        )
        return payload, RoundOutcome(task.round, "ok", "", metrics, len(payload))

    def _privatize(self, delta: Weights, task_config: Mapping[str, Any]) -> Weights:
        """Clip and noise the delta as the stricter of this board's and the round's settings."""
        bounds = [float(b) for b in (self.config.clip_norm, task_config.get("clip_norm")) if b]
        multiplier = max(
            self.config.noise_multiplier, float(task_config.get("noise_multiplier", 0.0))
        )
        if not bounds:
            if multiplier > 0:
                raise ValueError("noise_multiplier is set but no clip_norm bounds the noise")
            return delta
        clip = min(bounds)
        delta = clip_by_norm(delta, clip)
        if multiplier > 0:
            # Fresh OS entropy: noise that a seed could reproduce would protect nothing.
            delta = add_gaussian_noise(delta, multiplier * clip, np.random.default_rng())
        return delta

    # -- personal head persistence --

    def _personal_path(self) -> Path | None:
        if self.config.state_dir is None:
            return None
        return self.config.state_dir / f"personal-{self.config.task}.safetensors"

    def _save_personal(self) -> None:
        path = self._personal_path()
        if path is None or self._personal is None:
            return
        write_atomic(path, encode_head(self._personal))

    def _load_personal(self) -> None:
        path = self._personal_path()
        if path is not None and path.is_file():
            try:
                self._personal = decode_head(path.read_bytes())
            except BundleError as exc:
                log.warning("%s: ignoring unreadable personal head: %s", self.device_id, exc)


def _same_shapes(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
