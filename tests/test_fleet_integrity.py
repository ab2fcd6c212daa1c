"""A federation that stays correct on a long-lived, mixed fleet (issue 9): run and bundle identity,
answers that close rounds at once, crash-consistent closing, and bounded influence."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker

from edgefl.bundle import ModelBundle
from edgefl.core.codecs import encode_delta
from edgefl.core.rounds import ACCEPTED, RoundEngine
from edgefl.core.settings import RoundPolicy, TrainConfig
from edgefl.core.strategies import build_strategies
from edgefl.core.training import train_head
from edgefl.head import Weights, head_accuracy, init_head
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.roles.record import AggregatorRecord
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    UpdateHeader,
    decode_round_task,
    update_metadata,
)

LAYERS = [{"kind": "linear", "in": 64, "out": 10}]


# -- bounded influence on FL-digits, through the round engine (no broker) --


def _federate(forged: str | None, rounds: int = 30, devices: int = 10) -> float:
    """FedAvg on FL-digits pixels (/16) with a linear head; `forged` adds a device "evil"
    that sends values of 1e30, or noise claiming 1e15 samples."""
    data, test = digits_devices(devices)
    heads = {"default": init_head(LAYERS, seed=0)}
    engine = RoundEngine(heads, 0, build_strategies("fedavg", {}, heads), "B", run_id="r")
    ids = [f"d{i}" for i in range(devices)] + (["evil"] if forged else [])
    for device in ids:  # the forger announces as many samples as an honest device
        samples = len(data[0].y) if device == "evil" else len(data[int(device[1:])].y)
        engine.observe_status(DeviceStatus(device, "online", samples=samples, bundle_digest="B"), 1)
    train = TrainConfig(epochs=5, lr=0.5)
    rng = np.random.default_rng(0)
    for number in range(1, rounds + 1):
        opened = engine.open_round(number, 1.0)
        head = engine.heads["default"]
        for device in ids:
            delta: Weights
            if device == "evil" and forged == "values":
                delta, samples = (
                    {k: np.full(v.shape, 1e30, np.float32) for k, v in head.items()},
                    88,
                )
            elif device == "evil":  # noise of an honest update's norm; only the claim is forged
                noise = {k: rng.standard_normal(v.shape) for k, v in head.items()}
                scale = 0.1 / np.sqrt(sum(float((n * n).sum()) for n in noise.values()))
                delta = {k: (n * scale).astype(np.float32) for k, n in noise.items()}
                samples = 10**15
            else:
                local = data[int(device[1:])]
                trained = train_head(LAYERS, head, local.X / 16, local.y, train).weights
                delta, samples = {k: trained[k] - head[k] for k in head}, len(local.y)
            header = UpdateHeader(number, device, "default", samples, opened.head_version,
                                  run_id="r", head_digest=opened.head_digest,
                                  bundle_digest="B")  # fmt: skip
            payload = encode_delta(delta, "float32", metadata=update_metadata(header))
            assert engine.receive(number, device, payload).outcome == ACCEPTED
        closed = engine.close_round()
        if forged:
            assert closed.metrics["clipped"] + closed.metrics["capped"] >= 1
    return head_accuracy(LAYERS, engine.heads["default"], test.X / 16, test.y)


def test_one_forged_update_moves_fl_digits_accuracy_by_at_most_one_point() -> None:
    honest = _federate(None)
    assert honest > 0.8
    for forged in ("values", "samples"):
        assert abs(_federate(forged) - honest) <= 0.01, forged


# -- over a real Mosquitto --


class Scripted:
    """Raw MQTT devices: announce a bundle digest and answer each task with scripted deltas
    (echoing the task's run, head and bundle digests)."""

    def __init__(self, url: str, fleet: str, ids: dict[str, str], answer) -> None:  # type: ignore[no-untyped-def]
        self.fleet, self.ids, self.answer = fleet, ids, answer  # ids: device -> bundle digest
        self.client = MqttClient(url, f"scripted-{fleet}")
        self.client.subscribe(topics.all_tasks(fleet), self._on_task)
        self.last_sent = 0.0

    def start(self) -> None:
        self.client.connect()
        for device, digest in self.ids.items():
            status = DeviceStatus(device, "online", samples=10, bundle_digest=digest)
            topic = topics.device_status(self.fleet, device)
            self.client.publish(topic, status.encode(), retain=True).wait(5)

    def stop(self) -> None:
        for device in self.ids:
            self.client.publish(topics.device_status(self.fleet, device), b"", retain=True).wait(5)
        self.client.close()

    def _on_task(self, message: Message) -> None:
        if not message.payload:
            return
        task, heads = decode_round_task(message.payload)
        for device in task.selected:
            if device not in self.ids:
                continue
            delta = self.answer(device, heads["default"])
            header = UpdateHeader(task.round, device, "default", 10, task.head_version,
                                  run_id=task.run_id, head_digest=task.head_digest,
                                  bundle_digest=task.bundle_digest)  # fmt: skip
            payload = encode_delta(delta, "float32", metadata=update_metadata(header))
            self.last_sent = time.time()
            self.client.publish(topics.round_update(self.fleet, task.round, device), payload)


def _step(device: str, head: Weights) -> Weights:
    if device == "bad":
        return {k: np.zeros((3, 3), np.float32) for k in head}  # rejected: wrong shape
    value = {"a": 0.1, "b": 0.3, "c": -0.2}[device]
    return {k: np.full(v.shape, value, np.float32) for k, v in head.items()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "b", feature_size=16)


def test_a_rejected_answer_closes_the_round_within_a_second_of_the_last_answer(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    fakes = Scripted(mosquitto.url, "answers", {"a": bundle.digest, "bad": bundle.digest}, _step)
    fakes.start()
    policy = RoundPolicy(rounds=1, min_devices=2, deadline_s=30, settle_s=0.2)
    state_path = tmp_path / "state.sqlite"
    config = AggregatorConfig(mosquitto.url, "answers", bundle.path, policy, state_path=state_path)
    try:
        summary = Aggregator(config).run()
    finally:
        fakes.stop()
    (only,) = summary.rounds
    assert (only.status, only.accepted, only.rejected) == ("closed", 1, {"shape": 1})
    state = AggregatorRecord(state_path)
    (stored,) = state.rounds()
    state.close()
    assert stored.closed is not None
    latency = stored.closed - fakes.last_sent
    print(f"round closed {latency * 1000:.0f} ms after the last answer")
    assert latency < 1.0
    assert stored.result is not None and stored.result["answers"] == {"a": "accepted",
                                                                      "bad": "shape"}  # fmt: skip


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["heads", "strategy", "round", "metrics", "commit"])
def test_a_crash_at_each_step_of_closing_a_round_resumes_to_the_same_heads(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path, step: str
) -> None:
    fleet = f"crash-{step}"
    fakes = Scripted(mosquitto.url, fleet, {d: bundle.digest for d in "abc"}, _step)
    fakes.start()
    policy = RoundPolicy(rounds=2, min_devices=3, deadline_s=30, settle_s=0.2)
    crashed_at: list[int] = []

    def fault(at: str) -> None:
        if at == step and not crashed_at:
            crashed_at.append(1)
            raise Crash(at)

    def config(name: str) -> AggregatorConfig:
        return AggregatorConfig(mosquitto.url, fleet, bundle.path, policy,
                                strategy="fedadam", state_path=tmp_path / name)  # fmt: skip

    try:
        clean = Aggregator(config("clean.sqlite"))
        clean.run()
        crashing = Aggregator(config("state.sqlite"), fault=fault)
        with pytest.raises(Crash):
            crashing.run()
        crashing.state.close()
        resumed = Aggregator(config("state.sqlite"))
        summary = resumed.run()
    finally:
        fakes.stop()
    assert [r.round for r in summary.rounds] == [1, 2]  # round 1 resumed, then round 2
    assert resumed.head_version == clean.head_version == 2
    for key, value in clean.heads["default"].items():
        np.testing.assert_allclose(resumed.heads["default"][key], value, rtol=1e-6)
    state = AggregatorRecord(tmp_path / "state.sqlite")
    assert [v for _, v, _ in state.head_versions()] == [0, 1, 2]  # each round applied once
    assert [len(state.accepted_updates(n)) for n in (1, 2)] == [3, 3]
    state.close()


def test_two_runs_with_long_lived_agents_and_a_board_on_another_bundle(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    fleet = "two-runs"
    other = make_test_bundle(tmp_path / "other", feature_size=16, seed=7)  # same version 1
    assert other.manifest.version == bundle.manifest.version and other.digest != bundle.digest
    data, _ = digits_devices(3)
    agents = [
        Agent(AgentConfig(mosquitto.url, fleet, device, bundle_dir=path, heartbeat_s=1.0), dataset)
        for device, path, dataset in zip(
            ("pi-0", "pi-1", "pi-other"), (bundle.path, bundle.path, other.path), data, strict=True
        )
    ]
    for agent in agents:
        agent.start()
    huge = lambda _, head: {k: np.full(v.shape, 1e30, np.float32) for k, v in head.items()}  # noqa: E731
    forger = Scripted(mosquitto.url, fleet, {"pi-forged": bundle.digest}, huge)
    forger.start()
    policy = RoundPolicy(rounds=2, min_devices=3, deadline_s=30, settle_s=0.5)
    accepted: list[set[str]] = []
    try:
        for run in (1, 2):
            state_path = tmp_path / f"run-{run}.sqlite"
            aggregator = Aggregator(AggregatorConfig(mosquitto.url, fleet, bundle.path, policy,
                                                     state_path=state_path))  # fmt: skip
            summary = aggregator.run()
            assert [(r.status, r.selected, r.accepted) for r in summary.rounds] == [
                ("closed", 3, 3), ("closed", 3, 3),
            ]  # fmt: skip
            assert all(r.metrics["clipped"] >= 1 for r in summary.rounds)  # the forger's
            assert np.isfinite(aggregator.heads["default"]["0.weight"]).all()
            assert float(np.abs(aggregator.heads["default"]["0.weight"]).max()) < 10
            state = AggregatorRecord(state_path)
            rounds = state.rounds()
            assert all("pi-other" not in r.selected for r in rounds)
            accepted.append({u.sha256 for n in (1, 2) for u in state.accepted_updates(n)})
            state.close()
    finally:
        forger.stop()
        for agent in agents:
            agent.stop()
    assert len(accepted[0]) == len(accepted[1]) == 6
    assert not accepted[0] & accepted[1]  # nothing of run 1 accepted in run 2
