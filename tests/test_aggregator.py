"""The aggregator over a real Mosquitto: bad input is rejected with reasons, restarts resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker, wait_for

from edgefl.bundle import ModelBundle
from edgefl.core.codecs import encode_delta
from edgefl.core.settings import AcceptancePolicy, PrivacySettings, RoundPolicy, RoundSettings
from edgefl.core.strategies import RoundPlan, Strategy
from edgefl.head import Weights
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig, FederationSummary, RoundSummary
from edgefl.roles.record import AggregatorRecord
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    update_metadata,
)

FLEET = "lab"

# The last task the fakes saw: their updates echo its run, head and bundle digests.
SEEN: dict[str, RoundTask] = {}


def _update(round_number: int, device: str, head_version: int, delta: dict[str, np.ndarray],
            samples: int = 10) -> bytes:  # fmt: skip
    task = SEEN.get("task", RoundTask(1, [], [], 0, 0))
    header = UpdateHeader(round_number, device, "default", samples, head_version,
                          run_id=task.run_id, head_digest=task.head_digest,
                          bundle_digest=task.bundle_digest)  # fmt: skip
    return encode_delta(delta, "float32", metadata=update_metadata(header))


class FakeDevices:
    """Raw MQTT devices that announce themselves and answer tasks with a scripted sequence."""

    def __init__(self, url: str, ids: list[str], script: Callable[[int, int, dict], list]) -> None:
        self.client = MqttClient(url, "fake-devices")
        self.script = script
        self.ids = ids
        self.client.subscribe(topics.all_tasks(FLEET), self._on_task)

    def start(self, bundle_digest: str, model_version: int = 1) -> None:
        self.client.connect()
        for device in self.ids:
            status = DeviceStatus(device, "online", samples=10, model_version=model_version,
                                  bundle_digest=bundle_digest)  # fmt: skip
            self.client.publish(
                topics.device_status(FLEET, device), status.encode(), retain=True
            ).wait(5)

    def stop(self) -> None:
        for device in self.ids:
            self.client.publish(topics.device_status(FLEET, device), b"", retain=True).wait(5)
        self.client.close()

    def _on_task(self, message: Message) -> None:
        if not message.payload:
            return
        task, heads = decode_round_task(message.payload)
        SEEN["task"] = task
        for topic, payload in self.script(task.round, task.head_version, heads["default"]):
            self.client.publish(topic, payload, qos=1)


def _zero(head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in head.items()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "b", feature_size=16)


def test_bad_updates_are_rejected_with_reasons_and_the_run_completes(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    sent: dict[int, bytes] = {}
    bad = ["d-garbage", "d-shape", "d-nan", "d-huge"]

    def script(number: int, version: int, head: dict[str, np.ndarray]) -> list:
        up = lambda device: topics.round_update(FLEET, number, device)  # noqa: E731
        zero = lambda device: _update(number, device, version, _zero(head))  # noqa: E731
        good = _update(number, "evil", version, {k: v + 0.01 for k, v in _zero(head).items()})
        other = _update(number, "evil", version, {k: v + 0.02 for k, v in _zero(head).items()})
        wrong_shape = {k: np.zeros((3, 3), np.float32) for k in head}
        nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in head.items()}
        if number == 1:
            sent[1] = good
            # One publisher's messages arrive in order: the extra answers come before the last
            # answer closes the round.
            return [
                (up("stranger"), _update(number, "stranger", version, _zero(head))),
                (up("evil"), good),
                (up("evil"), other),  # a second, different answer
                (up("evil"), good),  # the same bytes again: a re-delivery, silently ignored
                (up("d-garbage"), b"\x00garbage that is not safetensors"),
                (up("d-shape"), _update(number, "d-shape", version, wrong_shape)),
                (up("d-nan"), _update(number, "d-nan", version, nan)),
                (up("d-huge"), b"\x00" * (50 * 1024 * 1024)),
                (up("quiet"), zero("quiet")),
            ]
        return [
            (up("evil"), sent[1]),  # round 1's update replayed into round 2: evil's answer
            (topics.round_update(FLEET, 1, "evil"), sent[1]),  # too late for round 1
            (up("evil"), good),  # after its (rejected) answer: a duplicate
            *[(up(device), zero(device)) for device in bad],
            (up("quiet"), zero("quiet")),
        ]

    fakes = FakeDevices(mosquitto.url, ["evil", "quiet", *bad], script)
    fakes.start(bundle.digest)
    config = AggregatorConfig(
        mosquitto.url, FLEET, bundle.path,
        RoundPolicy(rounds=2, min_devices=6, deadline_s=30, quorum=0.3, settle_s=0.2),
        acceptance=AcceptancePolicy(allow=("evil", "quiet", *bad)),
        state_path=tmp_path / "state.sqlite", out_dir=tmp_path / "out",
    )  # fmt: skip
    try:
        summary = Aggregator(config).run()
    finally:
        fakes.stop()
    first, second = summary.rounds
    assert (first.status, first.accepted, second.status, second.accepted) == (
        "closed", 2, "closed", 5,
    )  # fmt: skip
    assert first.rejected == {
        "malformed": 1, "shape": 1, "non-finite": 1, "oversized": 1, "unknown-device": 1,
        "duplicate": 1,
    }  # fmt: skip
    assert second.rejected == {"round-mismatch": 1, "duplicate": 1}
    assert second.late == 0  # the late update named round 1: counted there
    assert first.seconds < 10 and second.seconds < 10  # every selected device answered
    state = AggregatorRecord(tmp_path / "state.sqlite")
    reasons = {code: reason for _, _, code, reason in state.rejections()}
    assert "exceeds the limit" in reasons["oversized"]
    assert "NaN or Inf" in reasons["non-finite"]
    assert "not in the fleet list" in reasons["unknown-device"]
    assert "round 1 is closed" in reasons["round-closed"]
    rounds = state.rounds()
    assert [r.status for r in rounds] == ["closed", "closed"]
    assert rounds[1].result is not None and rounds[1].result["answers"] == {
        "evil": "round-mismatch", "quiet": "accepted", **{d: "accepted" for d in bad},
    }  # fmt: skip
    assert "for round 1 on round 2's topic" in rounds[1].result["reasons"]["evil"]
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(r.get("rejected_oversized"), r["late"]) for r in rows] == [(1, 1), (None, 0)]
    state.close()


def test_round_waits_for_deadline_then_closes_with_quorum(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    def script(number: int, version: int, head: dict[str, np.ndarray]) -> list:
        return [(topics.round_update(FLEET, number, "fast"), _update(number, "fast", version,
                                                                      _zero(head)))]  # fmt: skip

    fakes = FakeDevices(mosquitto.url, ["fast", "silent"], script)
    fakes.start(bundle.digest)
    policy = RoundPolicy(rounds=1, min_devices=2, deadline_s=1.0, quorum=0.5)
    config = AggregatorConfig(mosquitto.url, FLEET, bundle.path, policy)
    started = time.monotonic()
    try:
        summary = Aggregator(config).run()
    finally:
        fakes.stop()
    assert time.monotonic() - started >= 1.0
    assert (summary.rounds[0].status, summary.rounds[0].accepted) == ("closed", 1)
    assert summary.head_version == 1


def test_without_quorum_the_round_fails_and_the_head_is_unchanged(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    fakes = FakeDevices(mosquitto.url, ["mute-1", "mute-2"], lambda *_: [])
    fakes.start(bundle.digest)
    config = AggregatorConfig(mosquitto.url, FLEET, bundle.path,
                              RoundPolicy(rounds=1, min_devices=2, deadline_s=0.5))  # fmt: skip
    try:
        summary = Aggregator(config).run()
    finally:
        fakes.stop()
    assert summary.rounds[0].status == "failed"
    assert summary.head_version == 0


def test_multi_task_heads_are_aggregated_per_task(mosquitto: RunningBroker, tmp_path: Path) -> None:
    bundle = make_test_bundle(tmp_path / "multi", feature_size=16, tasks=("default", "pets"))
    devices, _ = digits_devices(2)
    agents = [
        Agent(
            AgentConfig(mosquitto.url, FLEET, f"task-{task}", bundle_dir=bundle.path, task=task),
            dataset,
        )
        for task, dataset in zip(("default", "pets"), devices, strict=True)
    ]
    for agent in agents:
        agent.start()
    try:
        aggregator = Aggregator(AggregatorConfig(
            mosquitto.url, FLEET, bundle.path, RoundPolicy(rounds=1, min_devices=2, deadline_s=20)
        ))  # fmt: skip
        summary = aggregator.run()
    finally:
        for agent in agents:
            agent.stop()
    assert summary.rounds[0].accepted == 2
    for task in ("default", "pets"):
        before = bundle.head_weights(task)["0.weight"]
        after = aggregator.heads[task]["0.weight"]
        # Each head moved by exactly its own device's delta (FedAvg of one update).
        assert not np.allclose(before, after)
    assert not np.allclose(aggregator.heads["default"]["0.weight"],
                           aggregator.heads["pets"]["0.weight"])  # fmt: skip


@pytest.mark.slow
def test_aggregator_killed_mid_round_resumes_with_accepted_updates(
    fresh_mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(fresh_mosquitto.url, FLEET, "good", bundle_dir=bundle.path),
                  devices[0])  # fmt: skip
    answer_now = threading.Event()

    def script(number: int, version: int, head: dict[str, np.ndarray]) -> list:
        if not answer_now.is_set():
            return []  # hold round 1 open until the first aggregator is gone
        return [(topics.round_update(FLEET, number, "late-bloomer"),
                 _update(number, "late-bloomer", version, _zero(head)))]  # fmt: skip

    fakes = FakeDevices(fresh_mosquitto.url, ["late-bloomer"], script)
    agent.start()
    fakes.start(bundle.digest)
    state_path = tmp_path / "state.sqlite"
    command = [
        str(Path(sys.executable).parent / "edgefl"), "aggregate", "--broker", fresh_mosquitto.url,
        "--fleet", FLEET, "--bundle", str(bundle.path), "--rounds", "1", "--min-devices", "2",
        "--deadline", "60", "--state", str(state_path), "--insecure",
    ]  # fmt: skip
    try:
        with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as p:
            try:
                assert wait_for(lambda: state_path.exists() and _accepted(state_path) == 1, 60)
            finally:
                p.kill()
        state = AggregatorRecord(state_path)
        assert state.open_round_record() is not None
        state.close()
        answer_now.set()
        summary: FederationSummary = Aggregator(AggregatorConfig(
            fresh_mosquitto.url, FLEET, bundle.path,
            RoundPolicy(rounds=1, min_devices=2, deadline_s=30), state_path=state_path,
        )).run()  # fmt: skip
    finally:
        fakes.stop()
        agent.stop()
    (only,) = summary.rounds
    assert (only.round, only.status, only.accepted, only.rejected) == (1, "closed", 2, {})
    assert summary.head_version == 1


def _accepted(path: Path) -> int:
    state = AggregatorRecord(path)
    try:
        return len(state.accepted_updates(1))
    finally:
        state.close()


def test_privacy_settings_are_checked_and_sent_to_devices_in_the_task(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from edgefl.cli import main

    bundle = make_test_bundle(tmp_path / "b")
    result = CliRunner().invoke(
        main,
        [
            "aggregate",
            "--broker",
            mosquitto.url,
            "--fleet",
            FLEET,
            "--bundle",
            str(bundle.path),
            "--noise-multiplier",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert "noise_multiplier needs clip_norm" in result.output

    configs: list[dict] = []

    def record(round_number: int, head_version: int, head: dict) -> list:
        return []

    devices = FakeDevices(mosquitto.url, ["pi-1"], record)
    watcher = MqttClient(mosquitto.url, "task-watcher")
    watcher.subscribe(
        topics.all_tasks(FLEET),
        lambda m: configs.append(decode_round_task(m.payload)[0].config) if m.payload else None,
    )
    watcher.connect()
    devices.start(bundle.digest)
    try:
        config = AggregatorConfig(
            mosquitto.url,
            FLEET,
            bundle.path,
            RoundPolicy(rounds=1, deadline_s=0.5),
            RoundSettings(privacy=PrivacySettings(clip_norm=0.5, noise_multiplier=1.2)),
        )
        Aggregator(config).run()
        assert wait_for(lambda: bool(configs))
    finally:
        devices.stop()
        watcher.close()
    sent = RoundSettings.from_wire(configs[0])
    assert (sent.privacy.clip_norm, sent.privacy.noise_multiplier) == (0.5, 1.2)


class Ghost:
    """A raw MQTT device that announces itself, never heartbeats, and stays connected (no will).

    It answers tasks that select it with a zero delta, so a round that selects it still closes.
    """

    def __init__(self, url: str, fleet: str, bundle: ModelBundle, heartbeat_s: float) -> None:
        self.fleet, self.bundle, self.heartbeat_s = fleet, bundle, heartbeat_s
        self.client = MqttClient(url, f"ghost-{fleet}")
        self.client.subscribe(topics.all_tasks(fleet), self._on_task)
        self.client.connect()

    def announce(self, age_s: float = 0.0) -> None:
        """Publish a retained online status dated `age_s` seconds ago."""
        status = DeviceStatus("ghost", "online", samples=10, bundle_digest=self.bundle.digest,
                              heartbeat_s=self.heartbeat_s, time=time.time() - age_s)  # fmt: skip
        topic = topics.device_status(self.fleet, "ghost")
        self.client.publish(topic, status.encode(), retain=True).wait(5)

    def close(self) -> None:
        self.client.publish(topics.device_status(self.fleet, "ghost"), b"", retain=True).wait(5)
        self.client.close()

    def _on_task(self, message: Message) -> None:
        if not message.payload:
            return
        task, heads = decode_round_task(message.payload)
        SEEN["task"] = task
        if "ghost" in task.selected:
            update = _update(task.round, "ghost", task.head_version, _zero(heads["default"]))
            self.client.publish(topics.round_update(self.fleet, task.round, "ghost"), update)


def test_stale_devices_are_not_selected_until_they_heartbeat_again(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path
) -> None:
    fleet = "staleness"
    # The ghost's window is 3 x 0.4 s; the live agent heartbeats every 0.5 s.
    ghost = Ghost(mosquitto.url, fleet, bundle, heartbeat_s=0.4)
    ghost.announce(age_s=60.0)  # left behind by a session that vanished without its will
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, fleet, "live", bundle_dir=bundle.path,
                              heartbeat_s=0.5), devices[0])  # fmt: skip
    agent.start()
    aggregator: Aggregator

    def between_rounds(summary: RoundSummary) -> None:
        if summary.round == 1:
            ghost.announce()  # the ghost comes back: a fresh status
            assert wait_for(lambda: "ghost" in aggregator.online_devices(), 5)
        elif summary.round == 2:
            time.sleep(1.5)  # the ghost stays silent past its window; the agent keeps beating

    policy = RoundPolicy(rounds=3, deadline_s=20)
    config = AggregatorConfig(mosquitto.url, fleet, bundle.path, policy, out_dir=tmp_path / "out")
    aggregator = Aggregator(config, on_round=between_rounds)
    try:
        summary = aggregator.run()
    finally:
        agent.stop()
        ghost.close()
    seen = [(r.selected, r.online, r.stale_devices, r.accepted) for r in summary.rounds]
    assert seen == [(1, 1, ["ghost"], 1), (2, 2, [], 2), (1, 1, ["ghost"], 1)]
    assert all(r.seconds < 15 for r in summary.rounds)  # no round waited for the ghost
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(r["selected"], r["online"], r["stale"]) for r in rows] == [
        (1, 1, 1), (2, 2, 0), (1, 1, 1),
    ]  # fmt: skip


def test_cli_shows_stale_devices_in_progress_errors_and_the_fleet_view(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    from click.testing import CliRunner

    from edgefl.cli import main

    fleet = "stalecli"
    ghost = Ghost(mosquitto.url, fleet, bundle, heartbeat_s=1.0)
    ghost.announce(age_s=60.0)
    devices, _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, fleet, "live", bundle_dir=bundle.path), devices[0])
    agent.start()
    args = ["aggregate", "--broker", mosquitto.url, "--fleet", fleet, "--bundle",
            str(bundle.path), "--rounds", "1", "--deadline", "20", "--insecure"]  # fmt: skip
    runner = CliRunner()
    try:
        bad = runner.invoke(main, [*args, "--stale-after", "0"])
        assert bad.exit_code == 2 and "stale_after_s must be positive" in bad.output
        short = runner.invoke(main, [*args, "--min-devices", "2", "--wait-devices", "1"])
        assert short.exit_code == 1, short.output  # the world failed: too few devices
        assert "only 1 of 2 devices" in short.output
        assert "stale (no recent heartbeat): ghost" in short.output
        ran = runner.invoke(main, args)
        assert ran.exit_code == 0, ran.output
        assert "1/1 online selected  1 stale" in ran.output and "stale: ghost" in ran.output
        shown = runner.invoke(main, ["fleet", "--broker", mosquitto.url, "--fleet", fleet,
                                     "--json", "--insecure"])  # fmt: skip
        assert shown.exit_code == 0, shown.output
        states = {r["device_id"]: r["state"] for r in json.loads(shown.stdout)}
        assert states == {"live": "online", "ghost": "stale"}
    finally:
        agent.stop()
        ghost.close()


class OnlyPickMe(Strategy):
    """A user's strategy, defined outside the package: one chosen device trains for 4 epochs,
    and the new head is the global head plus twice its delta."""

    name = "only-pick-me"

    def configure_round(
        self,
        round_number: int,
        devices: Mapping[str, DeviceStatus],
        settings: RoundSettings,
        policy: RoundPolicy,
        seed: int,
    ) -> RoundPlan:
        train = dataclasses.replace(settings.train, epochs=4)
        return RoundPlan(("pick-me",), dataclasses.replace(settings, train=train))

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        ((only, _),) = deltas
        return {k: v + 2 * only[k] for k, v in global_weights.items()}


def test_a_users_strategy_object_selects_configures_and_aggregates_over_the_wire(
    mosquitto: RunningBroker, bundle: ModelBundle
) -> None:
    configs: list[dict] = []

    def script(number: int, version: int, head: dict[str, np.ndarray]) -> list:
        step = {k: np.full_like(v, 0.25) for k, v in head.items()}
        return [
            (topics.round_update(FLEET, number, d), _update(number, d, version, step))
            for d in ("skip-me", "pick-me")  # in order: the last answer closes the round
        ]

    fakes = FakeDevices(mosquitto.url, ["pick-me", "skip-me"], script)
    watcher = MqttClient(mosquitto.url, "strategy-watcher")
    watcher.subscribe(
        topics.all_tasks(FLEET),
        lambda m: configs.append(decode_round_task(m.payload)[0].config) if m.payload else None,
    )
    watcher.connect()
    fakes.start(bundle.digest)
    policy = RoundPolicy(rounds=1, min_devices=2, deadline_s=5)
    aggregator = Aggregator(AggregatorConfig(mosquitto.url, FLEET, bundle.path, policy,
                                             strategy=OnlyPickMe()))  # fmt: skip
    try:
        summary = aggregator.run()
    finally:
        fakes.stop()
        watcher.close()
    (only,) = summary.rounds
    assert (only.status, only.selected, only.accepted, only.rejected) == (
        "closed", 1, 1, {"not-selected": 1},
    )  # fmt: skip
    assert RoundSettings.from_wire(configs[0]).train.epochs == 4
    before = bundle.head_weights("default")
    np.testing.assert_allclose(aggregator.heads["default"]["0.bias"], before["0.bias"] + 0.5)


ZEROING_STRATEGY = """
import numpy as np
from edgefl.core.strategies import Strategy

class Zeroing(Strategy):
    name = "zeroing"

    def aggregate(self, global_weights, deltas):
        return {k: np.zeros_like(v) for k, v in global_weights.items()}

def make():
    return Zeroing()
"""


def test_edgefl_aggregate_runs_a_strategy_from_a_users_file(
    mosquitto: RunningBroker, bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from edgefl.bundle import decode_head
    from edgefl.cli import main

    module = f"user_strategy_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(ZEROING_STRATEGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    fleet = "user-strategy"
    devices, _ = digits_devices(1)
    agent = Agent(AgentConfig(mosquitto.url, fleet, "pi-u", bundle_dir=bundle.path), devices[0])
    agent.start()
    out = tmp_path / "out"
    try:
        result = CliRunner().invoke(main, [
            "aggregate", "--broker", mosquitto.url, "--fleet", fleet, "--bundle",
            str(bundle.path), "--rounds", "1", "--settle", "0.2", "--strategy", f"{module}:make",
            "--out", str(out), "--insecure",
        ])  # fmt: skip
    finally:
        agent.stop()
    assert result.exit_code == 0, result.output
    head = decode_head((out / "head.safetensors").read_bytes())
    assert all(not value.any() for value in head.values())  # the user's rule made the head
    assert any(bundle.head_weights()[k].any() for k in head)  # and it was not zero before
