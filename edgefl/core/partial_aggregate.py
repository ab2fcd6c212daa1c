"""Partial aggregates: an ingest worker's share of a round folded into a sum, and sums combined.

FedAvg, FedProx, FedAdam and FedYogi see a round's deltas only through their sample-weighted
mean (`Strategy.weighted_sum`), so each worker can send the sum of its bounded, weighted deltas
and the total weight instead of the deltas, and the coordinator adds the sums: the mean is the
same up to the order of float64 additions. Robust strategies (median, trimmed mean, Krum) need
every delta, so workers gather them instead. Pure: numpy in, numpy out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edgefl.core.influence import BoundPlan, apply_bound
from edgefl.head import Weights


@dataclass
class PartialSum:
    """Σ weight × bounded delta over some updates of one task (float64), and Σ weight."""

    total: Weights
    weight: float
    count: int = 0


def fold_weighted(updates: Iterable[tuple[Weights, BoundPlan]]) -> PartialSum | None:
    """Fold updates of one task into their weighted sum, each bounded as its plan says.

    Args:
        updates: (delta, its plan from `edgefl.core.influence.plan_bounds`), all with the
            same parameters and shapes (validated updates of one task).

    Returns:
        The sum (None: no updates).
    """
    bounded = [(apply_bound(delta, plan), float(plan.samples)) for delta, plan in updates]
    if not bounded:
        return None
    weights = np.array([weight for _, weight in bounded], dtype=np.float64)
    total: dict[str, np.ndarray] = {}
    for name, first in bounded[0][0].items():
        # One product of the weights with the stacked deltas instead of an add per update:
        # a worker folds hundreds of updates while its round closes.
        stacked = np.stack([np.asarray(delta[name], dtype=np.float64) for delta, _ in bounded])
        total[name] = np.tensordot(weights, stacked, axes=1).reshape(np.shape(first))
    return PartialSum(total, float(weights.sum()), len(bounded))


def combine_sums(parts: Iterable[PartialSum]) -> PartialSum | None:
    """Add partial sums of one task (None: none given).

    Raises:
        ValueError: the parts hold different parameters or shapes.
    """
    combined: PartialSum | None = None
    for part in parts:
        if combined is None:
            combined = PartialSum({k: np.array(v, np.float64) for k, v in part.total.items()},
                                  part.weight, part.count)  # fmt: skip
            continue
        if set(part.total) != set(combined.total) or any(
            np.shape(part.total[k]) != np.shape(v) for k, v in combined.total.items()
        ):
            raise ValueError("partial sums hold different parameters or shapes")
        for name, values in part.total.items():
            combined.total[name] += values
        combined.weight += part.weight
        combined.count += part.count
    return combined


def mean_delta(part: PartialSum, like: Mapping[str, np.ndarray]) -> Weights:
    """Return the weighted mean delta Σ w·Δ / Σ w, in the dtype of `like` (the head's).

    Raises:
        ValueError: the total weight is not positive.
    """
    if not part.weight > 0:
        raise ValueError("cannot average a partial sum of weight 0")
    return {
        name: (values / part.weight).astype(np.asarray(like[name]).dtype)
        for name, values in part.total.items()
    }
