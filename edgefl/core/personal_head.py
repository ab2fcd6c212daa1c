"""When a board replaces its personal head: only when the new one is not worse on held-out data.

A round's locally trained head is a candidate for the board's personal head (the one `predict`
uses). A task from the network can make it worse (epochs=0 gives back the global head, a huge
learning rate diverges), so the board keeps a fixed share of its own samples out of training and
replaces its personal head only when the candidate's accuracy on that share is at least the
current one's. The share is drawn once from a fixed seed, so it is the same every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgefl.head import Weights, head_accuracy

# The share of a board's samples kept out of training to judge personal heads.
HOLDOUT_FRACTION = 0.2
# Seeds the split: fixed, so a board holds out the same samples in every round and run.
HOLDOUT_SEED = 20261203


def holdout_split(
    samples: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (training, held out), the same for the same arguments.

    Args:
        samples: how many samples the board has.
        fraction: the share held out, rounded down: a board with fewer than 1/fraction samples
            holds none out (it then judges heads on its training samples, see `keeps_candidate`).
        seed: seeds the draw.

    Returns:
        Two sorted index arrays; together they hold every index once.
    """
    held = int(samples * fraction)
    order = np.random.default_rng(seed).permutation(samples)
    return np.sort(order[held:]), np.sort(order[:held])


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
    if current is None or len(labels) == 0 or not _same_shapes(current, candidate):
        return True
    new = head_accuracy(layers, candidate, features, labels)
    return new >= head_accuracy(layers, current, features, labels)


def _same_shapes(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) for k in a)
