"""The dashboard believes a board's status or deploy report only when it is sealed by the key the
board is enrolled (or pinned) with in the aggregator's state, read without ever being written;
what it refuses is counted per device and said on the page, and so is checking nothing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import RunningBroker, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.dashboard.fleet_state import FleetState
from edgefl.dashboard.service import Dashboard, DashboardSettings
from edgefl.dashboard.view import build_view
from edgefl.delivery.release import DeployReport
from edgefl.roles.record import AggregatorRecord
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.verifiers import INSECURE, STRICT, DeviceVerifier
from edgefl.transport import topics
from edgefl.transport.client import MqttClient
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.sealed import fingerprint, raw_public_key, seal

FLEET = "sealed-lab"
NOW = 1_000_000.0


def _status(device: str, state: str = "online", profile: str = "raspberry-pi") -> bytes:
    return DeviceStatus(device, state, profile=profile, heartbeat_s=10.0, time=NOW).encode()


def _sealed_status(key: Ed25519PrivateKey, device: str, **fields: str) -> tuple[str, bytes]:
    topic = topics.device_status(FLEET, device)
    return topic, seal(key, topic, _status(device, **fields))


def _sealed_report(key: Ed25519PrivateKey, report: DeployReport) -> tuple[str, bytes]:
    topic = topics.deploy_report(FLEET, report.device_id)
    return topic, seal(key, topic, report.to_bytes())


def _checked_state() -> tuple[FleetState, DeviceRegistry, Ed25519PrivateKey]:
    registry = DeviceRegistry(":memory:")
    board = Ed25519PrivateKey.generate()
    registry.enroll("pi-1", raw_public_key(board))
    return FleetState(FLEET, devices=DeviceVerifier(registry, STRICT)), registry, board


def test_only_statuses_and_reports_sealed_by_the_enrolled_key_are_shown() -> None:
    state, registry, board = _checked_state()
    rogue = Ed25519PrivateKey.generate()
    state.observe(*_sealed_status(board, "pi-1", profile="jetson"), False, NOW)
    state.observe(*_sealed_report(board, DeployReport("pi-1", 3, "installed")), False, NOW)
    # A stranger's seal in pi-1's name: an "offline" status and a refused deploy.
    state.observe(*_sealed_status(rogue, "pi-1", state="offline", profile="evil"), False, NOW)
    state.observe(*_sealed_report(rogue, DeployReport("pi-1", 9, "refused")), False, NOW)
    # pi-1's genuine status moved to another device's topic does not verify there.
    moved = _sealed_status(board, "pi-1")[1]
    state.observe(topics.device_status(FLEET, "pi-2"), moved, False, NOW)
    # A board nobody enrolled, sealing with its own key.
    ghost = Ed25519PrivateKey.generate()
    state.observe(*_sealed_status(ghost, "ghost"), False, NOW)

    view = build_view(state, now=NOW + 1, record="state.sqlite")
    (row,) = view["devices"]
    assert (row["id"], row["state"], row["profile"], row["key"], row["refused"]) == (
        "pi-1", "online", "jetson", "enrolled", 2,
    )  # fmt: skip
    assert [(d["device"], d["version"], d["state"]) for d in view["deploys"]] == [
        ("pi-1", 3, "installed")
    ]
    refused = {r["device"]: r for r in view["refused"]}
    assert [r["device"] for r in view["refused"]] == ["pi-1", "ghost", "pi-2"]  # most first
    assert refused["pi-1"]["line"] == (
        f"2 forged messages refused in pi-1's name: bad-signature: signed with key "
        f"{fingerprint(raw_public_key(rogue))}, but device pi-1 is enrolled with key "
        f"{fingerprint(raw_public_key(board))}"
    )
    assert refused["ghost"]["line"] == (
        "1 message refused in ghost's name: unknown-device: device ghost is not enrolled"
    )
    assert refused["pi-2"]["reason"].startswith("unknown-device")
    seals = view["seals"]
    assert seals["checked"] and seals["refused"] == 4 and seals["unsigned"] == 0
    assert seals["line"].startswith("seals checked:")
    assert seals["line"].endswith("with in state.sqlite; 4 messages refused")
    assert view["ignored_messages"] == 0
    json.dumps(view, allow_nan=False)

    # Revoked (and the registry read again, as the watcher does): its own key no longer counts.
    registry.revoke("pi-1")
    assert state.devices is not None
    state.devices.refresh()
    state.observe(*_sealed_status(board, "pi-1", profile="after-revocation"), False, NOW)
    view = build_view(state, now=NOW + 1)
    assert view["devices"][0]["profile"] == "jetson" and view["devices"][0]["key"] == "revoked"
    assert view["refused"][0]["line"] == (
        "3 messages refused in pi-1's name: unknown-device: device pi-1 was revoked"
    )


def test_an_unsigned_fleet_is_refused_with_the_way_out_and_insecure_shows_it() -> None:
    state, _registry, _board = _checked_state()
    state.observe(topics.device_status(FLEET, "pi-1"), _status("pi-1"), False, NOW)
    view = build_view(state, now=NOW)
    assert view["devices"] == []
    (row,) = view["refused"]
    assert row["line"] == (
        "1 message refused in pi-1's name: bad-signature: the message is not signed (if the "
        "fleet runs --insecure, watch it with `edgefl dashboard --insecure`)"
    )
    assert "1 not signed at all: if the fleet runs --insecure" in view["seals"]["line"]

    # --insecure: shown as they come, and the page says nothing is checked.
    insecure = FleetState(FLEET, devices=DeviceVerifier(None, INSECURE))
    insecure.observe(topics.device_status(FLEET, "pi-1"), _status("pi-1"), False, NOW)
    view = build_view(insecure, now=NOW)
    assert [d["id"] for d in view["devices"]] == ["pi-1"] and view["refused"] == []
    assert not view["seals"]["checked"]
    assert view["seals"]["line"].startswith("seals NOT checked (--insecure): anyone on the broker")


def test_without_a_state_file_anything_is_shown_and_the_page_says_so() -> None:
    state = FleetState(FLEET)
    state.observe(*_sealed_status(Ed25519PrivateKey.generate(), "pi-1"), False, NOW)
    view = build_view(state, now=NOW)
    assert [(d["id"], d["key"], d["refused"]) for d in view["devices"]] == [("pi-1", "", 0)]
    assert not view["seals"]["checked"]
    assert view["seals"]["line"].startswith("seals NOT checked: anyone on the broker can publish")
    assert "edgefl dashboard --state FILE" in view["seals"]["line"]


def test_refusals_are_kept_for_a_bounded_number_of_devices() -> None:
    from edgefl.dashboard import fleet_state

    state, _registry, _board = _checked_state()
    rogue = Ed25519PrivateKey.generate()
    for i in range(fleet_state.MAX_REFUSED_DEVICES + 50):
        state.observe(*_sealed_status(rogue, f"ghost-{i}"), False, NOW)
    view = build_view(state, now=NOW)
    assert len(view["refused"]) == fleet_state.MAX_REFUSED_DEVICES
    assert view["seals"]["refused"] == fleet_state.MAX_REFUSED_DEVICES + 50


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_registry_is_read_only_and_may_appear_later(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    reader = DeviceRegistry(path, read_only=True)
    # Not there yet: no device is known, and nothing is created.
    assert reader.all() == [] and reader.get("pi-1") is None and not path.exists()
    AggregatorRecord(path).close()  # an aggregator's state without device keys (--insecure)
    assert reader.all() == []
    key = raw_public_key(Ed25519PrivateKey.generate())
    writer = DeviceRegistry(path)
    writer.enroll("pi-1", key)
    writer.close()
    before = _digest(path)
    assert [(e.device_id, e.state) for e in reader.all()] == [("pi-1", "enrolled")]
    for write in (lambda: reader.enroll("pi-2", key), lambda: reader.pin("pi-2", key),
                  lambda: reader.revoke("pi-1")):  # fmt: skip
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            write()
    reader.close()
    assert _digest(path) == before
    wal = tmp_path / "state.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def _view(dashboard: Dashboard) -> dict[str, object]:
    with urllib.request.urlopen(dashboard.url + "api/view", timeout=5) as response:
        result: dict[str, object] = json.loads(response.read())
    return result


def test_a_dashboard_on_the_state_file_refuses_forgeries_live_and_sees_new_enrollments(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    state_path = tmp_path / "state.sqlite"
    AggregatorRecord(state_path).close()
    registry = DeviceRegistry(state_path)
    board = Ed25519PrivateKey.generate()
    registry.enroll("pi-1", raw_public_key(board))
    registry.close()
    publisher = MqttClient(mosquitto.url, "sealed-lab-publisher")
    publisher.connect()
    dashboard = Dashboard(DashboardSettings(mosquitto.url, FLEET, state_path=state_path, port=0))
    dashboard.start()
    try:
        publisher.publish(*_sealed_status(board, "pi-1", profile="jetson"), qos=1).wait(5.0)
        assert wait_for(lambda: dashboard.source.view()["devices"] != [], 10.0)
        rogue = Ed25519PrivateKey.generate()
        publisher.publish(*_sealed_status(rogue, "pi-1", state="offline"), qos=1).wait(5.0)
        report = DeployReport("pi-1", 7, "rolled_back", reason="forged")
        publisher.publish(*_sealed_report(rogue, report), qos=1).wait(5.0)
        # A board enrolled while the dashboard runs is believed once the registry is read again.
        late = Ed25519PrivateKey.generate()
        writer = DeviceRegistry(state_path)
        writer.enroll("pi-2", raw_public_key(late))
        writer.close()
        time.sleep(1.1)  # REFRESH_S: the verifier reads the registry at most once a second
        publisher.publish(*_sealed_status(late, "pi-2"), qos=1).wait(5.0)
        assert wait_for(lambda: len(dashboard.source.view()["devices"]) == 2, 10.0)
        # Revoked while it runs: the watcher reads the registry again, pi-1's own key is refused.
        writer = DeviceRegistry(state_path)
        writer.revoke("pi-1")
        writer.close()
        time.sleep(1.1)
        publisher.publish(*_sealed_status(board, "pi-1", profile="revoked"), qos=1).wait(5.0)
        assert wait_for(lambda: dashboard.source.view()["seals"]["refused"] == 3, 10.0)
        view = _view(dashboard)
        devices = view["devices"]
        assert isinstance(devices, list)
        assert [(d["id"], d["state"], d["profile"]) for d in devices] == [
            ("pi-1", "online", "jetson"), ("pi-2", "online", "raspberry-pi"),
        ]  # fmt: skip
        assert view["deploys"] == []
        refused = view["refused"]
        assert isinstance(refused, list) and [r["line"] for r in refused] == [
            "3 messages refused in pi-1's name: unknown-device: device pi-1 was revoked"
        ]
        assert refused[0]["forged"] == 2
    finally:
        dashboard.stop()
        publisher.close()
