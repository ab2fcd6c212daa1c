"""The accuracy back-off as a search: the largest prune ratio whose accuracy drop fits the budget.

Pruning more costs more accuracy (monotone, give or take distillation noise), so the ratio is
bisected between 0 (the unpruned model, which fits) and the recipe's ratio (which did not), until
the interval is narrower than `resolution`, the tries run out or the time budget is spent. Each
try is one `evaluate(ratio)`; the search holds no model and does no I/O, so it is tested with a
literal function. Messages about tries say the measured change with its sign (`-1.20 points`
lost, `+0.30 points` gained) against the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchBudget:
    """How long the search may go on: at most `tries` evaluations, `seconds` of wall time
    (None: no limit), and no finer than `resolution` in prune ratio."""

    tries: int = 6
    seconds: float | None = None
    resolution: float = 0.05


def bisect_ratio(
    start: float,
    fits: Callable[[float], bool],
    budget: SearchBudget,
    clock: Callable[[], float] = time.monotonic,
) -> list[float]:
    """Bisect the prune ratio below `start` (which did not fit) for the largest that fits.

    Args:
        start: the ratio that was tried and did not fit.
        fits: tries a ratio; True when its accuracy drop is within the budget.
        budget: tries, seconds and resolution.
        clock: seconds, for the time budget (passed in so tests need no sleep).

    Returns:
        The ratios tried, in order.
    """
    began = clock()
    low, high = 0.0, start
    tried: list[float] = []
    while len(tried) < budget.tries and high - low >= budget.resolution:
        if budget.seconds is not None and clock() - began >= budget.seconds:
            break
        ratio = round((low + high) / 2, 4)
        tried.append(ratio)
        if fits(ratio):
            low = ratio
        else:
            high = ratio
    return tried


def describe_change(drop: float | None, budget: float | None) -> str:
    """Say what a try lost or gained: "-1.20 points (budget 1.0)", "+0.30 points"."""
    if drop is None:
        return "not measured"
    change = f"{0.0 - drop:+.2f} points"  # 0.0 - 0.0 is 0.0; -0.0 would print as -0.00
    return change if budget is None else f"{change} (budget -{budget:g})"
