"""Bounded influence: capped weights and clipped norms, from literal updates."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.aggregate import aggregate_weighted
from edgefl.core.influence import InfluenceBound, bound_updates, cap_samples
from edgefl.core.privacy import global_norm


def _delta(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)}


def test_a_claimed_sample_count_is_capped_by_the_status_and_the_maximum() -> None:
    assert cap_samples(100, announced=40, maximum=None) == 40
    assert cap_samples(100, announced=None, maximum=64) == 64
    assert cap_samples(30, announced=40, maximum=64) == 30
    assert cap_samples(10**15, announced=0, maximum=None) == 10**15  # nothing to cap by
    assert cap_samples(0, announced=None, maximum=None) == 1


def test_one_huge_update_is_clipped_to_factor_times_the_median_norm() -> None:
    updates = {f"d{i}": (_delta(0.1 * (i + 1)), 10) for i in range(4)}
    updates["evil"] = (_delta(1e30), 10)
    bounded = bound_updates(updates, {}, InfluenceBound(factor=10.0))
    median = float(np.median([global_norm(d) for d, _ in updates.values()]))
    assert global_norm(bounded["evil"].delta) == pytest.approx(10.0 * median, rel=1e-5)
    assert bounded["evil"].clipped_norm == pytest.approx(global_norm(updates["evil"][0]))
    for device in ("d0", "d1", "d2", "d3"):  # the honest ones are untouched
        assert bounded[device].clipped_norm is None
        np.testing.assert_array_equal(bounded[device].delta["w"], updates[device][0]["w"])
    # The average moves by at most factor x median / n, not by 1e30.
    mean = aggregate_weighted([(b.delta, b.samples) for b in bounded.values()])
    assert global_norm(mean) < 10.0 * median


def test_a_forged_sample_count_cannot_dominate_the_average() -> None:
    updates = {f"d{i}": (_delta(1.0), 50) for i in range(5)}
    updates["evil"] = (_delta(-1.0), 10**15)
    bounded = bound_updates(updates, {}, InfluenceBound(factor=10.0))
    assert bounded["evil"].samples == 500
    assert bounded["evil"].capped_samples == 10**15
    mean = aggregate_weighted([(b.delta, b.samples) for b in bounded.values()])
    # Without the cap the mean would be -1 everywhere; with it the honest majority still moves it.
    assert float(mean["b"][0]) == pytest.approx((5 * 50 - 500) / (5 * 50 + 500))
    announced = bound_updates(updates, {"evil": 20}, InfluenceBound(factor=10.0))
    assert announced["evil"].samples == 20


def test_few_updates_get_only_the_absolute_caps() -> None:
    updates = {"a": (_delta(1.0), 10), "b": (_delta(1e6), 10**9)}
    bounded = bound_updates(updates, {}, InfluenceBound(factor=10.0, max_samples=100))
    assert bounded["b"].clipped_norm is None
    assert bounded["b"].samples == 100
    assert bound_updates(updates, {}, InfluenceBound(factor=None))["b"].samples == 10**9


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        InfluenceBound(factor=0.5).check()
    with pytest.raises(ValueError, match="max_samples"):
        InfluenceBound(max_samples=0).check()
