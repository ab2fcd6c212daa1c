"""When a board replaces its personal head: only when the new one is not worse on its own data.

A round's locally trained head is a candidate for the board's personal head (the one `predict`
uses). A task from the network can make it worse (epochs=0 gives back the global head, a huge
learning rate diverges), so the board replaces its personal head only when the candidate's
accuracy on a fixed share of its own samples is at least the current one's. The share is drawn
once from a fixed seed, so it is the same every round.

The share is not taken out of training: excluding 20% of every board's samples slowed the
federation itself (the 8-device digits simulation reached 0.55 instead of > 0.6 accuracy after 3
rounds), and the heads compared (the current personal head and the candidate) have both trained
on it, so the comparison is even. It catches the failures it is for: a round that trains nothing
or diverges.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgefl.head import Weights, head_accuracy

# The share of a board's samples a new personal head is judged on (see the module docstring).
HOLDOUT_FRACTION = 0.2
# Seeds the split: fixed, so a board holds out the same samples in every round and run.
HOLDOUT_SEED = 20261203


def judging_split(
    samples: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (training, held out), the same for the same arguments.

    Args:
        samples: how many samples the board has.
        fraction: the share held out, rounded down: a board with fewer than 1/fraction samples
            holds none out (it then judges heads on all its samples).
        seed: seeds the draw.

    Returns:
        Two sorted index arrays; together they hold every index once.
    """
    return _split(samples, fraction, seed)


@functools.lru_cache(maxsize=64)
def _split(samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # The same split every round of a board (and of every board of a size, in a simulation):
    # drawn once. Read-only, since callers share the arrays.
    held = int(samples * fraction)
    order = np.random.default_rng(seed).permutation(samples)
    training, held_out = np.sort(order[held:]), np.sort(order[:held])
    training.flags.writeable = held_out.flags.writeable = False
    return training, held_out


def keeps_candidate(
    layers: Sequence[Mapping[str, Any]],
    current: Weights | None,
    candidate: Weights,
    features: np.ndarray,
    labels: np.ndarray,
) -> bool:
    """Return whether `candidate` should replace the personal head `current`.

    Args:
        layers: the head's layers.
        current: the personal head in use (or, before any, the head inference falls back to);
            None, or one of other shapes (another bundle), always gives way.
        candidate: the newly trained head.
        features, labels: the held-out samples the decision is made on.

    Returns:
        True when the candidate's accuracy on them is at least the current head's (a tie
        replaces: the candidate is the more recent), or there is nothing to compare on.
    """
    if current is None or len(labels) == 0 or not same_shapes(current, candidate):
        return True
    new = head_accuracy(layers, candidate, features, labels)
    return new >= head_accuracy(layers, current, features, labels)


def same_shapes(a: Weights, b: Weights) -> bool:
    """Return whether two heads have the same parameters with the same shapes."""
    return a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) for k in a)
