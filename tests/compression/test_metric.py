"""The recipe's accuracy metric: top-1, top-K, within-N, on literal logits and in a compression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefl.compression.chance import chance_threshold
from edgefl.compression.metric import Metric
from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.compression.recipe import load_recipe
from edgefl.errors import RecipeError

LOGITS = np.array(
    [
        [0.0, 5.0, 4.0, 1.0],  # argmax 1, top-2 {1, 2}
        [3.0, 0.0, 1.0, 2.0],  # argmax 0, top-2 {0, 3}
        [0.0, 1.0, 2.0, 3.0],  # argmax 3, top-2 {3, 2}
    ]
)
LABELS = np.array([2, 3, 0])


@pytest.mark.parametrize(
    ("text", "hits"),
    [
        ("top-1", [False, False, False]),
        ("top-2", [True, True, False]),
        ("top-4", [True, True, True]),
        ("within-1", [True, False, False]),
        ("within-3", [True, True, True]),
        ("within-0", [False, False, False]),
    ],
)
def test_metrics_count_what_they_say(text: str, hits: list[bool]) -> None:
    metric = Metric.parse(text)
    assert metric.name == text
    assert metric.hits(LOGITS, LABELS).tolist() == hits
    assert metric.score(LOGITS, LABELS) == pytest.approx(sum(hits) / 3)


def test_agreement_takes_the_reference_prediction_as_the_label() -> None:
    reference = np.eye(4)[[1, 0, 0]]  # predicts 1, 0, 0
    assert Metric.parse("top-1").agreement(reference, LOGITS) == pytest.approx(2 / 3)
    assert Metric.parse("within-2").agreement(reference, LOGITS) == pytest.approx(2 / 3)
    assert Metric.parse("within-3").agreement(reference, LOGITS) == 1.0


def test_chance_follows_the_metric() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    # top-1 on 10 classes: the most common class's share, 0.5, beats 1/10.
    assert Metric().chance(labels, 10) == 0.5
    assert Metric.parse("top-2").chance(labels, 10) == 0.8
    # within-1 on 10 ordinal classes: predicting class 1 is within 1 of every label.
    assert Metric.parse("within-1").chance(labels, 10) == 1.0
    assert Metric.parse("within-1").chance(np.arange(10), 10) == pytest.approx(0.3)
    uniform = np.repeat(np.arange(100), 5)
    assert chance_threshold(uniform, 100, Metric.parse("top-5")) == pytest.approx(0.05 + 0.02)


@pytest.mark.parametrize("bad", ["top-0", "top5", "within--1", "accuracy", 3])
def test_a_bad_metric_in_a_recipe_is_an_error_naming_the_key(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "r.toml"
    value = json.dumps(bad)
    path.write_text(f'metric = {value}\n[[artifacts]]\nformat = "onnx"\n')
    with pytest.raises(RecipeError, match=r"'metric' must be top-1, top-K \(K >= 1\) or within-N"):
        load_recipe(path)


def test_a_within_n_recipe_scores_every_stage_and_the_report_with_it(tmp_path: Path) -> None:
    recipe = tmp_path / "within.toml"
    recipe.write_text(
        'metric = "within-1"\nmax_accuracy_drop = 1.0\n[[artifacts]]\nformat = "onnx"\n'
        'precision = "int8"\ncalibration_samples = 64\n'
    )
    top1 = tmp_path / "top1.toml"
    top1.write_text(recipe.read_text().replace('metric = "within-1"', ""))
    within = compress(CompressRequest("digits-mlp", recipe, "digits", tmp_path / "a"))
    plain = compress(CompressRequest("digits-mlp", top1, "digits", tmp_path / "b"))
    assert within.report is not None and plain.report is not None
    assert within.report.metric == "within-1" and plain.report.metric == "top-1"
    for kept, top in zip(within.report.stages, plain.report.stages, strict=True):
        # Being within one class is at least as often right as being the class.
        assert kept.accuracy is not None and top.accuracy is not None
        assert kept.accuracy >= top.accuracy
    assert within.report.stages[0].accuracy > plain.report.stages[0].accuracy
    written = json.loads((tmp_path / "a" / "report.json").read_text())
    assert written["metric"] == "within-1"
    assert (
        written["chance_accuracy"]
        > json.loads((tmp_path / "b" / "report.json").read_text())["chance_accuracy"]
    )
