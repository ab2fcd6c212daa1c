"""`edgefl fleet`: the fleet view from retained statuses and deploy reports (pure join and live)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from bundles import make_test_bundle
from click.testing import CliRunner
from conftest import RunningBroker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl import signing
from edgefl.cli import main
from edgefl.delivery.fleet_view import (
    RETAINED_QUIET_S,
    fleet_view,
    running_text,
    wait_for_retained,
)
from edgefl.delivery.release import DeployReport
from edgefl.delivery.updater_binding import attach_to_agent
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AgentAuth
from edgefl.security.verifiers import TrustedSigners
from edgefl.transport import topics
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.sealed import raw_public_key, seal


def test_fleet_view_joins_statuses_and_reports() -> None:
    statuses = {
        "pi-2": DeviceStatus(
            "pi-2", "offline", model_version=3, time=100.0, profile="raspberry-pi"
        ),
        "pi-1": DeviceStatus(
            "pi-1",
            "online",
            model_version=4,
            time=200.0,
            last_round=7,
            group="a",
            profile="jetson",
            bundle_digest="ab" * 32,
        ),
    }
    reports = {
        "pi-2": DeployReport("pi-2", 4, "refused", reason="bad signature", running_version=3),
        "ghost": DeployReport("ghost", 4, "installed", running_version=4),
    }
    rows = fleet_view(statuses, reports)
    assert [r.device_id for r in rows] == ["pi-1", "ghost", "pi-2"]
    first, ghost, second = rows
    assert (first.state, first.model_version, first.last_round, first.group) == (
        "online",
        4,
        7,
        "a",
    )
    assert (second.last_deploy, second.deploy_reason) == ("v4 refused", "bad signature")
    assert (first.bundle_digest, second.bundle_digest) == ("ab" * 32, "")
    assert (ghost.state, ghost.model_version) == ("unknown", 4)
    assert running_text(first) == "-"  # an agent that has not said what runs


def test_running_text_names_artifact_runtime_and_provider() -> None:
    gpu = DeviceStatus("jet", "online", artifact="backbone-fp16.onnx", runtime="onnxruntime",
                       provider="CUDAExecutionProvider", samples=40)  # fmt: skip
    pi = DeviceStatus("pi", "online", artifact="backbone-int8.tflite", runtime="litert")
    rows = {r.device_id: r for r in fleet_view({"jet": gpu, "pi": pi}, {})}
    assert running_text(rows["jet"]) == "backbone-fp16.onnx onnxruntime/CUDAExecutionProvider"
    assert running_text(rows["pi"]) == "backbone-int8.tflite litert"
    assert (rows["jet"].samples, rows["pi"].samples) == (40, 0)


def test_cli_fleet_lists_online_and_offline_boards(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    keys = signing.init_keys(tmp_path / "keys")
    state = tmp_path / "state.sqlite"
    registry = DeviceRegistry(state)
    trusted = TrustedSigners([signing.load_public_key(keys.public)])
    agents = []
    for device, group in (("pi-1", "a"), ("pi-2", "b")):
        device_key = Ed25519PrivateKey.generate()
        registry.enroll(device, raw_public_key(device_key))
        config = AgentConfig(
            mosquitto.url, "viewfleet", device, group=group, profile="raspberry-pi",
            auth=AgentAuth(device_key, trusted),
        )  # fmt: skip
        agent = Agent(config)
        attach_to_agent(agent, tmp_path / device, signing.load_public_key(keys.public))
        agent.start()
        agents.append(agent)
    try:
        bundle = make_test_bundle(tmp_path / "b", 5)
        deployed = CliRunner().invoke(
            main,
            ["deploy", str(bundle.path), "--broker", mosquitto.url, "--fleet", "viewfleet",
             "--key", str(keys.private), "--state", str(state)],
        )  # fmt: skip
        assert deployed.exit_code == 0, deployed.output
        agents[1].stop()
        # A stranger says pi-2 is online, sealed with its own key: refused, and said so.
        rogue = Ed25519PrivateKey.generate()
        forged = DeviceStatus("pi-2", "online", model_version=9, time=time.time()).encode()
        topic = topics.device_status("viewfleet", "pi-2")
        mosquitto.publish(topic, seal(rogue, topic, forged))
        args = ["fleet", "--broker", mosquitto.url, "--fleet", "viewfleet", "--state", str(state)]
        shown = CliRunner().invoke(main, [*args, "--json"])
        assert shown.exit_code == 0, shown.output
        rows = {r["device_id"]: r for r in json.loads(shown.output)}
        # On this broker without an ACL the forgery replaced pi-2's retained "offline": it is
        # not believed, so pi-2's state is unknown (its deploy report still says v5).
        assert rows["pi-1"]["state"] == "online" and rows["pi-2"]["state"] == "unknown"
        assert rows["pi-1"]["model_version"] == 5 and rows["pi-2"]["model_version"] == 5
        assert rows["pi-1"]["key"] == "enrolled" and rows["pi-2"]["refused"].startswith(
            "bad-signature: signed with key"
        )
        assert rows["pi-1"]["profile"] == "raspberry-pi" and rows["pi-1"]["group"] == "a"
        assert rows["pi-1"]["last_deploy"] == "v5 installed"
        # Each board shows the digest of the full bundle, though it downloaded only some files.
        assert rows["pi-1"]["bundle_digest"] == bundle.digest
        # What runs: the artifact the profile picked, in its runtime, on the provider it got.
        running = [rows["pi-1"][k] for k in ("artifact", "runtime", "provider", "samples")]
        assert running == ["backbone-fp32.onnx", "onnxruntime", "CPUExecutionProvider", 0]
        table = CliRunner().invoke(main, args)
        assert table.exit_code == 0
        assert "1/2 online" in table.output and "pi-2" in table.output
        assert "refused a message in the name of pi-2: bad-signature" in table.output
        assert bundle.digest[:12] in table.output and bundle.digest not in table.output
        assert "backbone-fp32.onnx" in table.output and "CPUExecutionProvider" in table.output
    finally:
        agents[0].stop()
        agents[1].stop()
    empty = CliRunner().invoke(
        main, ["fleet", "--broker", mosquitto.url, "--fleet", "nobody", "--insecure"]
    )
    assert "no devices" in empty.output and "--insecure" in empty.output
    unreachable = CliRunner().invoke(
        main, ["fleet", "--broker", "ftp://x", "--fleet", "a", "--insecure"]
    )
    assert unreachable.exit_code == 2 and "mqtt://" in unreachable.output
    unchecked = CliRunner().invoke(main, ["fleet", "--broker", mosquitto.url, "--fleet", "a"])
    assert unchecked.exit_code == 2 and "--state" in unchecked.output


def test_wait_for_retained_counts_quiet_from_the_call_not_from_before_connect() -> None:
    # A slow connect leaves the last-message time in the past; that is not a quiet broker.
    lock = threading.Lock()
    last_message = [time.monotonic() - 10.0]
    started = time.monotonic()
    wait_for_retained(last_message, lock, max_wait=3.0)
    assert time.monotonic() - started >= RETAINED_QUIET_S


def test_privacy_line_says_the_epsilon_of_the_latest_round_or_why_there_is_none() -> None:
    from edgefl.delivery.fleet_view import privacy_line
    from edgefl.transport.messages import RoundResult

    def result(number: int, **metrics: float) -> RoundResult:
        return RoundResult(number, "closed", number, 5, 5, metrics=metrics, run_id="r" * 32)

    spent = [result(1, epsilon=4.7527, epsilon_unsampled=4.7527, delta=1e-5),
             result(2, epsilon=7.0879, epsilon_unsampled=7.0879, delta=1e-5)]  # fmt: skip
    assert privacy_line(reversed(spent)) == (
        "privacy: ε=7.09 spent at δ=1e-05 after round 2 (run rrrrrrrrrrrr); ε=7.09 for whoever "
        "sees the updates"
    )
    assert "no ε after round 3" in privacy_line([*spent, result(3, accuracy=0.5)])
    assert privacy_line([]) == "privacy: no round result is retained, so no ε to show"


def test_cli_fleet_shows_the_epsilon_of_the_retained_results(mosquitto: RunningBroker) -> None:
    from edgefl.transport import topics
    from edgefl.transport.client import MqttClient
    from edgefl.transport.messages import RoundResult

    client = MqttClient(mosquitto.url, client_id="privacy-fleet-test")
    client.connect(timeout=10.0)
    try:
        status = DeviceStatus("pi-1", "online", time=time.time())
        client.publish(topics.device_status("epsfleet", "pi-1"), status.encode(), qos=1,
                       retain=True).wait(5.0)  # fmt: skip
        result = RoundResult(2, "closed", 2, 5, 5, run_id="abc", metrics={
            "epsilon": 7.0879, "epsilon_unsampled": 7.0879, "delta": 1e-5,
        })  # fmt: skip
        client.publish(topics.round_result("epsfleet", 2), result.encode(), qos=1,
                       retain=True).wait(5.0)  # fmt: skip
        shown = CliRunner().invoke(
            main, ["fleet", "--broker", mosquitto.url, "--fleet", "epsfleet", "--insecure"]
        )
        assert shown.exit_code == 0, shown.output
        assert "privacy: ε=7.09 spent at δ=1e-05 after round 2 (run abc)" in shown.output
    finally:
        for topic in (topics.device_status("epsfleet", "pi-1"), topics.round_result("epsfleet", 2)):
            client.publish(topic, b"", qos=1, retain=True).wait(5.0)
        client.close()
