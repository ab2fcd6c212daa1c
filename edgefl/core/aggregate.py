"""Aggregation math: many (weights, sample count) pairs in, one set of weights out; no I/O."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgefl.head import Weights

Update = tuple[Weights, int]


def check_updates(updates: Sequence[Update]) -> list[str]:
    """Check that updates can be combined and return their parameter names in order.

    Args:
        updates: (weights, sample count) pairs.

    Returns:
        The parameter names of the first update, in its order.

    Raises:
        ValueError: no updates, a negative sample count, or keys or shapes that differ.
    """
    if len(updates) == 0:
        raise ValueError("cannot aggregate an empty list of updates")
    first = updates[0][0]
    keys = list(first)
    for position, (weights, samples) in enumerate(updates):
        if int(samples) < 0:
            raise ValueError(f"update {position} has a negative sample count ({samples})")
        if set(weights) != set(keys):
            missing = sorted(set(keys) - set(weights))
            extra = sorted(set(weights) - set(keys))
            raise ValueError(
                f"update {position} has different keys than update 0 "
                f"(missing {missing}, extra {extra})"
            )
        for key in keys:
            shape, expected = np.shape(weights[key]), np.shape(first[key])
            if shape != expected:
                raise ValueError(
                    f"update {position} has shape {shape} for {key!r}, expected {expected}"
                )
    return keys


def _stack(updates: Sequence[Update], key: str) -> np.ndarray:
    """Stack one parameter of every update along a new first axis, in float64 for exact sums."""
    return np.stack([np.asarray(weights[key], dtype=np.float64) for weights, _ in updates])


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Return `values` in the dtype of `like` when that is a float dtype, else float32."""
    dtype = like.dtype if np.issubdtype(np.asarray(like).dtype, np.floating) else np.float32
    return np.asarray(values, dtype=dtype)


def aggregate_weighted(updates: Sequence[Update]) -> Weights:
    """Average updates weighted by their sample counts (FedAvg).

    Args:
        updates: (weights, sample count) pairs with identical keys and shapes.

    Returns:
        The weighted mean, per parameter, in each parameter's float dtype.

    Raises:
        ValueError: see `check_updates`, or every sample count is zero.
    """
    keys = check_updates(updates)
    counts = np.array([int(samples) for _, samples in updates], dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("cannot weight updates: every sample count is zero")
    share = counts / total
    first = updates[0][0]
    mean: Weights = {}
    for key in keys:
        # Accumulated one update at a time in float64: stacking a thousand updates first cost a
        # copy of all of them (50 MB for a 1280x10 head) for the same sum.
        total_key = np.zeros(np.shape(first[key]), dtype=np.float64)
        for (weights, _), weight in zip(updates, share, strict=True):
            # A float64 scalar times a float32 array is computed in float64: one temporary.
            total_key += np.asarray(weights[key]) * weight
        mean[key] = _cast_like(total_key, np.asarray(first[key]))
    return mean


def aggregate_median(updates: Sequence[Update]) -> Weights:
    """Take the coordinate-wise median of updates (sample counts are ignored, by design).

    Args:
        updates: (weights, sample count) pairs with identical keys and shapes.

    Returns:
        The median of each coordinate across updates.

    Raises:
        ValueError: see `check_updates`.
    """
    keys = check_updates(updates)
    first = updates[0][0]
    return {
        key: _cast_like(np.median(_stack(updates, key), axis=0), np.asarray(first[key]))
        for key in keys
    }


def aggregate_trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> Weights:
    """Average each coordinate after dropping its largest and smallest values.

    `floor(trim_fraction * len(updates))` values are dropped at each end of every coordinate, so
    up to that many arbitrary (Byzantine) updates cannot pull the result outside the honest range.
    Sample counts are ignored: weighting would let one device inflate its influence.

    Args:
        updates: (weights, sample count) pairs with identical keys and shapes.
        trim_fraction: fraction dropped at each end, in [0, 0.5).

    Returns:
        The trimmed mean of each coordinate.

    Raises:
        ValueError: see `check_updates`, or `trim_fraction` outside [0, 0.5).
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    keys = check_updates(updates)
    cut = int(np.floor(trim_fraction * len(updates)))
    first = updates[0][0]
    result: Weights = {}
    for key in keys:
        ordered = np.sort(_stack(updates, key), axis=0)
        kept = ordered[cut : len(updates) - cut]
        result[key] = _cast_like(kept.mean(axis=0), np.asarray(first[key]))
    return result


def krum_scores(updates: Sequence[Update], num_byzantine: int) -> np.ndarray:
    """Return each update's Krum score: summed squared distance to its closest neighbours.

    The neighbourhood is the `n - num_byzantine - 2` closest other updates (at least one), as in
    Blanchard et al. 2017; the Byzantine-resilience guarantee needs `n >= 2 * num_byzantine + 3`.

    Args:
        updates: (weights, sample count) pairs with identical keys and shapes.
        num_byzantine: how many updates may be arbitrary, >= 0.

    Returns:
        (n,) float64 scores, lower is more central; a single update scores 0.

    Raises:
        ValueError: see `check_updates`, or `num_byzantine` is negative.
    """
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    keys = check_updates(updates)
    flat = np.stack(
        [
            np.concatenate([np.asarray(w[k], dtype=np.float64).ravel() for k in keys])
            for w, _ in updates
        ]
    )
    count = len(updates)
    if count == 1:
        return np.zeros(1)
    squared = (flat**2).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * flat @ flat.T, 0.0)
    neighbours = max(count - num_byzantine - 2, 1)
    scores = np.empty(count)
    for i in range(count):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


def krum(updates: Sequence[Update], num_byzantine: int, multi: int = 1) -> Weights:
    """Select the `multi` updates with the lowest Krum scores and average them by samples.

    `multi=1` is Krum (the single most central update); larger values are Multi-Krum.

    Args:
        updates: (weights, sample count) pairs with identical keys and shapes.
        num_byzantine: how many updates may be arbitrary.
        multi: how many updates to keep, 1 <= multi <= len(updates).

    Returns:
        The sample-weighted mean of the selected updates (plain mean if all counts are zero).

    Raises:
        ValueError: see `check_updates`, or `multi` or `num_byzantine` out of range.
    """
    scores = krum_scores(updates, num_byzantine)
    if not 1 <= multi <= len(updates):
        raise ValueError(f"multi must be between 1 and the number of updates, got {multi}")
    # A stable sort keeps ties in arrival order, so the result is deterministic.
    chosen = [updates[i] for i in np.argsort(scores, kind="stable")[:multi]]
    if sum(int(samples) for _, samples in chosen) == 0:
        chosen = [(weights, 1) for weights, _ in chosen]
    return aggregate_weighted(chosen)
