"""The aggregator's SQLite state: what is written survives reopening the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefl.roles.record import AggregatorRecord


def test_state_round_trip_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    state = AggregatorRecord(path)
    head = {
        "0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "0.bias": np.ones(2, np.float32),
    }
    state.save_head("default", 0, 0, head)
    state.open_round(1, {"a": "default", "b": "default"}, 123.0, 0, {"epochs": 1})
    state.record_update(1, "a", "default", "accepted", samples=5, sha256="x", payload=b"bytes",
                        metrics={"loss": 0.5})  # fmt: skip
    state.record_update(1, "b", "default", "rejected", "shape", "wrong shape", size=9)
    state.record_update(1, "b", "default", "late", "round-closed", "round 1 is closed")
    state.save_strategy_state("default", {"m.0.weight": np.zeros((2, 3), np.float32)})
    state.close()

    state = AggregatorRecord(path)
    open_round = state.open_round_record()
    assert open_round is not None
    assert (open_round.round, open_round.selected, open_round.config) == (
        1, {"a": "default", "b": "default"}, {"epochs": 1},
    )  # fmt: skip
    (accepted,) = state.accepted_updates(1)
    assert (accepted.device_id, accepted.samples, accepted.payload) == ("a", 5, b"bytes")
    assert state.update_counts(1) == {"accepted": 1, "shape": 1, "late": 1}
    assert state.rejections(1) == [
        (1, "b", "shape", "wrong shape"), (1, "b", "round-closed", "round 1 is closed"),
    ]  # fmt: skip

    state.save_head("default", 1, 1, {k: v + 1 for k, v in head.items()})
    state.close_round(1, "closed", {"round": 1}, {"accuracy": 0.75})
    assert state.open_round_record() is None
    version, heads = state.latest_heads()
    assert version == 1
    np.testing.assert_array_equal(heads["default"]["0.bias"], np.full(2, 2.0, np.float32))
    np.testing.assert_array_equal(state.head("default", 0)["0.weight"], head["0.weight"])
    assert state.head_versions() == [("default", 0, 0), ("default", 1, 1)]
    assert state.metrics() == {1: {"accuracy": 0.75}}
    assert list(state.strategy_state("default")) == ["m.0.weight"]
    assert state.last_round() == 1
    state.close()
