"""Rogue clients against a signed fleet, on a broker with no ACL (edgefl's own checks alone).

A stranger with broker access forges a task, an update and an error update in a device's name,
statuses (a ghost, a real device), a deploy report, and replays a device's genuine signed update
in a later round. Every attempt is refused and counted, and the federation runs as if none
happened. (`test_security_transport` runs the same attacks against the mTLS + ACL broker, where
most are refused before edgefl sees them.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bundles import make_test_bundle
from conftest import RunningBroker, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from signed_fleet import signed_fleet

from edgefl.core.settings import AcceptancePolicy, RoundPolicy
from edgefl.delivery.fleet_view import read_fleet
from edgefl.delivery.release import DeployReport
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.roles.record import AggregatorRecord
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.verifiers import STRICT, DeviceVerifier
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    DeviceStatus,
    RoundTask,
    UpdateHeader,
    encode_round_task,
    encode_update_error,
)
from edgefl.transport.sealed import raw_public_key, seal

FLEET = "rogue"


class Rogue:
    """A stranger on the broker: its own key, no device's; it watches tasks and updates."""

    def __init__(self, url: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.client = MqttClient(url, "rogue-client")
        self.captured: dict[tuple[int, str], bytes] = {}  # (round, device) -> sealed update
        self.attacked: set[int] = set()
        self.lock = threading.Lock()
        self.client.subscribe(topics.all_updates(FLEET), self._on_update)
        self.client.subscribe(topics.all_tasks(FLEET), self._on_task)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, seal(self.key, topic, payload), qos=1, retain=retain)

    def _on_update(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        if parsed and parsed.round_number and parsed.device_id and message.payload:
            with self.lock:
                self.captured.setdefault((parsed.round_number, parsed.device_id), message.payload)

    def _on_task(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        number = parsed.round_number if parsed else None
        if not message.payload or number is None or number in self.attacked:
            return
        self.attacked.add(number)
        if number == 1:
            # pi-1 "offline", sealed by the rogue, while the round runs.
            status = DeviceStatus("pi-1", "offline", time=time.time()).encode()
            self.publish(topics.device_status(FLEET, "pi-1"), status)
            # An update in pi-2's name, and an error update in pi-1's: sealed, not by them.
            header = UpdateHeader(round=1, device_id="pi-1", task="default", samples=1,
                                  head_version=0, status="error", error_code="train-failed",
                                  reason="forged")  # fmt: skip
            self.publish(topics.round_update(FLEET, 1, "pi-1"), encode_update_error(header))
            header = UpdateHeader(round=1, device_id="pi-2", task="default", samples=10_000,
                                  head_version=0, status="error")  # fmt: skip
            self.publish(topics.round_update(FLEET, 1, "pi-2"), encode_update_error(header))
            # Too big to be read, so its seal cannot be checked: counted, nobody's answer.
            self.client.publish(topics.round_update(FLEET, 1, "pi-2"), b"x" * 100_000, qos=1)
        elif number == 2:
            # pi-1's genuine signed update of round 1, replayed as its answer to round 2.
            with self.lock:
                genuine = self.captured.get((1, "pi-1"))
            assert genuine is not None, "the rogue saw no round-1 update to replay"
            self.client.publish(topics.round_update(FLEET, 2, "pi-1"), genuine, qos=1)


def test_every_rogue_message_is_refused_and_counted(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    state = tmp_path / "state.sqlite"
    fleet = signed_fleet(mosquitto.url, FLEET, bundle.path, state, ("pi-1", "pi-2"))
    agents = fleet.agents
    # pi-3: enrolled, online, selected, silent: every round stays open to its deadline, so the
    # rogue's messages always arrive while their round is open, however loaded the machine.
    silent = Ed25519PrivateKey.generate()
    fleet.registry.enroll("pi-3", raw_public_key(silent))
    silent_status = DeviceStatus("pi-3", "online", samples=50, time=time.time(),
                                 model_version=bundle.manifest.version,
                                 bundle_digest=bundle.digest)  # fmt: skip
    silent_topic = topics.device_status(FLEET, "pi-3")
    rogue = Rogue(mosquitto.url)
    rogue.client.connect(timeout=10)
    for agent in agents:
        agent.start()
    aggregator_auth = fleet.aggregator_auth()
    try:
        # Before any round: a task selecting both boards, a ghost's status, a deploy report.
        forged_task = RoundTask(round=50, selected=["pi-1", "pi-2"], tasks=["default"],
                                head_version=0, model_version=bundle.manifest.version)  # fmt: skip
        heads = {"default": bundle.head_weights("default")}
        rogue.publish(topics.round_task(FLEET, 50), encode_round_task(forged_task, heads))
        now = time.time()
        rogue.publish(topics.device_status(FLEET, "ghost"),
                      DeviceStatus("ghost", "online", time=now, samples=500).encode(),
                      retain=True)  # fmt: skip
        rogue.publish(topics.deploy_report(FLEET, "pi-2"),
                      DeployReport("pi-2", 11, "installed", running_version=11).to_bytes(),
                      retain=True)  # fmt: skip
        assert wait_for(lambda: all(a.auth.refused for a in agents), 10)
        rogue.client.publish(silent_topic, seal(silent, silent_topic, silent_status.encode()),
                             qos=1, retain=True).wait(5)  # fmt: skip
        aggregator = Aggregator(AggregatorConfig(
            mosquitto.url, FLEET, bundle.path, RoundPolicy(rounds=2, min_devices=3, deadline_s=3),
            acceptance=AcceptancePolicy(max_update_bytes=64_000), state_path=state,
            auth=aggregator_auth,
        ))  # fmt: skip
        summary = aggregator.run()
        checked = DeviceVerifier(DeviceRegistry(state), STRICT)
        view = {row.device_id: row for row in read_fleet(mosquitto.url, FLEET, devices=checked)}
    finally:
        for agent in agents:
            agent.stop()
        for topic in (topics.deploy_report(FLEET, "pi-2"), topics.device_status(FLEET, "ghost"),
                      silent_topic):  # fmt: skip
            rogue.client.publish(topic, b"", retain=True).wait(5)
        rogue.client.close()
    # The federation ran as if nothing happened: both boards' genuine updates, every round.
    assert [(r.status, r.accepted) for r in summary.rounds] == [("closed", 2), ("closed", 2)]
    # The forged task: each board refused it (and trained for nothing else).
    assert [dict(a.auth.refused) for a in agents] == [{"bad-signature": 1}] * 2
    assert all(o.round in (1, 2) for a in agents for o in a.outcomes)
    # Forged and replayed updates: counted per round under their code, never an answer.
    record = AggregatorRecord(state)
    try:
        rejected = {r.round: dict((r.result or {})["rejected"]) for r in record.rounds()}
    finally:
        record.close()
    assert rejected == {1: {"bad-signature": 2, "oversized": 1}, 2: {"bad-signature": 1}}
    # Statuses: the ghost is unknown, pi-1's forged "offline" is not its key's.
    assert aggregator_auth.refused == {"bad-signature": 4, "unknown-device": 1}
    assert "ghost" not in aggregator.device_presence()
    # The forged deploy report is not believed: pi-2 is shown on the version it really runs.
    assert view["pi-2"].last_deploy == "" and view["pi-2"].refused.startswith("bad-signature")
    assert view["pi-1"].key == "enrolled" and view["ghost"].refused.startswith("unknown-device")
