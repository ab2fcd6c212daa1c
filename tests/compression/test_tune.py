"""`edgefl tune`: the Pareto front, the study's storage, and a real search on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefl.bundle import load_bundle
from edgefl.cli import main
from edgefl.compression.recipe import load_recipe
from edgefl.compression.tune import (
    TrialResult,
    TuneRequest,
    baseline_params,
    pareto_front,
    study_url,
    tune,
)
from edgefl.data import load_digits
from edgefl.head import head_accuracy
from edgefl.runtime import load_backbone


def _trial(number: int, accuracy: float, latency: float, size: float, feasible: bool = True):
    return TrialResult(number, {}, accuracy, 0.0, latency, size, "", {}, feasible=feasible)


def test_the_front_keeps_feasible_trials_nothing_beats_on_every_objective() -> None:
    trials = [
        _trial(0, 0.95, 2.0, 10.0),
        _trial(1, 0.96, 1.0, 10.0),  # beats 0 on accuracy and latency
        _trial(2, 0.90, 0.5, 30.0),  # fastest
        _trial(3, 0.99, 0.1, 1.0, feasible=False),  # would beat all, but misses a budget
        _trial(4, 0.96, 1.0, 12.0),  # as 1 but larger
    ]
    assert [t.number for t in pareto_front(trials)] == [2, 1]


def test_a_study_is_a_url_or_a_file(tmp_path: Path) -> None:
    assert study_url("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert study_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/study.db"
    assert study_url(str(tmp_path / "s" / "a.db"), tmp_path).endswith("/s/a.db")


def test_the_first_trial_is_the_base_recipes_setting() -> None:
    assert baseline_params(load_recipe("raspberry-pi"), "onnx") == {
        "prune_ratio": 0.5,
        "importance": "l2",
        "distill_epochs": 12,
        "temperature": 4.0,
        "precision": "int8",
        "calibration_samples": 256,
        "activations": "uint8",
    }
    assert "activations" not in baseline_params(load_recipe("raspberry-pi"), "tflite")


@pytest.mark.slow
def test_tune_searches_writes_the_front_and_the_chosen_bundle_and_resumes(tmp_path: Path) -> None:
    digits = load_digits()
    train, evaluation = tmp_path / "train.npz", tmp_path / "eval.npz"
    np.savez(train, X=digits.X[:1000].reshape(-1, 64), y=digits.y[:1000])
    np.savez(evaluation, X=digits.X[1000:].reshape(-1, 64), y=digits.y[1000:])
    out = tmp_path / "tune"
    seen: list[int] = []
    request = TuneRequest(
        model="digits-mlp", data=train, out=out, artifact_format="onnx", threads=1, trials=3,
        max_accuracy_drop=2.0, eval_data=evaluation,
    )  # fmt: skip
    result = tune(request, on_trial=lambda t: seen.append(t.number))
    assert seen == [0, 1, 2] and len(result.trials) == 3
    assert result.baseline is not None and result.baseline.number == 0
    assert result.chosen is not None and result.chosen in result.pareto
    assert all(t.feasible for t in result.pareto)
    # Chosen: the fastest on the front, timed again round-robin after the search.
    retimed = [t.retimed_ms for t in result.pareto]
    assert all(ms is not None and ms > 0 for ms in retimed)
    assert result.chosen.retimed_ms == min(ms for ms in retimed if ms is not None)
    assert result.baseline.retimed_ms is not None
    # The chosen bundle, run in onnxruntime as a board runs it, scores what the trial measured.
    bundle = load_bundle(out / "bundle")
    recipe = load_recipe(out / "recipe.toml")
    assert [(a.format, a.precision) for a in recipe.artifacts] == [
        ("onnx", result.chosen.params["precision"])
    ]
    assert recipe.max_accuracy_drop == 2.0
    backbone = load_backbone(bundle.file(bundle.manifest.backbones()[0]))
    features = backbone.run(digits.X[1000:].reshape(-1, 64))
    assert head_accuracy(
        bundle.head_spec().layers, bundle.head_weights(), features, digits.y[1000:]
    ) == pytest.approx(result.chosen.accuracy)
    written = json.loads((out / "pareto.json").read_text())
    assert written["chosen"] == result.chosen.number and len(written["trials"]) == 3
    assert written["ensemble"] is None  # a trial fits: no ensemble is proposed
    # Without a latency budget, bundles of trials off the front (never to be chosen) are gone.
    kept = {t.number for t in result.pareto} | {0}
    assert {int(p.name) for p in (out / "trials").iterdir()} == kept
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same study continues: one more trial, four in all; the CLI prints the front.
    cli = CliRunner().invoke(
        main,
        ["tune", "--model", "digits-mlp", "--data", str(train), "--eval-data", str(evaluation),
         "--out", str(out), "--format", "onnx", "--threads", "1", "--trials", "1",
         "--max-accuracy-drop", "2"],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert "Pareto front of 4 trials" in cli.output and "chosen trial" in cli.output
    assert len(json.loads((out / "pareto.json").read_text())["trials"]) == 4


@pytest.mark.slow
def test_tune_exits_1_when_no_trial_meets_the_budgets(tmp_path: Path) -> None:
    out = tmp_path / "tune"
    result = CliRunner().invoke(
        main,
        ["tune", "--model", "digits-mlp", "--data", "digits", "--out", str(out), "--format",
         "onnx", "--threads", "1", "--trials", "1", "--budget-ms", "0.000001"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "trial 0: " in result.output and "(outside the budgets)" in result.output
    assert "no trial met the budgets; nothing chosen" in result.stderr
    written = json.loads((out / "pareto.json").read_text())
    assert written["chosen"] is None and written["budgets"]["max_latency_ms"] == 0.000001
    assert not (out / "bundle").exists() and not (out / "recipe.toml").exists()
