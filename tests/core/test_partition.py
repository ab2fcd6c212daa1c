"""Partitions of a labelled set across devices: coverage, sizes, label skew."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.partition import partition_dirichlet, partition_iid, partition_shards

LABELS = np.repeat(np.arange(10), 50)


def covers_once(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def classes_per_device(parts: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))


def test_iid_gives_near_equal_mixed_parts() -> None:
    parts = partition_iid(LABELS, 7, np.random.default_rng(0))
    assert covers_once(parts, len(LABELS))
    assert {len(p) for p in parts} <= {71, 72}
    assert classes_per_device(parts) == 10


def test_dirichlet_skew_follows_alpha_and_is_seeded() -> None:
    skewed = partition_dirichlet(LABELS, 20, 0.1, np.random.default_rng(0))
    mixed = partition_dirichlet(LABELS, 20, 100.0, np.random.default_rng(0))
    assert covers_once(skewed, len(LABELS)) and covers_once(mixed, len(LABELS))
    assert min(len(p) for p in skewed) >= 1
    assert classes_per_device(skewed) < 5 < classes_per_device(mixed)
    again = partition_dirichlet(LABELS, 20, 0.1, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again, strict=True))


def test_dirichlet_min_size_is_enforced() -> None:
    parts = partition_dirichlet(LABELS, 10, 0.5, np.random.default_rng(1), min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="cannot give"):
        partition_dirichlet(LABELS, 10, 0.5, np.random.default_rng(1), min_size=60)


def test_shards_give_each_device_few_classes() -> None:
    parts = partition_shards(LABELS, 10, 2, np.random.default_rng(0))
    assert covers_once(parts, len(LABELS))
    assert {len(p) for p in parts} == {50}
    assert classes_per_device(parts) <= 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: partition_iid(LABELS, 0, r), "devices must be >= 1"),
        (lambda r: partition_iid(LABELS, 501, r), "cannot split 500"),
        (lambda r: partition_dirichlet(LABELS, 5, 0.0, r), "alpha must be > 0"),
        (lambda r: partition_shards(LABELS, 10, 0, r), "shards_per_device"),
        (lambda r: partition_iid(LABELS.reshape(50, 10), 2, r), "one-dimensional"),
    ],
)
def test_bad_arguments_are_refused(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0))
