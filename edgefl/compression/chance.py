"""Chance-level accuracy: the score a model gets without having learnt the classes, and the check.

A randomly initialised backbone (a built-in without weights) gives a bundle that predicts one
class or guesses; its accuracy sits at 1/num_classes, which a table of numbers does not make
obvious. Compression flags such stages and refuses to finish unless the user allows it.
"""

from __future__ import annotations

import math

import numpy as np

from edgefl.compression.metric import Metric
from edgefl.compression.report import CompressionReport
from edgefl.errors import ChanceAccuracyError

# The margin above chance is two standard errors of a guessing score, within these bounds: at
# least 2 points however large the test set, at most 10 so a small test set is not refused for
# being small.
MIN_MARGIN = 0.02
MAX_MARGIN = 0.10


def chance_threshold(labels: np.ndarray, num_classes: int, metric: Metric | None = None) -> float:
    """Return the accuracy at or below which a classifier counts as guessing.

    Chance is the larger of uniform guessing (1/num_classes for top-1) and always predicting the
    most common class (its share of `labels`), each scored by `metric`; the margin is two
    standard errors of an accuracy at chance on `len(labels)` samples, between `MIN_MARGIN` and
    `MAX_MARGIN`.

    Args:
        labels: the test set's class indices.
        num_classes: how many classes the head predicts.
        metric: the recipe's metric; None is top-1.

    Returns:
        The threshold, a share in [0, 1].
    """
    n = max(len(labels), 1)
    chance = (metric or Metric()).chance(labels, num_classes)
    margin = min(MAX_MARGIN, max(MIN_MARGIN, 2.0 * math.sqrt(chance * (1.0 - chance) / n)))
    return min(1.0, chance + margin)


def flag_chance(report: CompressionReport, threshold: float) -> list[str]:
    """Mark each stage of `report` whose accuracy is at or below `threshold`; return their names."""
    report.chance_accuracy = round(threshold, 4)
    flagged = []
    for stage in report.stages:
        stage.at_chance = stage.accuracy is not None and stage.accuracy <= threshold
        if stage.at_chance:
            flagged.append(stage.stage)
    return flagged


def refuse_chance(flagged: list[str], threshold: float, num_classes: int, hint: str) -> None:
    """Raise ChanceAccuracyError naming the stages at chance, unless there are none.

    Args:
        flagged: the stages at chance (from `flag_chance`).
        threshold: the chance threshold, a share.
        num_classes: how many classes the head predicts.
        hint: what the user can do about it, appended to the message (may be empty).
    """
    if not flagged:
        return
    raise ChanceAccuracyError(
        f"{', '.join(flagged)} at chance accuracy (<= {100 * threshold:.1f}% on {num_classes} "
        f"classes): the model has not learnt these classes{hint}; no bundle written "
        f"(`allow_chance` writes it anyway)"
    )
