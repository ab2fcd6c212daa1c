"""Chance-level accuracy: the threshold on literal label sets, and which stages it flags."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.compression.chance import chance_threshold, flag_chance, refuse_chance
from edgefl.compression.report import CompressionReport, StageReport
from edgefl.errors import ChanceAccuracyError


def test_threshold_is_chance_plus_two_standard_errors_within_bounds() -> None:
    balanced = np.repeat(np.arange(4), 25)  # 100 samples, 4 classes: 0.25 + 2*sqrt(.1875/100)
    assert chance_threshold(balanced, 4) == pytest.approx(0.25 + 0.0866, abs=1e-4)
    skewed = np.array([0] * 80 + [1] * 20)  # always answering 0 scores 80%
    assert chance_threshold(skewed, 2) == pytest.approx(0.88)
    many = np.repeat(np.arange(10), 100_000)  # the margin never falls below 2 points
    assert chance_threshold(many, 10) == pytest.approx(0.12)
    few = np.arange(3)  # nor rises above 10 for a tiny test set
    assert chance_threshold(few, 3) == pytest.approx(1 / 3 + 0.1)


def test_stages_at_or_below_the_threshold_are_flagged_and_refused() -> None:
    report = CompressionReport("m", "r", 10, 10)
    for name, score in (("original", 0.9), ("pruned", 0.3), ("onnx int8", 0.25)):
        report.stages.append(StageReport(name, "torch", "fp32", 1, 100, accuracy=score))
    assert flag_chance(report, 0.3) == ["pruned", "onnx int8"]
    assert [s.at_chance for s in report.stages] == [False, True, True]
    assert report.to_dict()["chance_accuracy"] == 0.3
    with pytest.raises(
        ChanceAccuracyError, match=r"^pruned, onnx int8 at chance accuracy \(<= 30\.0% on 4"
    ):
        refuse_chance(["pruned", "onnx int8"], 0.3, 4, "")
    refuse_chance([], 0.3, 4, "")  # nothing flagged: nothing raised
