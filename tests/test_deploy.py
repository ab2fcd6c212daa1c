"""`edgefl deploy` over a real Mosquitto to real agents: all updated, each failure refused or
rolled back with its reason, group targeting, and a board offline during the deploy catching up."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import make_test_bundle
from click.testing import CliRunner, Result
from conftest import RunningBroker, wait_for

from edgefl import signing
from edgefl.cli import main
from edgefl.delivery.deploy import _publish_release
from edgefl.delivery.release import DeployReport, Targets, build_release
from edgefl.delivery.updater_binding import attach_to_agent
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.transport import topics
from edgefl.transport.client import MqttClient

_fleets = itertools.count()


class Fleet:
    """Agents with over-the-air updates on their own fleet name."""

    def __init__(self, broker: RunningBroker, root: Path) -> None:
        self.broker = broker
        self.root = root
        self.name = f"fleet{next(_fleets)}"
        self.keys = signing.init_keys(root / "keys")
        self.agents: dict[str, Agent] = {}

    def start(self, device: str, group: str = "") -> Agent:
        config = AgentConfig(
            self.broker.url, self.name, device, group=group, profile="raspberry-pi", heartbeat_s=5
        )
        agent = Agent(config)
        attach_to_agent(
            agent, self.root / f"models-{device}", signing.load_public_key(self.keys.public)
        )
        agent.start()
        self.agents[device] = agent
        return agent

    def stop(self, device: str) -> None:
        self.agents.pop(device).stop()

    def deploy(self, bundle: Path, *args: str, key: Path | None = None) -> Result:
        command = ["deploy", str(bundle), "--broker", self.broker.url, "--fleet", self.name]
        command += ["--key", str(key or self.keys.private), "--timeout", "20", "--insecure", *args]
        return CliRunner().invoke(main, command)

    def versions(self) -> dict[str, int]:
        return {d: a.model_version for d, a in self.agents.items()}


@pytest.fixture
def fleet(mosquitto: RunningBroker, tmp_path: Path) -> Iterator[Fleet]:
    group = Fleet(mosquitto, tmp_path)
    yield group
    for device in list(group.agents):
        group.stop(device)


def test_deploy_updates_every_agent(fleet: Fleet, tmp_path: Path) -> None:
    for device in ("pi-1", "pi-2", "pi-3"):
        fleet.start(device)
    bundle = make_test_bundle(tmp_path / "b1", 1)
    result = fleet.deploy(bundle.path, "--chunk-size", "1024")
    assert result.exit_code == 0, result.output
    assert "3 updated, 0 failed, 0 offline" in result.output
    assert fleet.versions() == {"pi-1": 1, "pi-2": 1, "pi-3": 1}


def test_wrong_key_older_version_and_broken_bundle_fail_with_reasons(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start("pi-1")
    fleet.start("pi-2")
    assert fleet.deploy(make_test_bundle(tmp_path / "b2", 2).path).exit_code == 0

    stranger = signing.init_keys(tmp_path / "stranger")
    result = fleet.deploy(make_test_bundle(tmp_path / "b3", 3).path, key=stranger.private)
    assert result.exit_code == 1, result.output
    assert "0 updated, 2 failed" in result.output
    assert "not signed by trusted key" in result.output

    result = fleet.deploy(make_test_bundle(tmp_path / "b1", 1).path)
    assert result.exit_code == 1
    assert "rollback protection" in result.output

    broken = make_test_bundle(tmp_path / "b4", 4, feature_size=16, backbone_features=8)
    result = fleet.deploy(broken.path)
    assert result.exit_code == 1
    assert "rolled_back" in result.output and "rolled back to v2" in result.output
    assert fleet.versions() == {"pi-1": 2, "pi-2": 2}


def test_a_tampered_chunk_on_the_wire_is_fetched_again_until_the_genuine_one_comes(
    fleet: Fleet, tmp_path: Path
) -> None:
    agent = fleet.start("pi-1")
    good = make_test_bundle(tmp_path / "b1", 1)
    release = build_release(
        good, signing.load_private_key(fleet.keys.private), Targets(), chunk_size=1024
    )
    tampered = tmp_path / "tampered"
    shutil.copytree(good.path, tampered)
    data = bytearray((tampered / "backbone-fp32.onnx").read_bytes())
    data[-1] ^= 0xFF
    last_chunk = (len(data) - 1) // 1024
    (tampered / "backbone-fp32.onnx").write_bytes(bytes(data))
    reports: list[DeployReport] = []
    client = MqttClient(fleet.broker.url, "attacker")
    client.subscribe(
        topics.deploy_report(fleet.name, "pi-1"),
        lambda m: reports.append(DeployReport.from_bytes(m.payload)),
    )
    client.connect()
    release_topics = [topics.fleet_release(fleet.name)]
    try:
        # The bad copy is retained in place of the genuine chunk: re-fetching brings it back.
        _publish_release(client, fleet.name, tampered, release, release_topics)
        assert wait_for(lambda: bool(reports) and reports[-1].terminal)
        assert reports[-1].state == "failed"
        assert f"backbone-fp32.onnx: chunk {last_chunk} does not match its SHA-256" in (
            reports[-1].reason
        )
        assert "waiting for a genuine copy" in reports[-1].reason
        assert agent.model_version == 0
        # Published again, genuine: the board was still listening and installs it.
        _publish_release(client, fleet.name, good.path, release, release_topics)
        assert wait_for(lambda: agent.model_version == 1)
        # The report follows the install (which now also loads the backbone of a board with
        # no data yet): wait for it rather than read it at once.
        assert wait_for(lambda: reports[-1].state == "installed")
    finally:
        client.close()


def test_a_stray_chunk_does_not_block_the_release_even_across_restarts(
    fleet: Fleet, tmp_path: Path
) -> None:
    for device in ("pi-1", "pi-2", "pi-3", "pi-4"):
        fleet.start(device)
    stray = MqttClient(fleet.broker.url, "stray")
    stray.connect()
    try:
        topic = topics.artifact_chunk(fleet.name, 8, "backbone-fp32.onnx", 999)
        assert stray.publish(topic, b"not a chunk", qos=1, retain=True).wait(5)
    finally:
        stray.close()
    result = fleet.deploy(make_test_bundle(tmp_path / "b8", 8).path, "--chunk-size", "1024")
    assert result.exit_code == 0, result.output
    assert "4 updated, 0 failed, 0 offline" in result.output
    fleet.stop("pi-1")
    restarted = fleet.start("pi-1")  # the retained stray chunk is still there
    assert wait_for(lambda: restarted.model_version == 8)


def forged_releases(fleet: Fleet, tmp_path: Path) -> dict[str, bytes]:
    """Retained messages a stranger could leave on `models/current`."""
    bundle = make_test_bundle(tmp_path / "forged", 9)
    stranger = signing.init_keys(tmp_path / "stranger")
    other = build_release(bundle, signing.load_private_key(stranger.private), Targets(), 1024)
    ours = build_release(bundle, signing.load_private_key(fleet.keys.private), Targets(), 1024)
    wrong_types = ours.envelope.signed.replace(b'"chunk_size":1024', b'"chunk_size":"1024"')
    return {
        "another key": other.to_bytes(),
        "garbage": b"\x00not json{",
        "wrong types": signing.seal(
            signing.load_private_key(fleet.keys.private), wrong_types
        ).to_bytes(),
        "altered": dataclasses.replace(ours.envelope, signed=wrong_types).to_bytes(),
    }


def test_forged_retained_releases_do_not_keep_a_late_board_from_the_genuine_one(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.start("lab-0", group="lab")
    result = fleet.deploy(make_test_bundle(tmp_path / "b1", 1).path, "--group", "lab")
    assert result.exit_code == 0, result.output
    forger = MqttClient(fleet.broker.url, "forger")
    forger.connect()
    try:
        for index, (kind, payload) in enumerate(forged_releases(fleet, tmp_path).items()):
            published = forger.publish(topics.fleet_release(fleet.name), payload, 1, retain=True)
            assert published.wait(5)
            late = fleet.start(f"late-{index}", group="lab")
            assert wait_for(lambda late=late: late.model_version == 1), kind  # type: ignore[misc]
    finally:
        forger.close()


def test_group_deploy_and_offline_board_catches_up(fleet: Fleet, tmp_path: Path) -> None:
    fleet.start("a-1", group="a")
    fleet.start("b-1", group="b")
    fleet.start("a-2", group="a")
    fleet.stop("a-2")
    result = fleet.deploy(make_test_bundle(tmp_path / "b1", 1).path, "--group", "a")
    assert result.exit_code == 0, result.output
    assert "1 updated, 0 failed, 1 offline" in result.output
    assert fleet.versions() == {"a-1": 1, "b-1": 0}
    back = fleet.start("a-2", group="a")  # the retained release is waiting for it
    assert wait_for(lambda: back.model_version == 1)
    result = fleet.deploy(make_test_bundle(tmp_path / "b2", 2).path, "--devices", "b-1,ghost")
    assert result.exit_code == 0, result.output
    assert "1 updated, 0 failed, 1 offline" in result.output
    assert fleet.versions() == {"a-1": 1, "b-1": 2, "a-2": 1}


def test_deploy_input_errors_are_one_line(fleet: Fleet, tmp_path: Path) -> None:
    result = fleet.deploy(tmp_path / "nope")
    assert result.exit_code == 2 and "not a bundle" in result.output
    bundle = make_test_bundle(tmp_path / "b1", 1).path
    result = fleet.deploy(bundle, "--group", "a", "--devices", "x")
    assert result.exit_code == 2 and "not both" in result.output
    result = fleet.deploy(bundle, key=tmp_path / "missing.key")
    assert result.exit_code == 2 and "edgefl keys init" in result.output
    result = fleet.deploy(bundle, "--chunk-size", "10")
    assert result.exit_code == 2 and "chunk size 10 is out of range" in result.output


def test_a_stale_board_is_planned_offline_and_not_waited_for() -> None:
    from edgefl.delivery.deploy import plan_targets
    from edgefl.transport.messages import DeviceStatus

    now = 10_000.0
    statuses = {
        "live": DeviceStatus("live", "online", heartbeat_s=5),
        "hung": DeviceStatus("hung", "online", heartbeat_s=5),
        "gone": DeviceStatus("gone", "offline", heartbeat_s=5),
    }
    seen = {"live": now - 2, "hung": now - 60, "gone": now - 1}
    online, offline = plan_targets(statuses, Targets(), seen, now)
    assert (online, offline) == ({"live"}, {"hung", "gone"})
