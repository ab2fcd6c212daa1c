"""The simulation library: fleet planning, metrics files and plot, and real runs over brokers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from bundles import make_test_bundle
from conftest import RunningBroker

from edgefl.bundle import ModelBundle
from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.errors import SimulationError
from edgefl.simulation.metrics import RoundRecord, SimulationMetrics, write_metrics
from edgefl.simulation.plan import (
    ChurnEvent,
    PartitionSpec,
    parse_churn,
    parse_partition,
    plan_fleet,
)
from edgefl.simulation.plot import plot_metrics
from edgefl.simulation.runner import SimulationConfig, run_simulation, save_results
from edgefl.simulation.workload import FederatedData, load_federated_data

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
        personal_accuracy=math.nan, device_accuracy=0.25, bytes_up=3000, bytes_down=900,
        seconds=0.5, elapsed=0.5 * round_,
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


# -- real runs: the real agents and aggregator over a real broker --


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return load_federated_data("digits")


def _run(
    bundle: ModelBundle, data: FederatedData, **options: object
) -> tuple[SimulationMetrics, list[RoundRecord], list[str]]:
    seen: list[RoundRecord] = []
    statuses: list[str] = []
    # The federation's parts by name, the rest as SimulationConfig fields.
    rounds = int(options.pop("rounds"))  # type: ignore[call-overload]
    deadline_s = float(options.pop("deadline_s", 10.0))  # type: ignore[arg-type]
    seed = int(options.get("seed", 0))  # type: ignore[call-overload]
    config = SimulationConfig(
        policy=RoundPolicy(rounds=rounds, deadline_s=deadline_s),
        settings=RoundSettings(train=TrainConfig(seed=seed)),
        **options,  # type: ignore[arg-type]
    )
    metrics = run_simulation(config, bundle, data, seen.append, statuses.append)
    return metrics, seen, statuses


def test_simulation_over_the_embedded_broker_learns(
    bundle: ModelBundle, digits: FederatedData, tmp_path: Path
) -> None:
    metrics, seen, statuses = _run(bundle, digits, devices=8, rounds=3, partition="iid")
    assert any("embedded broker" in line for line in statuses)
    assert [r.round for r in seen] == [1, 2, 3]  # live callback, once per round
    assert [(r.online, r.selected, r.reported) for r in metrics.rounds] == [(8, 8, 8)] * 3
    accuracies = [r.accuracy for r in metrics.rounds]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.6
    # A float32 delta of a 32x10 head is about 1.3 KB of tensors plus the header.
    assert [1_300 < r.bytes_per_device < 3_000 for r in metrics.rounds] == [True] * 3
    assert [r.bytes_down > 8 * 1_300 for r in metrics.rounds] == [True] * 3
    assert metrics.summary["wall_s"] == pytest.approx(metrics.rounds[-1].elapsed)
    assert 50 < metrics.summary["peak_rss_mb"] < 4096
    paths = save_results(metrics, tmp_path / "out")
    assert [p.name for p in paths] == ["metrics.json", "metrics.csv", "metrics.png"]
    with (tmp_path / "out" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["round"]) for row in rows] == [1, 2, 3]
    assert float(rows[-1]["accuracy"]) == pytest.approx(accuracies[-1], abs=1e-5)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["config"]["devices"] == 8 and sum(saved["config"]["samples_per_device"]) == len(
        digits.pool
    )


def test_a_sealed_run_learns_as_an_insecure_one(
    bundle: ModelBundle, digits: FederatedData, mosquitto: RunningBroker
) -> None:
    # Sealing is on by default (keys made for the run, every device enrolled); it changes
    # nothing the federation learns.
    runs = [
        _run(bundle, digits, devices=6, rounds=3, partition="iid", broker_url=mosquitto.url,
             fleet=f"sim-{name}", insecure=name == "plain")[0]
        for name in ("sealed", "plain")
    ]  # fmt: skip
    sealed, plain = ([r.accuracy for r in run.rounds] for run in runs)
    assert [r.reported for r in runs[0].rounds] == [6, 6, 6]
    assert sealed == pytest.approx(plain, abs=0.02) and sealed[-1] > 0.6


def test_simulation_over_mosquitto_with_dropout_slow_devices_and_churn(
    bundle: ModelBundle, digits: FederatedData, mosquitto: RunningBroker
) -> None:
    metrics, _, statuses = _run(
        bundle, digits, devices=10, rounds=4, partition="dirichlet:0.5",
        broker_url=mosquitto.url, fleet="sim-churn", dropout=0.2, speed_spread=3.0,
        speed_unit_s=0.05, churn="join:0.2@2,leave:0.1@4", deadline_s=1.5, seed=1,
    )  # fmt: skip
    assert not any("embedded broker" in line for line in statuses)
    rounds = metrics.rounds
    assert [r.online for r in rounds] == [8, 10, 10, 9]
    # Every online device is selected; each reports unless it dropped out.
    for r in rounds:
        assert r.selected == r.online
        assert r.reported == r.selected - r.dropped
    assert sum(r.dropped for r in rounds) > 0
    assert rounds[-1].accuracy > rounds[0].accuracy


def test_simulation_clears_its_retained_statuses_on_a_broker_it_does_not_own(
    bundle: ModelBundle, digits: FederatedData, mosquitto: RunningBroker
) -> None:
    _run(bundle, digits, devices=3, rounds=1, broker_url=mosquitto.url, fleet="sim-clean")
    # A second run on the same fleet with fewer devices must not wait for the first run's ones.
    metrics, _, _ = _run(
        bundle, digits, devices=2, rounds=1, broker_url=mosquitto.url, fleet="sim-clean",
        deadline_s=5.0,
    )  # fmt: skip
    assert metrics.rounds[0].selected == 2 and metrics.rounds[0].reported == 2
    assert metrics.rounds[0].seconds < 4.0


def test_simulation_reports_a_bad_config_in_one_line(
    bundle: ModelBundle, digits: FederatedData
) -> None:
    with pytest.raises(SimulationError, match="`rounds` must be at least 1"):
        _run(bundle, digits, devices=2, rounds=0)
    with pytest.raises(SimulationError, match="cannot be split across 5000 devices"):
        _run(bundle, digits, devices=5000, rounds=1)
