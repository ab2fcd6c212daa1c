"""The device agent: announces itself, trains the head on cached features when a round asks, and
publishes only the update (a delta, a sample count, local metrics) — never data or features.

One `Agent` is one device. Many agents can share one `NetworkLoop` (the simulation runs a
thousand in one process); their handlers run on that loop's thread, which also sends heartbeats,
so rounds train on the process's small training pool (`edgefl.roles.training_pool`), and the
slow part (backbone features) happens in `start()`. A stored answer is re-sent only for the same
task (run, round, head digest, bundle digest); the round's result tells the board what became of
its update (`Agent.outcomes`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefl.bundle import Artifact, ModelBundle, load_bundle
from edgefl.core.codecs import ErrorFeedback
from edgefl.core.local_round import LocalData, RoundOutcome, TaskKey, run_local_round, task_key
from edgefl.core.personal_head import same_shapes
from edgefl.data import DIGITS, Dataset, DataSource, conform, conform_batch, load_digits
from edgefl.errors import BundleError, EdgeflError, MessageError
from edgefl.head import Weights, head_forward
from edgefl.profiles import load_profile
from edgefl.roles.agent_config import AgentConfig
from edgefl.roles.board_backbone import BoardBackbone, describe
from edgefl.roles.board_data import BoardData
from edgefl.roles.board_status import board_status
from edgefl.roles.features import FeatureCache, run_backbone
from edgefl.roles.personal_head_file import PersonalHeadFile
from edgefl.roles.round_results import ResultWatch
from edgefl.roles.training_pool import run_in_pool
from edgefl.security.identity import AgentAuth
from edgefl.transport import topics
from edgefl.transport.client import Message, MessageHandler, NetworkLoop, TimerHandle, Will
from edgefl.transport.connect import open_client
from edgefl.transport.messages import RoundTask, decode_round_task
from edgefl.transport.sealed import SealError

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentConfig", "RoundOutcome"]

# Round outcomes an agent keeps in memory (`Agent.outcomes`), newest last.
KEPT_OUTCOMES = 100

# Tasks carry the global heads; a 1280x10 head is 51 KB, so this leaves room for big heads.
AGENT_MAX_PAYLOAD = 64 * 1024 * 1024
# Re-sends only happen for the round in flight (a restart re-publishes its task); a few recent
# rounds cover a task seen again late without the agent holding every update it ever sent.
RESENT_ROUNDS = 4


class Agent:
    """A device in the federation. start() -> (rounds happen) -> stop()."""

    def __init__(
        self,
        config: AgentConfig,
        dataset: Dataset | None = None,
        network: NetworkLoop | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """Configure the agent; nothing loads or connects until start().

        Args:
            config: the settings.
            dataset: local samples held in memory (simulation); None reads `config.data` on
                start(): labels only, the samples in batches whenever features are computed.
            network: a shared network loop (simulation); None gives the agent its own.
            feature_cache: a shared cache; None uses `config.state_dir`/features or memory.

        Raises:
            ValueError: an invalid setting.
        """
        config.check()
        self.config = config
        self.auth = config.auth or AgentAuth.insecure()
        self.profile = load_profile(config.profile) if config.profile else None
        self.threads = config.threads or (self.profile.threads if self.profile else 1)
        self.dataset = dataset
        # Data on disk: only labels are held; features are computed from batches read from it.
        # None on a fresh board whose data folder is still empty; looked at again each heartbeat.
        self.source: DataSource | None = None
        self._data: BoardData | None = None
        # The latest rounds only: an agent runs for months, and the status needs just the last.
        self.outcomes: deque[RoundOutcome] = deque(maxlen=KEPT_OUTCOMES)
        self.bundle: ModelBundle | None = None
        self._features: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._global: Weights | None = None
        self._personal: Weights | None = None
        self._personal_file = PersonalHeadFile(config.state_dir, config.task)
        self._feedback = ErrorFeedback()
        # The backbone in use, its runner held so the process-wide registry keeps it.
        self._backbone = BoardBackbone(config.runtime, self.profile, self.threads)
        # Updates sent for recent tasks, re-sent as they are when the same task is seen again
        # (after a broker or aggregator restart): the aggregator treats identical bytes as a
        # re-delivery. Keyed by the task's identity, never by round number alone.
        self._sent: OrderedDict[TaskKey, bytes] = OrderedDict()
        self._training: set[TaskKey] = set()  # tasks on the training pool now
        self._lock = threading.RLock()
        self._train_lock = threading.RLock()  # one round trains at a time on a board
        self._stopped = threading.Event()
        self._heartbeat: TimerHandle | None = None
        self._connected_at = 0.0  # when the current connection was opened (`_will`)
        self._status_topic = topics.device_status(config.fleet, config.device_id)
        cache_dir = config.state_dir / "features" if config.state_dir else None
        self.features_cache = feature_cache or FeatureCache(cache_dir)
        self.client = open_client(
            config.broker_url,
            client_id=f"edgefl-{config.fleet}-{config.device_id}",
            network=network,
            will=self._will,
            persistent_session=True,
            max_payload_bytes=AGENT_MAX_PAYLOAD,
            tls=config.tls,
        )
        # What became of each update: read from the result of the round it answered.
        self.reads_results = True
        self._results = ResultWatch(
            config.device_id,
            lambda topic: self.client.subscribe(topic, self._results.receive),
            self.client.unsubscribe,
            self._record_answer,
            keep=RESENT_ROUNDS,
            open_payload=self.auth.open,
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
        """Also deliver messages matching `topic_filter` to `handler` (on the network thread):
        the delivery role registers its deploy and chunk handlers here."""
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
                self._data = BoardData(Path(self.config.data))
                self._data.look(self._take_source)
        self._personal = self._personal_file.load()
        if self.config.bundle_dir is not None:
            self.install_bundle(load_bundle(self.config.bundle_dir))
        if self.auth.is_insecure:
            log.warning("%s: insecure: nothing is signed, every task is believed", self.device_id)
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
            offline = self._status_bytes("offline")
            handle = self.client.publish(self._status_topic, offline, qos=1, retain=True)
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
        spec = self.bundle.head_spec(self.config.task)  # its output operations run too
        return head_forward(spec.layers, head, features, spec.outputs).argmax(axis=1)

    # -- the bundle hook (delivery plugs signed, chunked deploys in here) --

    def install_bundle(self, bundle: ModelBundle) -> None:
        """Make `bundle` the one this agent runs: pick the backbone, compute or load features.

        Raises:
            BundleError: the bundle has no head for this device's task or no usable backbone.
            DataError: the local data does not fit the backbone's input.
        """
        spec = bundle.head_spec(self.config.task)
        with self._lock:
            previous, previous_backbone = self.bundle, self._backbone.loaded
            self.bundle = bundle
            try:
                features: np.ndarray | None = None
                if self.dataset is not None:
                    self.dataset = conform(self.dataset, bundle.manifest.input.shape)
                    features, labels = self._compute_features(self.dataset.X), self.dataset.y
                elif self.source is not None:
                    features, labels = self._source_features(bundle, self.source), self.source.y
                if features is not None:
                    if features.shape[1] != spec.in_features:
                        raise BundleError(
                            f"backbone gives {features.shape[1]} features but head "
                            f"{self.config.task!r} takes {spec.in_features}"
                        )
                    self._features, self._labels = features, labels
                elif self.backbone is not None:
                    self._backbone.load(bundle)  # no data yet: loaded to check it and say what runs
            except BaseException:
                self.bundle, self._backbone.loaded = previous, previous_backbone
                raise
            self._global = bundle.head_weights(self.config.task)
            if previous is None or previous.digest != bundle.digest:
                # A new object, not reset(): a round training now keeps the one it started with.
                self._feedback = ErrorFeedback()
                if self._personal is not None and not same_shapes(self._personal, self._global):
                    self._personal = None
        if self.client.connected:
            self._announce()
        log.info("%s: running bundle %s v%d: %s", self.device_id, bundle.manifest.name,
                 self.model_version, describe(self._backbone.running))  # fmt: skip

    @property
    def backbone(self) -> Artifact | None:
        """The backbone artifact this agent runs from its bundle (None without a bundle)."""
        return self._backbone.select(self.bundle) if self.bundle is not None else None

    def _compute_features(self, x: np.ndarray, cache: bool = True) -> np.ndarray:
        assert self.bundle is not None
        loaded = self._backbone.load(self.bundle)
        if not cache:
            return run_backbone(loaded.runner, x, loaded.lock)
        return self.features_cache.features(loaded.artifact.sha256, x, loaded.runner, loaded.lock)

    # -- the data on disk --

    def refresh_data(self) -> bool:
        """Look at the data on disk again and use the samples added, removed or changed since.

        Features are computed only for images not seen before (`FeatureCache` keeps one entry
        per image); the status then says how many samples there are. Unusable data is logged
        and left out until it changes again. Returns whether the samples in use changed.
        """
        if self._data is None:
            return False
        with self._lock:
            bundle = self.bundle

        def use(source: DataSource | None) -> bool:
            features = None if source is None else self._source_features(bundle, source)
            with self._lock:
                if self.bundle is not bundle:
                    return False  # a deploy came meanwhile: offered again at the next look
                self.source, self._features = source, features
                self._labels = None if source is None else source.y
            return True

        try:
            if not self._data.look(use):
                return False
        except EdgeflError as exc:
            log.warning("%s: cannot use the data in %s: %s", self.device_id, self._data.path, exc)
            return False
        log.info("%s: %d samples in %s", self.device_id, self.samples, self._data.path)
        if self.client.connected:
            self._announce()
        return True

    def _source_features(self, bundle: ModelBundle | None, source: DataSource) -> np.ndarray | None:
        if bundle is None:
            return None
        with self._lock:
            loaded = self._backbone.load(bundle)
        return self.features_cache.source_features(
            loaded.artifact.sha256, source, bundle.manifest.input, loaded.runner, loaded.lock
        )

    def _take_source(self, source: DataSource | None) -> bool:
        self.source = source
        if source is None:
            log.info("%s: no data in %s yet: online with 0 samples, so not selected for rounds",
                     self.device_id, self.config.data)  # fmt: skip
        return True

    def _look_at_data(self) -> None:
        # A round training now looks at the data itself when it starts; skip rather than wait.
        if self._train_lock.acquire(blocking=False):
            try:
                self.refresh_data()
            finally:
                self._train_lock.release()

    # -- status --

    def _status_bytes(self, state: str) -> bytes:
        status = board_status(
            self.config, state, self.samples, self.model_version,
            max((o.round for o in self.outcomes), default=0),
            self.bundle.digest if self.bundle is not None else "", self._backbone.running,
            self._connected_at,
        )  # fmt: skip
        return self.auth.seal(self._status_topic, status.encode())

    def _will(self) -> Will:
        """The last will of the connection about to be opened, stamped with its start."""
        self._connected_at = time.time()
        return Will(self._status_topic, self._status_bytes("offline"), qos=1, retain=True)

    def _announce(self) -> None:
        if not self._stopped.is_set():
            self.client.publish(self._status_topic, self._status_bytes("online"), 1, retain=True)

    def _schedule_heartbeat(self) -> None:
        def beat() -> None:
            if self._stopped.is_set():
                return
            if self.client.connected:
                self._announce()
            if self._data is not None:
                run_in_pool(self._look_at_data, f"{self.device_id}: data folder")
            self._heartbeat = self.client.network.call_later(self.config.heartbeat_s, beat)

        self._heartbeat = self.client.network.call_later(self.config.heartbeat_s, beat)

    # -- rounds --

    def _on_task(self, message: Message) -> None:
        if not message.payload:
            return  # a cleared retained task: the round closed
        try:
            task, heads = self.open_task(message)
        except (MessageError, SealError) as exc:
            log.warning("%s: ignoring bad task on %s: %s", self.device_id, message.topic, exc)
            return
        if self.config.device_id in task.selected:
            self.handle_task(task, heads)

    def open_task(self, message: Message) -> tuple[RoundTask, dict[str, Weights]]:
        """Verify and decode a task (SealError, MessageError); simulated boards share the work."""
        return decode_round_task(self.auth.open(message.topic, message.payload))

    def handle_task(self, task: RoundTask, heads: dict[str, Weights]) -> None:
        """Answer a task this device was selected for: `answer` it, then `publish_update`.

        Runs on the network thread and returns at once; the answer is computed on the training
        pool. A subclass may skip the round or publish another way (the simulation's dropouts
        and slow devices, `edgefl.simulation.simulated_agent`).
        """
        self.answer_in_background(task, heads, self.publish_update)

    def answer_in_background(
        self, task: RoundTask, heads: dict[str, Weights], then: Callable[[RoundTask, bytes], None]
    ) -> None:
        """Compute the answer to `task` on the training pool, then call `then(task, payload)`.

        The answer already sent for the same task is passed on at once; a task on the pool (a
        re-delivered retained task) is not trained twice, nor one that waited while a newer task
        of its run came (async mode: one per head version). Nothing goes once the agent stopped.
        """
        key = task_key(task, heads)
        with self._lock:
            sent = self._sent.get(key)
            if sent is None:
                if key in self._training:
                    return  # its answer goes out when that training ends
                self._training.add(key)
        if sent is not None:
            then(task, sent)
            return

        def work() -> None:
            try:
                with self._train_lock:  # answer() takes it again: the check and training are one
                    with self._lock:
                        known = (*self._training, *self._sent)  # waiting, or trained already
                        newer = any(k[0] == key[0] and k[1] > key[1] for k in known)
                    payload = None if newer else self.answer(task, heads)
            finally:
                with self._lock:
                    self._training.discard(key)
            if payload is not None and not self._stopped.is_set():
                then(task, payload)

        run_in_pool(work, f"{self.device_id}: round {task.round}")

    def answer(self, task: RoundTask, heads: dict[str, Weights]) -> bytes:
        """Return the update for `task`: the one already sent for the same task, or a new one.

        Blocks while it trains (call it off the network thread). A new answer comes from
        `edgefl.core.local_round.run_local_round` (failures are error updates); its outcome is
        appended to `outcomes`, and the personal head kept and saved when it is not worse.
        """
        key = task_key(task, heads)
        with self._train_lock:
            self.refresh_data()
            with self._lock:
                sent = self._sent.get(key)
                if sent is not None:
                    return sent
                bundle, feedback, personal = self.bundle, self._feedback, self._personal
                data = None
                if self._features is not None and self._labels is not None:
                    data = LocalData(self._features, self._labels)
            result = run_local_round(
                task,
                heads,
                data,
                bundle.head_spec(self.config.task).layers if bundle is not None else None,
                bundle.manifest.version if bundle is not None else 0,
                self.config.board_settings(self.profile.limits if self.profile else None),
                feedback,
                clock=time.perf_counter,
                noise_rng=np.random.default_rng(),  # fresh OS entropy for each round's noise
                bundle_digest=bundle.digest if bundle is not None else "",
                personal=personal,
                cancelled=self._stopped.is_set,
            )
            if result.limited:
                log.warning("%s: round %d asked beyond this board's limits: %s",
                            self.device_id, task.round, "; ".join(result.limited))  # fmt: skip
            with self._lock:
                if result.outcome.status == "ok":
                    self._global = heads[self.config.task]
                else:
                    log.warning("%s: round %d failed: %s: %s", self.device_id, task.round,
                                result.outcome.error_code, result.reason)  # fmt: skip
                if result.trained is not None and self.bundle is bundle:
                    self._personal = result.trained
                    self._personal_file.save(result.trained)
                self._sent[key] = result.payload
                while len(self._sent) > RESENT_ROUNDS:
                    self._sent.popitem(last=False)
                self.outcomes.append(result.outcome)
            return result.payload

    def publish_update(self, task: RoundTask, payload: bytes) -> None:
        """Publish an update on its round's topic (QoS 1) and listen for the round's result."""
        if self.reads_results:
            self._results.expect(topics.round_result(self.config.fleet, task.round), task.run_id)
        topic = topics.round_update(self.config.fleet, task.round, self.config.device_id)
        self.client.publish(topic, self.auth.seal_update(topic, payload, task.mac_key), qos=1)

    def _record_answer(self, round_number: int, run_id: str, answer: str, reason: str) -> None:
        with self._lock:
            for outcome in reversed(self.outcomes):
                if (outcome.round, outcome.run_id) == (round_number, run_id):
                    outcome.answer, outcome.answer_reason = answer, reason
                    return
