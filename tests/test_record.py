"""The aggregator's SQLite state: what is written survives reopening the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefl.roles.record import AggregatorRecord
from edgefl.roles.summary import summaries_from_record


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

    new_head = {k: v + 1 for k, v in head.items()}
    state.close_round(1, "closed", {"round": 1}, {"accuracy": 0.75}, {"default": new_head}, 1,
                      {"default": {"m.0.weight": np.zeros((2, 3), np.float32)}})  # fmt: skip
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


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", ["heads", "strategy", "round", "metrics", "commit"])
def test_a_crash_at_any_step_of_closing_a_round_leaves_it_open_and_the_heads_as_they_were(
    tmp_path: Path, step: str
) -> None:
    def fault(at: str) -> None:
        if at == step:
            raise Crash(at)

    path = tmp_path / "state.sqlite"
    state = AggregatorRecord(path, fault)
    head = {"0.bias": np.zeros(2, np.float32)}
    state.save_head("default", 0, 0, head)
    state.open_round(1, {"a": "default"}, 1.0, 0, {})
    state.record_update(1, "a", "default", "accepted", samples=5, sha256="x", payload=b"u")
    with pytest.raises(Crash):
        state.close_round(1, "closed", {"round": 1}, {"accuracy": 0.5},
                          {"default": {"0.bias": np.ones(2, np.float32)}}, 1,
                          {"default": {"m": np.ones(1, np.float32)}})  # fmt: skip
    state = AggregatorRecord(path)  # the restarted aggregator
    assert state.latest_heads()[0] == 0 and state.strategy_state("default") == {}
    assert state.open_round_record() is not None and state.metrics() == {}
    assert [u.device_id for u in state.accepted_updates(1)] == ["a"]  # not lost
    state.close_round(1, "closed", {"round": 1}, {}, {"default": head}, 1)
    assert state.head_versions() == [("default", 0, 0), ("default", 1, 1)]


def test_a_run_keeps_its_id_until_it_finishes(tmp_path: Path) -> None:
    state = AggregatorRecord(tmp_path / "state.sqlite")
    assert state.begin_run("first") == "first"
    assert state.begin_run("second") == "first"  # restarted: the same run
    state.finish_run("first")
    assert state.begin_run("third") == "third"


def test_summaries_from_the_record_hold_every_round_and_late_rejections(tmp_path: Path) -> None:
    state = AggregatorRecord(tmp_path / "state.sqlite")
    for number in (1, 2):
        state.open_round(number, {"a": "default"}, 1.0, number - 1, {})
        state.record_update(number, "a", "default", "accepted", samples=5, sha256="x")
        result = {"round": number, "status": "closed", "head_version": number, "selected": 1,
                  "accepted": 1, "online": 2, "seconds": 0.5, "stale_devices": ["s"]}  # fmt: skip
        state.close_round(number, "closed", result, {"accuracy": 0.1 * number})
    state.record_update(1, "b", "", "rejected", "run-mismatch", "another run")  # after round 1
    state.record_update(1, "a", "", "late", "round-closed", "round 1 is closed")
    state.open_round(3, {"a": "default"}, 1.0, 2, {})  # open: not a finished round
    rows = [s.row() for s in summaries_from_record(state)]
    assert [(r["round"], r["accepted"], r["rejected"], r["late"]) for r in rows] == [
        (1, 1, 1, 1), (2, 1, 0, 0),
    ]  # fmt: skip
    assert rows[0]["rejected_run-mismatch"] == 1 and rows[1]["accuracy"] == 0.2
    assert (rows[0]["seconds"], rows[0]["stale"], rows[0]["online"]) == (0.5, 1, 2)
