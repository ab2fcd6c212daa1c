"""Wire messages: round trips, and strict rejection of anything malformed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefl.core.codecs import decode_delta, encode_delta
from edgefl.errors import MessageError
from edgefl.transport import presence
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    encode_round_task,
    encode_update_error,
    read_update_header,
    update_metadata,
)


def _status_dict(**changes: object) -> dict[str, object]:
    data = json.loads(DeviceStatus("pi-01", "online", samples=12, runtimes=["onnx"]).encode())
    data.update(changes)
    return data


def test_status_round_trip() -> None:
    status = DeviceStatus(
        "pi-01", "online", arch="aarch64", runtimes=["onnx", "tflite"], memory_mb=3900,
        samples=120, model_version=3, heartbeat_s=30.0,
    )  # fmt: skip
    assert DeviceStatus.decode(status.encode()) == status
    assert json.loads(status.encode())["schema_version"] == 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps(_status_dict(schema_version=99)).encode(), "schema_version 99"),
        (json.dumps(_status_dict(schema_version="1")).encode(), "no valid schema_version"),
        (json.dumps({k: v for k, v in _status_dict().items() if k != "device_id"}).encode(),
         "lacks the field 'device_id'"),
        (json.dumps(_status_dict(samples="12")).encode(), "samples must be an integer"),
        (json.dumps(_status_dict(samples=True)).encode(), "samples must be an integer"),
        (json.dumps(_status_dict(runtimes=[1])).encode(), "wrong type|must be a string"),
        (json.dumps(_status_dict(state="asleep")).encode(), "must be 'online' or 'offline'"),
        (json.dumps(_status_dict(samples=-1)).encode(), "must not be negative"),
        (json.dumps(_status_dict(heartbeat_s=-5)).encode(), "heartbeat_s must not be negative"),
        (b'{"schema_version": 1, "device_id": "a", "state": "online", "time": NaN}',
         "finite number"),
    ],
)  # fmt: skip
def test_status_rejections(payload: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message):
        DeviceStatus.decode(payload)


def test_result_round_trip_and_rejection() -> None:
    result = RoundResult(3, "closed", 3, 10, 8, {"shape": 1, "duplicate": 1}, 1, {"accuracy": 0.9})
    assert RoundResult.decode(result.encode()) == result
    with pytest.raises(MessageError, match="'closed' or 'failed'"):
        RoundResult.decode(result.encode().replace(b'"closed"', b'"open"'))


def test_task_round_trip_carries_every_head() -> None:
    heads = {
        "default": {"0.weight": np.ones((10, 4), np.float32), "0.bias": np.zeros(10, np.float32)},
        "pets": {"0.weight": np.full((2, 4), 2.0, np.float32), "0.bias": np.ones(2, np.float32)},
    }
    task = RoundTask(4, ["a", "b"], ["default", "pets"], 3, 1, 30.0, {"epochs": 2, "lr": 0.05})
    decoded, decoded_heads = decode_round_task(encode_round_task(task, heads))
    assert decoded == task
    assert set(decoded_heads) == {"default", "pets"}
    np.testing.assert_array_equal(decoded_heads["pets"]["0.weight"], heads["pets"]["0.weight"])


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage!", (10**9).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"],
)
def test_task_garbage_is_a_message_error(payload: bytes) -> None:
    with pytest.raises(MessageError):
        decode_round_task(payload)


def test_update_header_travels_in_the_delta_metadata() -> None:
    header = UpdateHeader(2, "pi-01", "default", 40, 1, metrics={"loss": 0.5})
    delta = {"0.weight": np.full((10, 4), 0.25, np.float32), "0.bias": np.zeros(10, np.float32)}
    for codec in ("float32", "int8", "topk"):
        payload = encode_delta(delta, codec, metadata=update_metadata(header))
        assert read_update_header(payload) == header
        decoded, metadata = decode_delta(payload)
        assert metadata["codec"] == codec
        assert decoded["0.weight"].shape == (10, 4)


def test_error_update_has_no_tensors_and_says_why() -> None:
    header = UpdateHeader(2, "pi-01", "default", 0, 1, status="error", error_code="no-data",
                          reason="the device has no labelled samples")  # fmt: skip
    payload = encode_update_error(header)
    assert read_update_header(payload).reason == "the device has no labelled samples"
    assert len(payload) < 400


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 3,
        b"{json but not safetensors}",
        encode_delta({"w": np.zeros(2, np.float32)}),  # safetensors without the edgefl header
        encode_delta({"w": np.zeros(2, np.float32)}, metadata={"edgefl": "{not json"}),
        encode_delta({"w": np.zeros(2, np.float32)}, metadata={"edgefl": '{"schema_version": 1}'}),
    ],
)
def test_update_header_rejections(payload: bytes) -> None:
    with pytest.raises(MessageError):
        read_update_header(payload)


def test_fields_from_a_newer_peer_are_ignored() -> None:
    # A fleet upgrades one board at a time: a newer agent's extra field must not make an older
    # aggregator drop its status (and the other way round).
    status = DeviceStatus.decode(json.dumps(_status_dict(battery=0.8, extra={"a": 1})).encode())
    assert status == DeviceStatus.decode(json.dumps(_status_dict()).encode())
    result = RoundResult(3, "closed", 3, 10, 8)
    newer = json.loads(result.encode()) | {"future_field": [1, 2]}
    assert RoundResult.decode(json.dumps(newer).encode()) == result


def test_old_messages_without_liveness_fields_still_decode() -> None:
    status = DeviceStatus.decode(b'{"schema_version": 1, "device_id": "a", "state": "online"}')
    assert (status.heartbeat_s, status.time) == (0.0, 0.0)
    old_result = b'{"schema_version":1,"round":2,"status":"closed","head_version":2,' \
        b'"selected":3,"accepted":3}'  # fmt: skip
    result = RoundResult.decode(old_result)
    assert (result.online, result.stale) == (0, 0)


def test_a_status_is_online_only_while_it_is_fresh() -> None:
    beating = DeviceStatus("pi", "online", heartbeat_s=10.0, time=1000.0)
    # Window: three heartbeats.
    assert presence.presence(beating, last_seen=1000.0, now=1029.0) == "online"
    assert presence.presence(beating, last_seen=1000.0, now=1031.0) == "stale"
    # A fixed window overrides the announced interval, also for devices without a heartbeat.
    assert presence.presence(beating, 1000.0, 1031.0, override_s=60.0) == "online"
    silent = DeviceStatus("pi", "online")
    assert presence.presence(silent, last_seen=0.0, now=1e9) == "online"
    assert presence.presence(silent, last_seen=0.0, now=1e9, override_s=60.0) == "stale"
    # Offline is offline however fresh.
    gone = DeviceStatus("pi", "offline", heartbeat_s=10.0, time=1000.0)
    assert presence.presence(gone, last_seen=1000.0, now=1000.0) == "offline"


def test_a_retained_status_counts_from_its_own_time_capped_at_arrival() -> None:
    status = DeviceStatus("pi", "online", heartbeat_s=10.0, time=500.0)
    assert presence.seen_at(status, received_at=2000.0, retained=False) == 2000.0
    assert presence.seen_at(status, received_at=2000.0, retained=True) == 500.0
    ahead = DeviceStatus("pi", "online", heartbeat_s=10.0, time=9e9)  # device clock far ahead
    assert presence.seen_at(ahead, received_at=2000.0, retained=True) == 2000.0
    undated = DeviceStatus("pi", "online", heartbeat_s=10.0)
    assert presence.seen_at(undated, received_at=2000.0, retained=True) == 2000.0
