"""`edgefl simulate` through the CLI: output, files, exit codes and one-line errors."""

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


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def test_simulate_prints_the_round_table_and_writes_metrics(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["simulate", "--devices", "6", "--rounds", "3", "--bundle", str(bundle.path),
         "--partition", "shards:3", "--broker", mosquitto.url, "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 devices, 3 rounds, shards:3" in result.output
    assert "final accuracy" in result.output and "peak RSS" in result.output
    for name in ("metrics.json", "metrics.csv", "metrics.png"):
        assert f"wrote {out / name}" in result.output.replace("\n", "")
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["reported"] for row in rows] == ["6", "6", "6"]
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["partition"] == "shards:3"
    assert data["config"]["broker_url"] == mosquitto.url
    assert data["summary"]["final_accuracy"] == pytest.approx(float(rows[-1]["accuracy"]), 1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition", "zipf:2"], "error: unknown partition 'zipf:2'; use iid, dirichlet:ALPHA"),
        (["--partition", "dirichlet:x"], "error: partition 'dirichlet:x': 'x' is not a number"),
        (["--churn", "join:0.2"], "error: churn event 'join:0.2' is malformed"),
        (["--dropout", "1.5"], "error: dropout must be in [0, 1) (got 1.5)"),
        (["--devices", "5000"], "error: 880 samples cannot be split across 5000 devices"),
    ],
)
def test_bad_options_give_a_one_line_error(
    bundle: ModelBundle, tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        main, ["simulate", "--bundle", str(bundle.path), "--out", str(tmp_path), *args]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and lines[0].startswith(message), result.output
    assert not (tmp_path / "metrics.json").exists()


def test_a_missing_bundle_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["simulate", "--bundle", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "is not a bundle: manifest.json not found" in result.output


@pytest.mark.slow
def test_simulate_without_a_bundle_builds_the_fl_digits_bundle_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_CACHE", str(tmp_path / "cache"))
    args = ["simulate", "--devices", "5", "--rounds", "2", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(
        (tmp_path / "cache" / "simulation" / "fl-digits-v1" / "manifest.json").read_text()
    )
    assert manifest["name"] == "fl-digits"
    assert [a["format"] for a in manifest["artifacts"] if a["role"] == "backbone"] == ["onnx"]
    assert manifest["heads"]["default"]["layers"] == [{"kind": "linear", "in": 64, "out": 10}]
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["config"]["bundle_name"] == "fl-digits"
    assert data["rounds"][-1]["accuracy"] > 0.3


USER_STRATEGY = """
from edgefl.core.strategies import FedAvg

CALLS = []

class CountingFedAvg(FedAvg):
    name = "counting-fedavg"

    def aggregate(self, global_weights, deltas):
        CALLS.append(len(deltas))
        return super().aggregate(global_weights, deltas)

def make():
    return CountingFedAvg()
"""


def test_a_strategy_from_a_users_module_runs_in_simulate(
    bundle: ModelBundle, mosquitto: RunningBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    name = f"edgefl_user_strategy_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(USER_STRATEGY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = CliRunner().invoke(
            main,
            ["simulate", "--devices", "3", "--rounds", "2", "--bundle", str(bundle.path),
             "--partition", "iid", "--broker", mosquitto.url, "--strategy", f"{name}:make",
             "--weight-decay", "0.001", "--out", str(tmp_path / "run")],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert importlib.import_module(name).CALLS == [3, 3]
    finally:
        sys.modules.pop(name, None)


def test_a_bug_inside_a_run_is_not_a_usage_error(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefl.simulation.runner import Simulation

    def broken(self: Simulation) -> None:
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(Simulation, "run", broken)
    result = CliRunner().invoke(
        main, ["simulate", "--bundle", str(bundle.path), "--out", str(tmp_path), "--devices", "3"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "Usage" not in result.output and "error:" not in result.output
