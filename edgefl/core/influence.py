"""Bounded influence: no single update can move the global head far, whatever it claims.

Two things give an update its pull on the average: the sample count it claims (its weight) and
its size (its L2 norm). Neither can be trusted from a board nobody checks. Before a round is
aggregated, each update's weight is capped by what the device announced in its status, by a
configured maximum, and by `factor` times the round's median weight; and an update whose norm is
more than `factor` times the median norm of the round's updates is scaled down to that bound
(clipped, not dropped: a board with unusual data still counts, only less). The medians are taken
over the round's updates, so one forged update cannot raise its own bound. With fewer than
`MIN_UPDATES_FOR_MEDIAN` updates there is no meaningful median and only the absolute caps apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgefl.core.privacy import clip_by_norm, global_norm
from edgefl.head import Weights

# Below this many updates a median says little about what is normal.
MIN_UPDATES_FOR_MEDIAN = 3


@dataclass(frozen=True)
class InfluenceBound:
    """How far one update may pull the average.

    Attributes:
        factor: an update's weight and norm are capped at `factor` times the round's median
            (None: no relative bound).
        max_samples: an absolute cap on any update's weight (None: none).
    """

    factor: float | None = 10.0
    max_samples: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.factor is not None and not self.factor >= 1.0:
            raise ValueError("the influence factor must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("max_samples must be at least 1")


@dataclass(frozen=True)
class Bounded:
    """One update after bounding: its delta and weight, and what was changed."""

    delta: Weights
    samples: int
    clipped_norm: float | None = None  # the norm it had when it was scaled down
    capped_samples: int | None = None  # the weight it claimed when that was capped


def cap_samples(claimed: int, announced: int | None, maximum: int | None) -> int:
    """Return an update's weight: its claimed sample count, capped by the device's announced
    count (its status; 0 or None: not announced) and by `maximum`; at least 1."""
    weight = claimed
    if announced:
        weight = min(weight, announced)
    if maximum is not None:
        weight = min(weight, maximum)
    return max(1, weight)


def bound_updates(
    updates: Mapping[str, tuple[Weights, int]],
    announced: Mapping[str, int],
    bound: InfluenceBound,
) -> dict[str, Bounded]:
    """Cap the weights and clip the norms of a round's updates (see the module docstring).

    Args:
        updates: device -> (delta, claimed sample count).
        announced: device -> the sample count its status announced (missing: not announced).
        bound: the caps.

    Returns:
        device -> the bounded update, in the order of `updates`.
    """
    weights = {
        device: cap_samples(samples, announced.get(device), bound.max_samples)
        for device, (_, samples) in updates.items()
    }
    norms = {device: global_norm(delta) for device, (delta, _) in updates.items()}
    weight_cap = norm_cap = None
    if bound.factor is not None and len(updates) >= MIN_UPDATES_FOR_MEDIAN:
        weight_cap = bound.factor * float(np.median(list(weights.values())))
        norm_cap = bound.factor * float(np.median(list(norms.values())))
    result: dict[str, Bounded] = {}
    for device, (delta, claimed) in updates.items():
        weight = weights[device]
        if weight_cap is not None and weight > weight_cap:
            weight = max(1, int(weight_cap))
        clipped_norm = None
        if norm_cap and norms[device] > norm_cap:  # a zero median bounds nothing
            clipped_norm = norms[device]
            delta = clip_by_norm(delta, norm_cap)
        result[device] = Bounded(
            delta, weight, clipped_norm, claimed if weight != claimed else None
        )
    return result
