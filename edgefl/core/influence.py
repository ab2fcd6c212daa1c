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


@dataclass(frozen=True)
class BoundPlan:
    """How one update is bounded, decided from its weight and norm alone (no delta needed).

    Ingest workers (`edgefl.roles.ingest_worker`) hold the deltas and the coordinator only their
    claims and norms: it plans from those, the workers apply the plan to what they hold.
    """

    samples: int  # the weight it counts with
    clip_to: float | None = None  # the norm it is scaled down to (None: kept as it is)
    clipped_norm: float | None = None  # the norm it had, when clipped
    capped_samples: int | None = None  # the weight it claimed, when that was capped


def plan_bounds(
    claims: Mapping[str, tuple[int, float]],
    announced: Mapping[str, int],
    bound: InfluenceBound,
) -> dict[str, BoundPlan]:
    """Decide each update's weight and norm bound from (claimed samples, L2 norm) per device.

    Args:
        claims: device -> (claimed sample count, its delta's L2 norm), one round and task.
        announced: device -> the sample count its status announced (missing: not announced).
        bound: the caps.

    Returns:
        device -> its plan, in the order of `claims`.
    """
    weights = {
        device: cap_samples(samples, announced.get(device), bound.max_samples)
        for device, (samples, _) in claims.items()
    }
    norms = {device: norm for device, (_, norm) in claims.items()}
    weight_cap = norm_cap = None
    if bound.factor is not None and len(claims) >= MIN_UPDATES_FOR_MEDIAN:
        weight_cap = bound.factor * float(np.median(list(weights.values())))
        norm_cap = bound.factor * float(np.median(list(norms.values())))
    plans: dict[str, BoundPlan] = {}
    for device, (claimed, norm) in claims.items():
        weight = weights[device]
        if weight_cap is not None and weight > weight_cap:
            weight = max(1, int(weight_cap))
        clip = norm_cap if norm_cap and norm > norm_cap else None  # a zero median bounds nothing
        plans[device] = BoundPlan(
            weight, clip, norm if clip is not None else None,
            claimed if weight != claimed else None,
        )  # fmt: skip
    return plans


def apply_bound(delta: Weights, plan: BoundPlan) -> Weights:
    """Return `delta` scaled down to its plan's norm bound (unchanged when it has none)."""
    return delta if plan.clip_to is None else clip_by_norm(delta, plan.clip_to)


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
    claims = {device: (samples, global_norm(delta)) for device, (delta, samples) in updates.items()}
    plans = plan_bounds(claims, announced, bound)
    result: dict[str, Bounded] = {}
    for device, (delta, _) in updates.items():
        plan = plans[device]
        bounded = apply_bound(delta, plan)
        result[device] = Bounded(bounded, plan.samples, plan.clipped_norm, plan.capped_samples)
    return result
