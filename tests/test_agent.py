"""The device agent over a real Mosquitto: status, features, personalization, errors, restarts."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundles import digits_devices, make_test_bundle, write_npz
from conftest import RunningBroker, wait_for

from edgefl.bundle import ModelBundle
from edgefl.core.board_limits import BoardLimits
from edgefl.core.codecs import decode_delta
from edgefl.core.privacy import global_norm
from edgefl.core.settings import PrivacySettings, RoundPolicy, RoundSettings, TrainConfig
from edgefl.head import Weights, head_digest
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.transport import presence, topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    RoundTask,
    encode_round_task,
    read_update_header,
)

FLEET = "lab"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "b", feature_size=16)


def test_status_is_retained_with_capabilities_and_the_will_says_offline(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(4)
    agent = Agent(
        AgentConfig(mosquitto.url, FLEET, "pi-status", bundle_dir=bundle.path), devices[0]
    )
    agent.start()
    statuses: list[DeviceStatus] = []
    watcher = MqttClient(mosquitto.url, "status-watcher")
    watcher.subscribe(
        topics.device_status(FLEET, "pi-status"),
        lambda m: statuses.append(DeviceStatus.decode(m.payload)) if m.payload else None,
    )
    watcher.connect()
    try:
        assert wait_for(lambda: bool(statuses))
        status = statuses[-1]
        assert (status.state, status.samples, status.model_version) == (
            "online",
            len(devices[0]),
            1,
        )
        assert "onnx" in status.runtimes and status.arch and status.memory_mb > 0
        agent.stop()
        assert wait_for(lambda: statuses[-1].state == "offline")
    finally:
        agent.stop()
        watcher.close()


def test_features_are_cached_on_disk_by_backbone_hash(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    devices, _ = digits_devices(4)
    config = AgentConfig(
        mosquitto.url, FLEET, "pi-cache", bundle_dir=bundle.path, state_dir=tmp_path
    )
    first = Agent(config, devices[1])
    first.start()
    first.stop()
    sha = bundle.manifest.select_backbone().sha256
    files = list((tmp_path / "features").glob("features-*.npy"))
    assert [f.name.startswith(f"features-{sha[:32]}") for f in files] == [True]
    assert (first.features_cache.misses, first.features_cache.hits) == (1, 0)
    second = Agent(config, devices[1])
    second.start()
    second.stop()
    assert (second.features_cache.misses, second.features_cache.hits) == (0, 1)
    cached = np.load(files[0])
    assert cached.shape == (len(devices[1]), 16)


def test_a_task_the_agent_cannot_do_is_answered_with_an_error_code(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(4)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-old", bundle_dir=bundle.path), devices[2])
    agent.start()
    answers: list[Message] = []
    client = MqttClient(mosquitto.url, "task-sender")
    client.subscribe(topics.round_update(FLEET, 7, "pi-old"), answers.append)
    client.connect()
    try:
        task = RoundTask(7, ["pi-old"], ["default"], 0, model_version=99, deadline_s=60.0)
        client.publish(topics.round_task(FLEET, 7), encode_round_task(task, {})).wait(5)
        assert wait_for(lambda: bool(answers))
        header = read_update_header(answers[0].payload)
        assert (header.status, header.error_code) == ("error", "model-version")
        assert "device runs v1" in header.reason
    finally:
        client.close()
        agent.stop()


def test_personal_head_fits_local_data_better_than_the_global_one(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    devices, test = digits_devices(2)
    agent = Agent(
        AgentConfig(
            mosquitto.url, FLEET, "pi-personal", bundle_dir=bundle.path, state_dir=tmp_path
        ),
        devices[0],
    )
    agent.start()
    try:
        Aggregator(
            AggregatorConfig(
                mosquitto.url,
                FLEET,
                bundle.path,
                RoundPolicy(rounds=2),
                RoundSettings(train=TrainConfig(epochs=2)),
            )
        ).run()
    finally:
        agent.stop()
    first, second = agent.outcomes
    assert first.metrics["personal_accuracy"] > first.metrics["global_accuracy"]
    assert second.metrics["global_accuracy"] > first.metrics["global_accuracy"]
    assert (tmp_path / "personal-default.safetensors").is_file()
    predictions = agent.predict(test.X)
    assert (predictions == test.y).mean() > 0.3  # chance is 0.1


class _HeldAgent(Agent):
    """An agent whose answer is held until released, to stop the broker in between."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.training = threading.Event()
        self.release = threading.Event()

    def answer(self, task: RoundTask, heads: dict[str, Weights]) -> bytes:
        self.training.set()
        self.release.wait(30)
        return super().answer(task, heads)


@pytest.mark.slow
def test_update_is_delivered_across_a_broker_restart(
    fresh_mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(2)
    agent = _HeldAgent(
        AgentConfig(fresh_mosquitto.url, FLEET, "pi-restart", bundle_dir=bundle.path), devices[0]
    )
    agent.start()
    result: list[object] = []
    aggregator = Aggregator(
        AggregatorConfig(
            fresh_mosquitto.url, FLEET, bundle.path, RoundPolicy(rounds=2, deadline_s=30)
        )
    )
    thread = threading.Thread(target=lambda: result.append(aggregator.run()))
    thread.start()
    try:
        assert agent.training.wait(20)
        fresh_mosquitto.stop()
        agent.release.set()  # the update is published while the broker is down
        time.sleep(0.5)
        fresh_mosquitto.start()
        thread.join(60)
    finally:
        agent.release.set()
        agent.stop()
    (summary,) = result
    rounds = summary.rounds  # type: ignore[attr-defined]
    assert [(r.status, r.accepted) for r in rounds] == [("closed", 1), ("closed", 1)]


def test_image_features_are_computed_in_small_batches_with_the_same_result(
    tmp_path: Path,
) -> None:
    # A batch of 64 ImageNet-sized inputs made MobileNetV2 hold ~480 MB of activations; batches
    # are sized by bytes so a board stays within its memory (benchmarks/agent_memory.py).
    from onnx import TensorProto, helper, numpy_helper

    from edgefl.roles.features import feature_batch_size, run_backbone
    from edgefl.runtime import load_backbone

    assert feature_batch_size(np.zeros((1000, 64), np.float32)) == 256  # digits: unchanged
    assert feature_batch_size(np.zeros((64, 3, 224, 224), np.float32)) == 3
    assert feature_batch_size(np.zeros((2, 3, 2048, 2048), np.float32)) == 1

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3 * 224 * 224, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["f"]),
        ],
        "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "backbone.onnx").write_bytes(model.SerializeToString())
    runner = load_backbone(tmp_path / "backbone.onnx")
    x = rng.standard_normal((7, 3, 224, 224), dtype=np.float32)
    features = run_backbone(runner, x)  # batches of 3, 3 and 1
    assert features.shape == (7, 4)
    np.testing.assert_allclose(features, x.reshape(7, -1) @ weight, rtol=1e-4, atol=1e-3)


def _arrays_held(agent: Agent) -> list[tuple[str, int]]:
    """(name, size) of every array the agent holds directly or one object deep."""
    held = []
    for name, value in vars(agent).items():
        for sub, item in [(name, value), *((f"{name}.{k}", v) for k, v in _fields(value))]:
            if isinstance(item, np.ndarray):
                held.append((sub, int(item.size)))
    return held


def _fields(value: object) -> list[tuple[str, object]]:
    return list(vars(value).items()) if hasattr(value, "__dict__") else []


def test_an_agent_reading_from_disk_holds_features_not_samples_and_recomputes_per_backbone(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    # Holding the raw images took a board past 250 MB near 150 photos (benchmarks/RESULTS.md):
    # the agent keeps labels and features, and reads the samples again for a new backbone.
    from edgefl.roles.features import run_backbone
    from edgefl.runtime import load_backbone

    devices, _ = digits_devices(4)
    data = write_npz(devices[3], tmp_path / "local.npz")
    state = tmp_path / "state"
    config = AgentConfig(
        mosquitto.url, FLEET, "pi-disk", data=str(data), bundle_dir=bundle.path, state_dir=state
    )
    agent = Agent(config)
    agent.start()
    try:
        assert agent.samples == len(devices[3])
        raw_size = devices[3].X.size
        assert [(n, size) for n, size in _arrays_held(agent) if size >= raw_size] == []

        newer = make_test_bundle(tmp_path / "v2", version=2, feature_size=16, seed=5)
        agent.install_bundle(newer)  # what an over-the-air deploy calls
        assert agent.model_version == 2 and agent.features_cache.misses == 2
        assert [(n, size) for n, size in _arrays_held(agent) if size >= raw_size] == []
        for installed in (bundle, newer):
            artifact = installed.manifest.select_backbone()
            (file,) = (state / "features").glob(f"features-{artifact.sha256[:32]}-*.npy")
            expected = run_backbone(load_backbone(installed.file(artifact)), devices[3].X)
            np.testing.assert_allclose(np.load(file), expected, rtol=1e-5, atol=1e-5)
        assert agent.predict(devices[3].X[:5]).shape == (5,)
    finally:
        agent.stop()


def test_the_boards_own_clip_bound_reaches_the_wire(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    # The numbers of clipping and noise are tested in tests/core/test_local_round.py; this is
    # the agent passing its own settings and the task's to that function.
    devices, _ = digits_devices(2)
    config = AgentConfig(
        mosquitto.url, FLEET, "pi-own", bundle_dir=bundle.path,
        privacy=PrivacySettings(clip_norm=0.2),
    )  # fmt: skip
    agent = Agent(config, devices[0])
    agent.start()
    answers: list[Message] = []
    client = MqttClient(mosquitto.url, "sender-own")
    client.subscribe(topics.round_update(FLEET, 1, "pi-own"), answers.append)
    client.connect()
    try:
        settings = RoundSettings(TrainConfig(epochs=3), PrivacySettings(clip_norm=0.5))
        task = RoundTask(1, ["pi-own"], ["default"], 1, model_version=1,
                         deadline_s=60.0, config=settings.to_wire())  # fmt: skip
        heads = {"default": bundle.head_weights()}
        client.publish(topics.round_task(FLEET, 1), encode_round_task(task, heads)).wait(5)
        assert wait_for(lambda: bool(answers))
    finally:
        client.close()
        agent.stop()
    delta = decode_delta(answers[0].payload)[0]
    assert global_norm(delta) == pytest.approx(0.2, rel=1e-4)
    (outcome,) = agent.outcomes
    assert (outcome.round, outcome.status, outcome.bytes_sent) == (1, "ok", len(answers[0].payload))


# -- issue 9: identity of tasks and answers, the board's limits, its personal head, its outcome


class _TaskSender:
    """Publishes tasks to one device and collects its updates and statuses, as they arrive."""

    def __init__(self, url: str, device: str) -> None:
        self.device = device
        self.updates: list[bytes] = []
        self.statuses: list[tuple[float, DeviceStatus]] = []
        self.client = MqttClient(url, f"sender-{device}")
        self.client.subscribe(f"{topics.fleet_root(FLEET)}/rounds/+/update/{device}",
                              lambda m: self.updates.append(m.payload))  # fmt: skip
        self.client.subscribe(topics.device_status(FLEET, device), self._status)
        self.client.connect()

    def _status(self, message: Message) -> None:
        if message.payload:
            self.statuses.append((time.monotonic(), DeviceStatus.decode(message.payload)))

    def answer(self, task: RoundTask, heads: dict[str, Weights], timeout: float = 20) -> bytes:
        """Publish `task` and return the next update the device sends."""
        count = len(self.updates)
        payload = encode_round_task(task, heads)
        self.client.publish(topics.round_task(FLEET, task.round), payload).wait(5)
        assert wait_for(lambda: len(self.updates) > count, timeout)
        return self.updates[count]


def _task_for(
    bundle: ModelBundle,
    device: str,
    heads: dict[str, Weights],
    round_: int = 1,
    run_id: str = "run-a",
    **train: Any,
) -> RoundTask:
    settings = RoundSettings(TrainConfig(**train))
    return RoundTask(round_, [device], ["default"], 1, model_version=1, deadline_s=60.0,
                     config=settings.to_wire(), run_id=run_id, head_digest=head_digest(heads),
                     bundle_digest=bundle.digest)  # fmt: skip


def test_a_task_with_absurd_epochs_is_bounded_and_heartbeats_go_on_while_it_trains(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(2)
    # The epoch limit set high, so that the time budget is what ends the round.
    limits = BoardLimits(max_epochs=100_000, round_budget_s=3.0)
    config = AgentConfig(mosquitto.url, FLEET, "pi-absurd", bundle_dir=bundle.path,
                         heartbeat_s=0.2, limits=limits)  # fmt: skip
    agent = Agent(config, devices[0])
    agent.start()
    sender = _TaskSender(mosquitto.url, "pi-absurd")
    try:
        heads = {"default": bundle.head_weights()}
        task = _task_for(bundle, "pi-absurd", heads, epochs=30000, batch_size=1)
        started = time.monotonic()
        header = read_update_header(sender.answer(task, heads))
        took = time.monotonic() - started
    finally:
        sender.client.close()
        agent.stop()
    assert header.status == "ok" and header.metrics["limited"] == 1.0
    assert 3.0 <= header.metrics["train_seconds"] < 4.0 and took < 6.0
    beats = [t for t, s in sender.statuses if started < t < started + took]
    gaps = np.diff([started, *beats, started + took])
    print(f"heartbeats while training: {len(beats)}, gaps max {gaps.max():.3f} s, "
          f"mean {gaps.mean():.3f} s over {took:.2f} s")  # fmt: skip
    assert len(beats) >= 10 and gaps.max() < 1.0  # every 0.2 s, never silent for 5 periods
    assert all(s.bundle_digest == bundle.digest for _, s in sender.statuses)


def test_the_stored_answer_is_resent_only_for_the_identical_task(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-runs", bundle_dir=bundle.path),
                  devices[1])  # fmt: skip
    agent.start()
    sender = _TaskSender(mosquitto.url, "pi-runs")
    try:
        first_heads = {"default": bundle.head_weights()}
        later_heads = {"default": {k: v * 0.5 for k, v in bundle.head_weights().items()}}
        first = sender.answer(_task_for(bundle, "pi-runs", first_heads, run_id="run-a"),
                              first_heads)  # fmt: skip
        # A second aggregator run re-uses round 1, with its own run ID and head.
        second = sender.answer(_task_for(bundle, "pi-runs", later_heads, run_id="run-b"),
                               later_heads)  # fmt: skip
        again = sender.answer(_task_for(bundle, "pi-runs", first_heads, run_id="run-a"),
                              first_heads)  # fmt: skip
    finally:
        sender.client.close()
        agent.stop()
    a, b = read_update_header(first), read_update_header(second)
    assert (a.round, b.round) == (1, 1) and (a.run_id, b.run_id) == ("run-a", "run-b")
    assert b.head_digest == head_digest(later_heads) != a.head_digest
    assert (
        decode_delta(first)[0]["0.weight"].tolist() != decode_delta(second)[0]["0.weight"].tolist()
    )
    assert again == first  # the same task: the same bytes, not trained again
    assert [o.run_id for o in agent.outcomes] == ["run-a", "run-b"]


def test_a_task_for_another_bundle_gets_an_error_update_with_its_code(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-other", bundle_dir=bundle.path),
                  devices[1])  # fmt: skip
    agent.start()
    sender = _TaskSender(mosquitto.url, "pi-other")
    try:
        heads = {"default": bundle.head_weights()}
        task = _task_for(bundle, "pi-other", heads)
        task.bundle_digest = "f" * 64  # same version number, another bundle
        header = read_update_header(sender.answer(task, heads))
    finally:
        sender.client.close()
        agent.stop()
    assert (header.status, header.error_code, header.bundle_digest) == (
        "error", "bundle-digest", "f" * 64,
    )  # fmt: skip


def test_zero_epochs_do_not_replace_a_good_personal_head(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    devices, _ = digits_devices(2)
    config = AgentConfig(mosquitto.url, FLEET, "pi-keep", bundle_dir=bundle.path,
                         state_dir=tmp_path)  # fmt: skip
    agent = Agent(config, devices[0])
    agent.start()
    sender = _TaskSender(mosquitto.url, "pi-keep")
    local = devices[0]
    try:
        heads = {"default": bundle.head_weights()}
        untrained = (agent.predict(local.X) == local.y).mean()
        sender.answer(_task_for(bundle, "pi-keep", heads, round_=1, epochs=20, lr=0.5), heads)
        good = (agent.predict(local.X) == local.y).mean()
        saved = (tmp_path / "personal-default.safetensors").read_bytes()
        sender.answer(_task_for(bundle, "pi-keep", heads, round_=2, epochs=0), heads)
        after = (agent.predict(local.X) == local.y).mean()
    finally:
        sender.client.close()
        agent.stop()
    print(f"local accuracy: untrained {untrained:.3f}, trained {good:.3f}, "
          f"after epochs=0 {after:.3f}")  # fmt: skip
    assert good > untrained + 0.3
    assert after == good and (tmp_path / "personal-default.safetensors").read_bytes() == saved


def test_the_device_reads_its_answer_from_the_result_of_its_own_run(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-told", bundle_dir=bundle.path),
                  devices[1])  # fmt: skip
    agent.start()
    sender = _TaskSender(mosquitto.url, "pi-told")
    result_topic = topics.round_result(FLEET, 6)
    try:
        # A retained result of an earlier run with the same round number: not this device's.
        old = RoundResult(6, "closed", 3, 1, 1, run_id="run-old", answers={"pi-told": "accepted"})
        sender.client.publish(result_topic, old.encode(), retain=True).wait(5)
        heads = {"default": bundle.head_weights()}
        sender.answer(_task_for(bundle, "pi-told", heads, round_=6, run_id="run-new"), heads)
        time.sleep(0.3)
        (outcome,) = agent.outcomes
        assert outcome.answer == ""  # the earlier run's result was ignored
        new = RoundResult(6, "closed", 3, 1, 0, run_id="run-new", answers={"pi-told": "norm"},
                          reasons={"pi-told": "norm 9.1 above 5"})  # fmt: skip
        sender.client.publish(result_topic, new.encode()).wait(5)
        assert wait_for(lambda: outcome.answer == "norm")
        assert outcome.answer_reason == "norm 9.1 above 5"
    finally:
        sender.client.publish(result_topic, b"", retain=True).wait(5)
        sender.client.close()
        agent.stop()


def _write_digit_images(folder: Path, dataset: Any, indices: range) -> None:
    """Save samples of `dataset` as 8x8 grayscale PNGs in ImageFolder layout."""
    from PIL import Image

    for i in indices:
        label = folder / dataset.labels[dataset.y[i]]
        label.mkdir(parents=True, exist_ok=True)
        pixels = np.round(dataset.X[i].reshape(8, 8) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(label / f"{i}.png")


def test_a_fresh_board_comes_online_with_no_data_and_trains_once_photos_appear(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    from edgefl.bundle import Preprocess

    gray = Preprocess(scale=1 / 255, grayscale=True)
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16, preprocess=gray)
    devices, _ = digits_devices(4)
    data = tmp_path / "data"
    data.mkdir()  # what install.sh leaves on a new board: an empty folder
    fresh = Agent(
        AgentConfig(mosquitto.url, FLEET, "pi-new", data=str(data), bundle_dir=bundle.path,
                    state_dir=tmp_path / "state", heartbeat_s=0.5, profile="raspberry-pi")
    )  # fmt: skip
    seasoned = Agent(
        AgentConfig(mosquitto.url, FLEET, "pi-old", bundle_dir=bundle.path), devices[0]
    )
    statuses: dict[str, DeviceStatus] = {}
    watcher = MqttClient(mosquitto.url, client_id="fresh-watcher")
    watcher.subscribe(
        topics.device_status(FLEET, "pi-new"),
        lambda m: statuses.update(last=DeviceStatus.decode(m.payload)),
    )
    watcher.connect(timeout=10)

    def one_round() -> tuple[int, int, int]:
        # settle_s: every retained status arrives before the round selects.
        policy = RoundPolicy(rounds=1, min_devices=1, settle_s=1.0, deadline_s=20)
        run = Aggregator(AggregatorConfig(mosquitto.url, FLEET, bundle.path, policy)).run()
        (summary,) = run.rounds
        return summary.online, summary.selected, summary.accepted

    fresh.start()  # an empty data folder used to end the agent here (exit 2, restart loop)
    seasoned.start()
    try:
        assert wait_for(lambda: "last" in statuses and statuses["last"].state == "online")
        status = statuses["last"]
        assert (status.samples, status.model_version) == (0, 1)
        assert (status.artifact, status.runtime, status.provider) == (
            "backbone-fp32.onnx", "onnxruntime", "CPUExecutionProvider",
        )  # fmt: skip
        assert one_round() == (2, 1, 1)  # online, but with 0 samples not selected
        assert len(seasoned.outcomes) == 1 and len(fresh.outcomes) == 0

        _write_digit_images(data, devices[1], range(12))
        assert wait_for(lambda: statuses["last"].samples == 12, timeout=10)
        assert fresh.features_cache.misses == 12
        assert one_round() == (2, 2, 2)  # the next round includes it, and its update counts
        (outcome,) = fresh.outcomes
        assert outcome.status == "ok", outcome.error_code
        assert len(seasoned.outcomes) == 2

        _write_digit_images(data, devices[1], range(12, 15))
        assert wait_for(lambda: statuses["last"].samples == 15, timeout=10)
        assert fresh.features_cache.misses == 15  # only the 3 new images were run
    finally:
        fresh.stop()
        seasoned.stop()
        watcher.close()


def test_the_will_names_its_connection_so_a_late_one_is_told_apart(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    devices, _ = digits_devices(4)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-will", bundle_dir=bundle.path), devices[0])
    statuses: list[DeviceStatus] = []
    watcher = MqttClient(mosquitto.url, "will-watcher")
    watcher.subscribe(
        topics.device_status(FLEET, "pi-will"),
        lambda m: statuses.append(DeviceStatus.decode(m.payload)) if m.payload else None,
    )
    watcher.connect()
    agent.start()
    try:
        assert wait_for(lambda: bool(statuses) and statuses[-1].state == "online")
        first = statuses[-1].connected_at
        assert first > 0
        agent.client._sock.shutdown(socket.SHUT_RDWR)  # the network drops: the broker's will
        assert wait_for(lambda: [s.state for s in statuses[-2:]] == ["offline", "online"])
        will, back = statuses[-2:]
        assert will.connected_at == first < back.connected_at
        # Delivered late, after the board came back, the old will changes nothing.
        assert not presence.supersedes(will, back) and presence.supersedes(back, will)
    finally:
        agent.stop()
        watcher.close()
