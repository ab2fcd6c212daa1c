"""Ensembles of small candidates: scored on literal probabilities, within the budgets."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.compression.ensemble import Member, best_ensemble, softmax
from edgefl.compression.metric import Metric

LABELS = np.array([0, 1, 2, 0, 1, 2])
RIGHT, UNSURE_WRONG = 0.8, (0.3, 0.4, 0.3)


def _member(name: int, sure: list[int], latency: float, size: float = 10.0) -> Member:
    """Confidently right on the samples in `sure`, narrowly wrong on the others."""
    rows = []
    for index, label in enumerate(LABELS):
        row = np.full(3, (1 - RIGHT) / 2)
        if index in sure:
            row[label] = RIGHT
        else:
            row = np.roll(np.array(UNSURE_WRONG), label)  # 0.4 on the next class, 0.3 on the label
        rows.append(row)
    return Member(name, np.array(rows), latency, size)


def test_two_complementary_candidates_beat_each_alone_within_the_latency() -> None:
    a = _member(1, [0, 1, 2, 3], latency=1.0)
    b = _member(2, [2, 3, 4, 5], latency=1.0)
    guess = Member(3, np.full((6, 3), 1 / 3), 0.5, 1.0)
    top1 = Metric()
    assert top1.score(a.probabilities, LABELS) == pytest.approx(4 / 6)
    best = best_ensemble([a, b, guess], LABELS, top1, max_latency_ms=2.0, max_size_kb=None)
    assert best is not None and best.members == (1, 2)
    assert (best.accuracy, best.latency_ms, best.size_kb) == (1.0, 2.0, 20.0)


def test_nothing_fits_when_every_pair_is_over_a_budget() -> None:
    a = _member(1, [0, 1, 2, 3], latency=1.0, size=30.0)
    b = _member(2, [2, 3, 4, 5], latency=1.0, size=30.0)
    assert best_ensemble([a, b], LABELS, Metric(), 1.5, None) is None
    assert best_ensemble([a, b], LABELS, Metric(), 5.0, 50.0) is None
    assert best_ensemble([a], LABELS, Metric(), None, None) is None


def test_softmax_is_stable_and_normalised() -> None:
    probabilities = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_allclose(probabilities[1], 1 / 3)
