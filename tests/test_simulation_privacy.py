"""Privacy accounting in a whole run: `edgefl simulate` with clip and noise reports the ε spent
after every round, and `--target-epsilon` ends the run before the round that would exceed it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bundles import make_test_bundle
from click.testing import CliRunner
from conftest import RunningBroker

from edgefl.bundle import ModelBundle
from edgefl.cli import main
from edgefl.core.settings import PrivacySettings, RoundPolicy, RoundSettings
from edgefl.roles.summary import summaries_from_record, write_metrics
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.workload import load_federated_data

# dp-accounting's RDP ε at δ=1e-5 of 1, 2, 3 Gaussian rounds with noise multiplier 1 and every
# board selected (q = 5/5 = 1): tests/core/test_accounting.py checks them against the library.
EPSILONS = [4.752728336819822, 7.087861628831665, 9.087861628831664]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def simulate(bundle: ModelBundle, broker: RunningBroker, out: Path, *extra: str) -> list[dict]:
    result = CliRunner().invoke(
        main,
        ["simulate", "--devices", "5", "--rounds", "3", "--bundle", str(bundle.path),
         "--broker", broker.url, "--out", str(out), "--clip-norm", "1",
         "--noise-multiplier", "1", *extra],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [dict(row, output=result.output) for row in rows]


def test_a_noised_simulation_reports_growing_epsilon_after_every_round(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    rows = simulate(bundle, mosquitto, tmp_path)
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(EPSILONS, rel=1e-5)
    assert {r["delta"] for r in rows} == {"1e-05"}
    output = rows[0]["output"]
    assert "ε" in output and "at δ=1e-05" in output and "9.09" in output
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epsilon"] for r in data["rounds"]] == pytest.approx(EPSILONS)
    assert data["summary"]["stopped"] == ""


def test_target_epsilon_stops_the_run_before_the_round_that_would_exceed_it(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    rows = simulate(bundle, mosquitto, tmp_path, "--target-epsilon", "8")
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(EPSILONS[:2], rel=1e-5)
    output = " ".join(rows[0]["output"].split())
    assert "stopped early: privacy budget: round 3 would bring ε from 7.088 to 9.088" in output
    assert "beyond the target ε=8" in output
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    assert summary["stopped"].startswith("privacy budget: round 3")


def test_a_target_epsilon_without_noise_is_a_usage_error(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        ["simulate", "--devices", "5", "--rounds", "3", "--bundle", str(bundle.path),
         "--out", str(tmp_path), "--target-epsilon", "8"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "target_epsilon needs clip_norm and noise_multiplier" in result.output


def test_the_aggregator_records_epsilon_in_its_record_results_and_metrics_files(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    config = SimulationConfig(
        devices=5, broker_url=mosquitto.url,
        policy=RoundPolicy(rounds=2, deadline_s=10.0),
        settings=RoundSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)),
    )  # fmt: skip
    simulation = Simulation(config, bundle, load_federated_data("digits"))
    simulation.run()
    assert simulation._aggregator is not None
    record = simulation._aggregator.state
    # Every board is selected (a simulation's min_devices is its fleet): q = 1.
    expected = EPSILONS[:2]
    stored = record.metrics()
    assert [stored[n]["epsilon"] for n in (1, 2)] == pytest.approx(expected)
    assert [stored[n]["sampling_rate"] for n in (1, 2)] == [1.0, 1.0]
    assert [stored[n]["delta"] for n in (1, 2)] == [1e-5, 1e-5]
    results = [r.result for r in record.rounds()]  # what each round's result message carried
    assert [r["metrics"]["epsilon"] for r in results if r] == pytest.approx(expected)
    write_metrics(tmp_path, summaries_from_record(record))
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["epsilon"]) for r in rows] == pytest.approx(expected)
