"""The dashboard's pure part: messages folded into a fleet state, the state turned into the
page's JSON, and the aggregator's record read without ever being written."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edgefl.dashboard.fleet_state import FleetState
from edgefl.dashboard.record_reader import ReadOnlyRecord, RecordPoller
from edgefl.dashboard.server import check_bind
from edgefl.dashboard.view import build_view
from edgefl.delivery.release import DeployReport
from edgefl.roles.record import AggregatorRecord
from edgefl.roles.summary import RoundSummary
from edgefl.transport import topics
from edgefl.transport.messages import DeviceStatus, RoundResult, RoundTask, encode_round_task

FLEET = "lab"
NOW = 1_000_000.0


def status(device: str, state: str = "online", **fields: object) -> bytes:
    return DeviceStatus(device, state, heartbeat_s=10.0, time=NOW, **fields).encode()  # type: ignore[arg-type]


def task(number: int, selected: list[str]) -> bytes:
    message = RoundTask(number, selected, ["default"], 0, 1, deadline_s=30.0)
    return encode_round_task(message, {"default": {}})


def result(number: int, **fields: object) -> bytes:
    values: dict[str, object] = dict(
        round=number, status="closed", head_version=number, selected=2, accepted=2
    )
    values.update(fields)
    return RoundResult(**values).encode()  # type: ignore[arg-type]


def test_devices_show_presence_profile_bundle_runtime_and_go_stale_by_time_alone() -> None:
    state = FleetState(FLEET)
    state.observe(
        topics.device_status(FLEET, "pi-02"),
        status("pi-02", profile="raspberry-pi", model_version=3, bundle_digest="ab" * 32,
               artifact="backbone-int8.onnx", runtime="onnxruntime",
               provider="CPUExecutionProvider", last_round=7, samples=120),
        retained=False, received_at=NOW,
    )  # fmt: skip
    state.observe(topics.device_status(FLEET, "pi-01"), status("pi-01", "offline"), False, NOW)
    view = build_view(state, now=NOW + 5)
    first, second = view["devices"]
    assert (first["id"], first["state"], second["id"], second["state"]) == (
        "pi-02", "online", "pi-01", "offline",
    )  # fmt: skip
    assert first["profile"] == "raspberry-pi" and first["model_version"] == 3
    assert first["bundle_digest"] == "ab" * 32 and first["last_round"] == 7
    assert first["running"] == "backbone-int8.onnx onnxruntime/CPUExecutionProvider"
    assert first["last_seen"] == NOW and first["samples"] == 120
    assert view["counts"] == {"online": 1, "stale": 0, "offline": 1, "unknown": 0}
    # Three missed 10 s heartbeats later the same status no longer counts as online.
    assert build_view(state, now=NOW + 31)["counts"]["stale"] == 1
    # A cleared retained status removes the device.
    assert state.observe(topics.device_status(FLEET, "pi-01"), b"", True, NOW)
    assert [d["id"] for d in build_view(state, now=NOW)["devices"]] == ["pi-02"]


def test_rounds_show_accuracy_participants_rejections_bytes_duration_and_epsilon() -> None:
    state = FleetState(FLEET)
    payload = task(1, ["a", "b", "c"])
    state.observe(topics.round_task(FLEET, 1), payload, False, NOW)
    running = build_view(state, now=NOW)["rounds"]
    assert [(r["round"], r["status"], r["selected"]) for r in running] == [(1, "running", 3)]
    assert running[0]["bytes_down"] == 3 * len(payload)
    # The aggregator clears the task when it closes the round, then publishes the result.
    state.observe(topics.round_task(FLEET, 1), b"", False, NOW + 2.5)
    state.observe(
        topics.round_result(FLEET, 1),
        result(1, selected=3, accepted=2, online=4, rejected={"shape": 1},
               answers={"a": "accepted", "b": "shape", "c": "accepted"},
               metrics={"accuracy": 0.75, "bytes_per_update": 1000.0, "epsilon": 1.5,
                        "delta": 1e-5}),
        False, NOW + 2.6,
    )  # fmt: skip
    state.observe(topics.device_status(FLEET, "b"), status("b", last_round=0), False, NOW)
    view = build_view(state, now=NOW + 3)
    (row,) = view["rounds"]
    assert (row["status"], row["accepted"], row["selected"], row["online"]) == ("closed", 2, 3, 4)
    assert row["rejected"] == {"shape": 1} and row["rejected_total"] == 1
    assert row["accuracy"] == 0.75 and row["bytes_up"] == 2000
    assert row["bytes_down"] == 3 * len(payload)
    assert row["seconds"] == pytest.approx(2.5)
    assert view["privacy"]["epsilon"] == 1.5 and view["privacy"]["delta"] == 1e-5
    assert "ε=1.5 spent" in view["privacy"]["line"]
    assert view["rejected_by_code"] == {"shape": 1}
    # The result says at once which round a device answered, before its next heartbeat does.
    (device,) = view["devices"]
    assert (device["id"], device["last_round"], device["last_answer"]) == ("b", 1, "shape")
    json.dumps(view, allow_nan=False)  # what the server sends: strict JSON


def test_the_record_wins_over_retained_results_for_counts_and_duration() -> None:
    state = FleetState(FLEET)
    state.observe(topics.round_result(FLEET, 1), result(1, rejected={}), True, NOW)
    late_rejection = RoundSummary(1, "closed", 1, 2, 2, {"round-closed": 1}, 1, 4.25,
                                  {"accuracy": 0.5}, online=2)  # fmt: skip
    (row,) = build_view(state, [late_rejection], now=NOW)["rounds"]
    assert (row["rejected"], row["late"], row["seconds"], row["accuracy"]) == (
        {"round-closed": 1}, 1, 4.25, 0.5,
    )  # fmt: skip
    assert build_view(state, now=NOW)["privacy"]["epsilon"] is None


def test_deploys_in_progress_come_first_with_their_progress() -> None:
    state = FleetState(FLEET)
    for device, report in {
        "pi-01": DeployReport("pi-01", 4, "installed", time=NOW),
        "pi-02": DeployReport("pi-02", 4, "downloading", received_bytes=512, total_bytes=2048),
    }.items():
        state.observe(topics.deploy_report(FLEET, device), report.to_bytes(), False, NOW)
    deploys = build_view(state, now=NOW)["deploys"]
    assert [(d["device"], d["state"], d["received_bytes"], d["total_bytes"]) for d in deploys] == [
        ("pi-02", "downloading", 512, 2048), ("pi-01", "installed", 0, 0),
    ]  # fmt: skip
    rows = {d["id"]: d for d in build_view(state, now=NOW)["devices"]}
    assert rows["pi-01"]["deploy"] == "v4 installed" and rows["pi-01"]["state"] == "unknown"


def test_bad_and_foreign_messages_are_counted_or_ignored_never_shown() -> None:
    state = FleetState(FLEET)
    assert state.observe(topics.device_status(FLEET, "x"), b"not json", False, NOW)
    assert state.observe(topics.device_status(FLEET, "x"), status("someone-else"), False, NOW)
    assert not state.observe(topics.device_status("other", "y"), status("y"), False, NOW)
    view = build_view(state, now=NOW)
    assert view["devices"] == [] and view["ignored_messages"] == 2


def test_a_sealed_status_is_shown_without_its_seal() -> None:
    sealed = pytest.importorskip("edgefl.transport.sealed")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    topic = topics.device_status(FLEET, "pi-01")
    payload = sealed.seal(Ed25519PrivateKey.generate(), topic, status("pi-01", profile="jetson"))
    state = FleetState(FLEET)
    state.observe(topic, payload, False, NOW)
    assert build_view(state, now=NOW)["devices"][0]["profile"] == "jetson"


def test_the_record_is_read_through_a_read_only_connection(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    record = AggregatorRecord(path)
    record.open_round(1, {"a": "default"}, NOW + 10, 0, {})
    record.record_update(1, "a", "", "rejected", "shape", "bad shape", 10)
    record.close_round(1, "closed", {"round": 1, "selected": 1, "accepted": 0, "seconds": 3.0},
                       {"accuracy": 0.4})  # fmt: skip
    record.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    poller = RecordPoller(path)
    (summary,) = poller.summaries()
    assert (summary.round, summary.rejected, summary.seconds) == (1, {"shape": 1}, 3.0)
    reader = ReadOnlyRecord(path)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.set_meta("x", "y")
    reader._db.close()
    poller.close()
    # The database is byte for byte as it was; SQLite may add its (empty) WAL index files, as
    # any reader of a WAL database does, but nothing is written into the log.
    assert path.read_bytes() == before["state.sqlite"]
    wal = tmp_path / "state.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    # A record that does not exist yet is not created: the dashboard shows no rounds until it is.
    missing = RecordPoller(tmp_path / "later.sqlite")
    assert missing.summaries() == [] and "no aggregator record" in missing.error
    view = build_view(FleetState(FLEET), missing.summaries(), NOW, True, "later.sqlite",
                      missing.error)  # fmt: skip
    assert "no aggregator record" in view["record_error"]
    assert not (tmp_path / "later.sqlite").exists()


def test_binding_beyond_loopback_needs_a_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ValueError, match="needs --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ValueError, match="needs --token"):
        check_bind("192.168.1.5", "")
