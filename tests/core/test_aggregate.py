"""Aggregation math on literal arrays."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.aggregate import aggregate_median, aggregate_trimmed_mean, aggregate_weighted, krum


def w(weight: list[float], bias: float) -> dict[str, np.ndarray]:
    return {"0.weight": np.array([weight], np.float32), "0.bias": np.array([bias], np.float32)}


def test_weighted_mean_weights_by_samples() -> None:
    result = aggregate_weighted([(w([1.0, 2.0], 0.0), 1), (w([4.0, 8.0], 3.0), 3)])
    np.testing.assert_allclose(result["0.weight"], [[3.25, 6.5]])
    np.testing.assert_allclose(result["0.bias"], [2.25])
    assert result["0.weight"].dtype == np.float32


def test_weighted_mean_of_one_update_is_that_update() -> None:
    result = aggregate_weighted([(w([1.5, -2.0], 0.25), 7)])
    np.testing.assert_array_equal(result["0.weight"], [[1.5, -2.0]])


def test_median_ignores_one_outlier() -> None:
    updates = [(w([1.0, 1.0], 1.0), 1), (w([2.0, 2.0], 2.0), 1), (w([1e6, -1e6], 1e6), 100)]
    result = aggregate_median(updates)
    np.testing.assert_allclose(result["0.weight"], [[2.0, 1.0]])
    np.testing.assert_allclose(result["0.bias"], [2.0])


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    updates = [(w([v, -v], v), 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    result = aggregate_trimmed_mean(updates, 0.2)
    np.testing.assert_allclose(result["0.weight"], [[3.0, -3.0]])
    np.testing.assert_allclose(aggregate_trimmed_mean(updates, 0.0)["0.bias"], [22.0])


def test_krum_picks_the_central_update_and_multi_krum_averages() -> None:
    updates = [
        (w([1.0, 1.0], 0.0), 10),
        (w([1.1, 1.0], 0.0), 10),
        (w([0.95, 1.0], 0.0), 30),
        (w([50.0, -50.0], 9.0), 10),
    ]
    np.testing.assert_allclose(krum(updates, num_byzantine=1)["0.weight"], [[1.0, 1.0]])
    multi = krum(updates, num_byzantine=1, multi=2)
    np.testing.assert_allclose(multi["0.weight"], [[0.9625, 1.0]], rtol=1e-6)
    # Multi-Krum of everything is FedAvg: the attacker is back in.
    assert krum(updates, num_byzantine=1, multi=4)["0.bias"][0] == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([], "empty"),
        ([(w([1.0, 2.0], 0.0), 1), ({"0.weight": np.zeros((1, 2))}, 1)], "missing"),
        ([(w([1.0, 2.0], 0.0), 1), (w([1.0, 2.0, 3.0], 0.0), 1)], "shape"),
        ([(w([1.0, 2.0], 0.0), 0)], "zero"),
        ([(w([1.0, 2.0], 0.0), -1)], "negative"),
    ],
)
def test_bad_input_raises_a_clear_value_error(updates: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_weighted(updates)


def test_out_of_range_parameters_are_rejected() -> None:
    updates = [(w([1.0, 2.0], 0.0), 1)] * 3
    with pytest.raises(ValueError, match="trim_fraction"):
        aggregate_trimmed_mean(updates, 0.5)
    with pytest.raises(ValueError, match="multi"):
        krum(updates, num_byzantine=0, multi=4)
    with pytest.raises(ValueError, match="num_byzantine"):
        krum(updates, num_byzantine=-1)
