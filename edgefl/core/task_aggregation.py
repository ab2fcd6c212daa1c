"""Closing a round's arithmetic: bound each update's influence, then aggregate per task.

Shared by the synchronous round engine (`edgefl.core.rounds`) and the buffered asynchronous one
(`edgefl.core.async_rounds`), which also scales each bounded delta by its staleness weight.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefl.core.influence import InfluenceBound, bound_updates
from edgefl.core.settings import AcceptancePolicy
from edgefl.core.strategies import Strategy
from edgefl.head import Weights


def aggregate_tasks(
    heads: Mapping[str, Weights],
    strategies: Mapping[str, Strategy],
    updates: Mapping[str, tuple[str, Weights, int]],
    announced: Mapping[str, int],
    acceptance: AcceptancePolicy,
    scale: Mapping[str, float] | None = None,
) -> tuple[dict[str, Weights], int, int]:
    """Bound each task's updates (`edgefl.core.influence`) and aggregate them with its strategy.

    Args:
        heads: each task's current head.
        strategies: each task's strategy.
        updates: key -> (task, delta, claimed samples), in the order to sum them.
        announced: key -> the samples its device's status announced.
        acceptance: the influence bounds.
        scale: key -> a factor its bounded delta is multiplied by (async staleness weights).

    Returns:
        (the new heads, how many updates were clipped, how many capped).
    """
    bound = InfluenceBound(acceptance.influence_factor or None, acceptance.max_samples)
    by_task: dict[str, dict[str, tuple[Weights, int]]] = {}
    for key, (task, delta, samples) in updates.items():
        by_task.setdefault(task, {})[key] = (delta, samples)
    new_heads = dict(heads)
    clipped = capped = 0
    for task, task_updates in by_task.items():
        bounded = bound_updates(task_updates, announced, bound)
        clipped += sum(b.clipped_norm is not None for b in bounded.values())
        capped += sum(b.capped_samples is not None for b in bounded.values())
        factor = scale or {}
        deltas = [(_scaled(b.delta, factor.get(key, 1.0)), b.samples) for key, b in bounded.items()]
        new_heads[task] = strategies[task].aggregate(heads[task], deltas)
    return new_heads, clipped, capped


def _scaled(delta: Weights, factor: float) -> Weights:
    if factor == 1.0:
        return delta
    return {name: (values * factor).astype(values.dtype) for name, values in delta.items()}
