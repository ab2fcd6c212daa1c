"""The simulation library: fleet planning, metrics files and plot, and real runs over brokers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgefl.errors import SimulationError
from edgefl.simulation.fleet import (
    ChurnEvent,
    PartitionSpec,
    parse_churn,
    parse_partition,
    plan_fleet,
)
from edgefl.simulation.metrics import RoundRecord, SimulationMetrics, write_metrics
from edgefl.simulation.plot import plot_metrics

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 30 per class


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        ("IID", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("shards:2", PartitionSpec("shards", shards=2)),
    ],
)
def test_parse_partition_accepts_the_three_kinds(text: str, expected: PartitionSpec) -> None:
    spec = parse_partition(text)
    assert spec == expected
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("zipf:2", "unknown partition 'zipf:2'"),
        ("dirichlet", "needs a parameter: dirichlet:ALPHA"),
        ("dirichlet:abc", "'abc' is not a number"),
        ("dirichlet:-1", "alpha must be a positive number"),
        ("dirichlet:nan", "alpha must be a positive number"),
        ("shards:0", "at least 1"),
        ("shards:1.5", "'1.5' is not a number"),
        ("iid:3", "takes no parameter"),
    ],
)
def test_bad_partition_specs_give_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(SimulationError) as info:
        parse_partition(text)
    message = str(info.value)
    assert says in message
    assert "\n" not in message


def test_parse_churn_reads_events_and_rejects_bad_ones() -> None:
    assert parse_churn("join:0.2@3, leave:0.1@5") == [
        ChurnEvent("join", 0.2, 3),
        ChurnEvent("leave", 0.1, 5),
    ]
    assert parse_churn("") == []
    for bad, says in [
        ("arrive:0.2@3", "malformed"),
        ("join:0.2", "malformed"),
        ("join:x@3", "must be a number"),
        ("join:1.5@3", "(0, 1]"),
        ("leave:0.1@1", "2 or later"),
        ("join:0.6@2,leave:0.6@3", "more than the whole fleet"),
    ]:
        with pytest.raises(SimulationError, match=None) as info:
            parse_churn(bad)
        assert says in str(info.value)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_plan_fleet_deals_every_sample_once(spec: str) -> None:
    plan = plan_fleet(LABELS, 12, spec, seed=3)
    assert len(plan.devices) == 12
    dealt = np.concatenate([d.indices for d in plan.devices])
    assert sorted(dealt.tolist()) == list(range(len(LABELS)))
    assert len({d.device_id for d in plan.devices}) == 12
    # The same seed gives the same fleet.
    again = plan_fleet(LABELS, 12, spec, seed=3)
    assert all(
        np.array_equal(a.indices, b.indices)
        for a, b in zip(plan.devices, again.devices, strict=True)
    )


def test_non_iid_partitions_skew_labels() -> None:
    def classes_per_device(spec: str) -> float:
        plan = plan_fleet(LABELS, 10, spec, seed=0)
        return float(np.mean([len(np.unique(LABELS[d.indices])) for d in plan.devices]))

    assert classes_per_device("iid") > 9
    assert classes_per_device("shards:2") <= 2
    assert classes_per_device("dirichlet:0.1") < 6


def test_heterogeneity_speed_dropout_and_churn() -> None:
    plan = plan_fleet(
        LABELS, 20, "iid", speed_spread=4.0, dropout=0.3, churn="join:0.25@3,leave:0.1@4"
    )
    speeds = [d.speed for d in plan.devices]
    assert min(speeds) >= 1.0 and max(speeds) <= 4.0 and max(speeds) > 2.0
    assert len(plan.online_in(1)) == 15  # a quarter joins at round 3
    assert len(plan.online_in(3)) == 20
    assert len(plan.online_in(4)) == 18  # a tenth leaves from round 4
    drops = [d.drops(r, plan.seed, i) for r in range(1, 11) for i, d in enumerate(plan.devices)]
    assert 0.15 < np.mean(drops) < 0.45
    # Dropout is reproducible: the same round and seed give the same answer.
    assert drops == [
        d.drops(r, plan.seed, i) for r in range(1, 11) for i, d in enumerate(plan.devices)
    ]


def test_plan_fleet_rejects_bad_options() -> None:
    with pytest.raises(SimulationError, match="cannot be split across 400 devices"):
        plan_fleet(LABELS, 400, "iid")
    with pytest.raises(SimulationError, match="speed spread"):
        plan_fleet(LABELS, 4, "iid", speed_spread=0.5)
    with pytest.raises(SimulationError, match="dropout"):
        plan_fleet(LABELS, 4, "iid", dropout=1.0)
    with pytest.raises(SimulationError, match="partition shards:100 of 300 samples failed"):
        plan_fleet(LABELS, 4, "shards:100")


def _record(round_: int, accuracy: float) -> RoundRecord:
    return RoundRecord(
        round=round_, online=4, selected=4, reported=3, dropped=1, accuracy=accuracy,
        personal_accuracy=math.nan, bytes_up=3000, bytes_down=900, seconds=0.5,
        elapsed=0.5 * round_,
    )  # fmt: skip


def test_metrics_files_and_plot(tmp_path: Path) -> None:
    metrics = SimulationMetrics({"devices": 4}, [_record(1, 0.5), _record(2, 0.75)])
    json_path, csv_path = write_metrics(metrics, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == 1
    assert [r["accuracy"] for r in data["rounds"]] == [0.5, 0.75]
    assert data["rounds"][0]["personal_accuracy"] is None  # NaN is not valid JSON
    assert data["rounds"][0]["bytes_per_device"] == 1000
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["round"] for row in rows] == ["1", "2"]
    assert rows[1]["accuracy"] == "0.75" and rows[0]["personal_accuracy"] == ""
    png = plot_metrics(metrics, tmp_path / "out" / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
