"""Clipping and noise on literal arrays."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.privacy import add_gaussian_noise, clip_by_norm, global_norm


def test_global_norm_spans_all_tensors() -> None:
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0, 0.0]])}) == pytest.approx(5.0)
    assert global_norm({}) == 0.0


def test_clip_scales_down_only_when_over_the_bound() -> None:
    delta = {"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)}
    clipped = clip_by_norm(delta, 1.0)
    np.testing.assert_allclose(clipped["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    assert clipped["a"].dtype == np.float32
    unchanged = clip_by_norm(delta, 10.0)
    np.testing.assert_array_equal(unchanged["b"], [4.0])
    assert unchanged["b"] is not delta["b"]


def test_clip_refuses_bad_bounds_and_non_finite_deltas() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm({"a": np.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_by_norm({"a": np.array([np.nan])}, 1.0)


def test_noise_has_the_requested_spread_and_is_reproducible() -> None:
    delta = {"w": np.zeros((200, 100), np.float32)}
    noisy = add_gaussian_noise(delta, 0.5, np.random.default_rng(1))
    assert noisy["w"].dtype == np.float32
    assert noisy["w"].std() == pytest.approx(0.5, rel=0.02)
    assert abs(noisy["w"].mean()) < 0.01
    again = add_gaussian_noise(delta, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(noisy["w"], again["w"])
    np.testing.assert_array_equal(delta["w"], 0.0)  # input untouched
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(delta, -1.0, np.random.default_rng(0))
