"""The ingest protocol (`edgefl.transport.ingest`): literal bytes in, checked values out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefl.errors import MessageError
from edgefl.transport import ingest, topics


def test_topics_stay_under_the_fleet_and_updates_are_shared() -> None:
    assert ingest.worker_topic("lab", "w0", "notes") == "edgefl/v1/lab/ingest/workers/w0/notes"
    assert ingest.parse_worker_topic("lab", "edgefl/v1/lab/ingest/workers/w0/partial") == (
        "w0", "partial",
    )  # fmt: skip
    assert ingest.parse_worker_topic("lab", "edgefl/v1/lab/ingest/workers/w0/other") is None
    assert ingest.parse_worker_topic("lab", "edgefl/v1/other/ingest/workers/w0/notes") is None
    shared = ingest.shared_updates("lab")
    assert shared == "$share/edgefl-ingest-lab/edgefl/v1/lab/rounds/+/update/+"
    assert topics.matches(shared, topics.round_update("lab", 3, "pi-1"))
    assert not topics.matches(shared, topics.round_task("lab", 3))
    with pytest.raises(ValueError):
        ingest.worker_topic("lab", "a/b", "notes")


def test_messages_round_trip_and_a_newer_schema_is_refused() -> None:
    collect = ingest.Collect("run", 2, "h" * 64, "c1", "fold", {"w0": {"pi-1": [10, None]}})
    assert ingest.Collect.decode(collect.encode()) == collect
    assert collect.take_of("w0") == {"pi-1": (10, None)} and collect.take_of("w1") == {}
    newer = json.loads(collect.encode())
    newer["schema_version"] = ingest.INGEST_SCHEMA_VERSION + 1
    with pytest.raises(MessageError, match="schema_version 2"):
        ingest.Collect.decode(json.dumps(newer).encode())
    newer.update(schema_version=1, surprise="ignored")  # a newer peer's addition
    assert ingest.Collect.decode(json.dumps(newer).encode()) == collect
    bad = ingest.Collect("run", 2, "h", "c1", "fold", {"w0": {"pi-1": [True, "x"]}})
    with pytest.raises(MessageError, match="weight, bound or null"):
        bad.take_of("w0")


def test_verdict_notes_are_checked_field_by_field() -> None:
    note = ["accepted", 1, "pi-1", "", "", "default", 10, "ab", 100, {"loss": 0.5}, 2]
    rows = ingest.VerdictNotes("w0", "run", [note], "s", 1).rows()
    assert rows[0]["norm"] == 2 and rows[0]["metrics"] == {"loss": 0.5}
    for wrong in (note[:-1], [*note[:6], True, *note[7:]], [*note[:2], 3, *note[3:]]):
        with pytest.raises(MessageError):
            ingest.VerdictNotes("w0", "run", [wrong]).rows()


def test_a_large_gathering_reply_is_split_and_joined_again() -> None:
    devices = [f"pi-{i}" for i in range(5)]
    header = ingest.PartialHeader("w0", "run", 1, "h", "c", "fold", devices=devices,
                                  missing=["pi-9"])  # fmt: skip
    tensors = {f"delta/{i}/w": np.full(256, i, np.float32) for i in range(5)}  # 1 KiB each
    parts = ingest.split_partial(header, tensors, max_bytes=2048)
    assert [p[0].devices for p in parts] == [["pi-0", "pi-1"], ["pi-2", "pi-3"], ["pi-4"]]
    assert [(p[0].part, p[0].parts) for p in parts] == [(0, 3), (1, 3), (2, 3)]
    decoded = [ingest.decode_partial(ingest.encode_partial(*part)) for part in parts]
    joined, joined_tensors = ingest.merge_parts(decoded)
    assert joined.devices == devices and joined.missing == ["pi-9"] and joined.parts == 1
    deltas = ingest.gathered_deltas(joined, joined_tensors)
    assert {d: float(v["w"][0]) for d, v in deltas.items()} == {d: float(i) for i, d in
                                                                enumerate(devices)}  # fmt: skip
    assert ingest.split_partial(header, tensors) == [(header, tensors)]  # small: one message


def test_a_partial_that_is_not_one_is_refused() -> None:
    with pytest.raises(MessageError):
        ingest.decode_partial(b"not safetensors")
    plain = ingest.encode_partial(ingest.PartialHeader("w", "r", 1, "h", "c", "close"), {})
    assert ingest.decode_partial(plain)[0].phase == "close"
