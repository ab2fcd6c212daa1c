"""Async (FedBuff) federations over a real Mosquitto: versions per buffer, stale updates refused
with their code, accuracy rising in a sealed simulation, and a killed aggregator resuming."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker, wait_for

from edgefl.bundle import ModelBundle
from edgefl.core.codecs import encode_delta
from edgefl.core.settings import AsyncPolicy, RoundPolicy, RoundSettings, TrainConfig
from edgefl.head import Weights
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import AggregatorConfig
from edgefl.roles.async_aggregator import AsyncAggregator
from edgefl.roles.record import AggregatorRecord
from edgefl.roles.summary import summaries_from_record
from edgefl.simulation.runner import SimulationConfig, run_simulation, save_results
from edgefl.simulation.workload import fl_digits_bundle, load_federated_data
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    update_metadata,
)

FLEET = "async-lab"


def answer(task: RoundTask, device: str, head: Weights, value: float) -> bytes:
    """An update for `task` from `device`: every parameter moved by `value`."""
    header = UpdateHeader(task.round, device, "default", 10, task.head_version,
                          run_id=task.run_id, head_digest=task.head_digest,
                          bundle_digest=task.bundle_digest)  # fmt: skip
    delta = {k: np.full(v.shape, value, np.float32) for k, v in head.items()}
    return encode_delta(delta, "float32", metadata=update_metadata(header))


class ScriptedBoards:
    """Raw MQTT boards: announce themselves, then `script(task, head)` says what to publish."""

    def __init__(
        self, url: str, ids: list[str], script: Callable[[RoundTask, Weights], list]
    ) -> None:
        self.client = MqttClient(url, "async-boards")
        self.ids, self.script = ids, script
        self.client.subscribe(topics.all_tasks(FLEET), self._on_task)

    def start(self, bundle_digest: str) -> None:
        self.client.connect()
        for device in self.ids:
            status = DeviceStatus(device, "online", samples=10, model_version=1,
                                  bundle_digest=bundle_digest)  # fmt: skip
            topic = topics.device_status(FLEET, device)
            self.client.publish(topic, status.encode(), retain=True).wait(5)

    def stop(self) -> None:
        for device in self.ids:
            self.client.publish(topics.device_status(FLEET, device), b"", retain=True).wait(5)
        self.client.close()

    def _on_task(self, message: Message) -> None:
        if message.payload:
            task, heads = decode_round_task(message.payload)
            for topic, payload in self.script(task, heads["default"]):
                self.client.publish(topic, payload, qos=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "b", feature_size=16)


def test_each_buffer_makes_a_version_and_stale_updates_are_refused(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    # "fast" answers every task at once; "slow" answers round 1's task when round 3's arrives
    # (head v2: staleness 2, beyond the bound 1) and round 3's when round 4's arrives (1: taken).
    held: dict[int, tuple[RoundTask, Weights]] = {}

    def script(task: RoundTask, head: Weights) -> list:
        held[task.round] = (task, head)
        out = []
        late = {3: 1, 4: 3}.get(task.round)
        if late is not None:  # published first: one publisher's messages arrive in order
            old, old_head = held[late]
            out.append((topics.round_update(FLEET, late, "slow"),
                        answer(old, "slow", old_head, 0.4)))  # fmt: skip
        out.append(
            (topics.round_update(FLEET, task.round, "fast"), answer(task, "fast", head, 0.1))
        )
        return out

    boards = ScriptedBoards(mosquitto.url, ["fast", "slow"], script)
    boards.start(bundle.digest)
    state_path = tmp_path / "state.sqlite"
    config = AggregatorConfig(
        mosquitto.url, FLEET, bundle.path,
        RoundPolicy(rounds=5, min_devices=2, deadline_s=30, settle_s=0.1),
        state_path=state_path, out_dir=tmp_path / "out",
    )  # fmt: skip
    aggregator = AsyncAggregator(config, AsyncPolicy(buffer=1, max_staleness=1))
    try:
        summary = aggregator.run()
    finally:
        boards.stop()
    # One head version per buffer, every round aggregating.
    assert [(r.round, r.status, r.head_version) for r in summary.rounds] == [
        (n, "closed", n) for n in range(1, 6)
    ]
    record = AggregatorRecord(state_path)
    try:
        rejections = record.rejections()
        (stale,) = [r for r in rejections if r[2] == "stale"]
        assert stale[1] == "slow" and "round 1's head is 2 versions old (bound 1)" in stale[3]
        counted = {r.round: r.rejected for r in summaries_from_record(record)}
        assert counted[stale[0]] == {"stale": 1}
        # Round 3's update from "slow" was one version old: accepted, with its staleness.
        staleness = {
            (u.device_id, u.metrics["trained_round"]): u.metrics["staleness"]
            for number in range(1, 6)
            for u in record.accepted_updates(number)
        }
        assert staleness[("slow", 3.0)] == 1.0 and staleness[("fast", 1.0)] == 0.0
        assert [v for _, v, _ in record.head_versions()] == [0, 1, 2, 3, 4, 5]
    finally:
        record.close()
    assert (tmp_path / "out" / "metrics.json").exists()


def test_the_time_limit_aggregates_the_partial_buffer_and_finishes_the_run(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    def script(task: RoundTask, head: Weights) -> list:
        return [(topics.round_update(FLEET, task.round, "lone"), answer(task, "lone", head, 0.1))]

    boards = ScriptedBoards(mosquitto.url, ["lone"], script)
    boards.start(bundle.digest)
    config = AggregatorConfig(
        mosquitto.url, FLEET, bundle.path, RoundPolicy(rounds=5, deadline_s=60, settle_s=0.1),
        state_path=tmp_path / "state.sqlite",
    )  # fmt: skip
    try:
        summary = AsyncAggregator(config, AsyncPolicy(buffer=5, time_limit_s=1.0)).run()
    finally:
        boards.stop()
    assert summary.stopped == "time limit of 1 s reached"
    (only,) = summary.rounds
    assert (only.status, only.accepted, only.head_version) == ("closed", 1, 1)
    record = AggregatorRecord(tmp_path / "state.sqlite")
    try:
        result = record.rounds()[0].result
        assert result is not None and result["reason"].endswith("with 1 of 5 updates buffered")
        assert record.begin_run("next") == "next"  # the run finished: a new one starts fresh
    finally:
        record.close()


def test_real_agents_federate_asynchronously(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    devices, _ = digits_devices(3)
    agents = [
        Agent(AgentConfig(mosquitto.url, FLEET, f"pi-{i}", bundle_dir=bundle.path), data)
        for i, data in enumerate(devices)
    ]
    for agent in agents:
        agent.start()
    config = AggregatorConfig(
        mosquitto.url, FLEET, bundle.path,
        RoundPolicy(rounds=4, min_devices=3, deadline_s=30, settle_s=0.1),
        state_path=tmp_path / "state.sqlite",
    )  # fmt: skip
    aggregator = AsyncAggregator(config, AsyncPolicy(buffer=2))
    try:
        summary = aggregator.run()
    finally:
        for agent in agents:
            agent.stop()
    assert [(r.status, r.head_version) for r in summary.rounds] == [
        ("closed", n) for n in range(1, 5)
    ]
    assert all(r.accepted >= 2 for r in summary.rounds)
    before = bundle.head_weights("default")["0.weight"]
    assert not np.allclose(aggregator.heads["default"]["0.weight"], before)
    # Every board trained on the newest task it had: none answered a round twice.
    answered = [(agent.device_id, o.round) for agent in agents for o in agent.outcomes]
    assert len(answered) == len(set(answered)) >= 8


def test_a_sealed_async_simulation_learns(mosquitto: RunningBroker, tmp_path: Path) -> None:
    config = SimulationConfig(
        devices=12, policy=RoundPolicy(rounds=10, deadline_s=20.0),
        settings=RoundSettings(train=TrainConfig(seed=0, lr=0.05)), partition="iid",
        speed_spread=4.0, speed_unit_s=0.05, dropout=0.1, fleet="async-sim",
        broker_url=mosquitto.url, asynchronous=AsyncPolicy("async", buffer=8, max_staleness=4),
    )  # fmt: skip
    metrics = run_simulation(config, fl_digits_bundle(), load_federated_data("digits"))
    rounds = metrics.rounds
    assert [r.round for r in rounds] == list(range(1, 11))
    assert all(r.reported >= 8 for r in rounds)  # every version aggregated a full buffer
    # FL-digits moves in steps of a few points up and down; over ten versions it climbs from
    # about 0.45 to about 0.9 (0.05 learning rate: the steadier climb).
    last = [r.accuracy for r in rounds[-3:]]
    assert sum(last) / 3 > rounds[0].accuracy + 0.25 and metrics.final_accuracy > 0.75
    paths = save_results(metrics, tmp_path / "out")
    assert [p.name for p in paths] == ["metrics.json", "metrics.csv", "metrics.png"]


def test_a_killed_async_aggregator_resumes_its_buffer(
    fresh_mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    sent: dict[str, bytes] = {}
    second_may_answer = threading.Event()

    def script(task: RoundTask, head: Weights) -> list:
        # "one" answers round 1 once and re-sends the same bytes to the restarted aggregator
        # (as a real agent does when it sees the same task); "two" only after the kill.
        if task.round != 1:
            return []
        sent.setdefault("one", answer(task, "one", head, 0.2))
        out = [(topics.round_update(FLEET, 1, "one"), sent["one"])]
        if second_may_answer.is_set():
            out.append((topics.round_update(FLEET, 1, "two"), answer(task, "two", head, 0.4)))
        return out

    boards = ScriptedBoards(fresh_mosquitto.url, ["one", "two"], script)
    boards.start(bundle.digest)
    state_path = tmp_path / "state.sqlite"
    command = [
        str(Path(sys.executable).parent / "edgefl"), "aggregate", "--mode", "async",
        "--buffer", "2", "--broker", fresh_mosquitto.url, "--fleet", FLEET, "--bundle",
        str(bundle.path), "--rounds", "1", "--min-devices", "2", "--deadline", "60",
        "--state", str(state_path), "--insecure",
    ]  # fmt: skip
    try:
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
            try:
                assert wait_for(lambda: _accepted(state_path) == 1, 60)
            finally:
                p.kill()
        second_may_answer.set()
        aggregator = AsyncAggregator(
            AggregatorConfig(
                fresh_mosquitto.url,
                FLEET,
                bundle.path,
                RoundPolicy(rounds=1, min_devices=2, deadline_s=30),
                state_path=state_path,
            ),
            AsyncPolicy(buffer=2),
        )
        summary = aggregator.run()
    finally:
        boards.stop()
    (only,) = summary.rounds
    # The stored update and the new one: "one"'s re-sent bytes were not counted twice.
    assert (only.round, only.status, only.accepted, only.rejected) == (1, "closed", 2, {})
    before = bundle.head_weights("default")["0.bias"]
    np.testing.assert_allclose(aggregator.heads["default"]["0.bias"], before + 0.3, rtol=1e-6)


def _accepted(path: Path) -> int:
    if not path.exists():
        return 0
    record = AggregatorRecord(path)
    try:
        return len(record.accepted_updates(1))
    finally:
        record.close()
