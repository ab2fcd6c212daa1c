"""Ensembles of small candidates, for when no single one is accurate enough within the latency.

A board can run two small backbones (each with its head) one after the other and average their
class probabilities; the ensemble costs the sum of their latencies and sizes. `best_ensemble`
scores every pair and triple of candidates that fits the budgets on the same evaluation set and
returns the most accurate; `bundle_probabilities` gives a trial bundle's probabilities as a board
computes them (its backbone in its runtime, its head in numpy).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefl.compression.metric import Metric


@dataclass(frozen=True)
class Member:
    """One candidate: its class probabilities on the evaluation set, latency and size."""

    name: int
    probabilities: np.ndarray
    latency_ms: float
    size_kb: float


@dataclass(frozen=True)
class Ensemble:
    """A proposed ensemble: its members, score under the metric, summed latency and size."""

    members: tuple[int, ...]
    accuracy: float
    latency_ms: float
    size_kb: float


def best_ensemble(
    members: list[Member],
    labels: np.ndarray,
    metric: Metric,
    max_latency_ms: float | None,
    max_size_kb: float | None,
    largest: int = 3,
) -> Ensemble | None:
    """Return the most accurate ensemble of 2..`largest` members that fits the budgets.

    Ties go to the faster ensemble. The accuracy is the metric of the mean of the members'
    probabilities. None when no two members fit together.
    """
    best: Ensemble | None = None
    for size in range(2, largest + 1):
        for group in itertools.combinations(members, size):
            latency = sum(m.latency_ms for m in group)
            kilobytes = sum(m.size_kb for m in group)
            if max_latency_ms is not None and latency > max_latency_ms:
                continue
            if max_size_kb is not None and kilobytes > max_size_kb:
                continue
            mean = np.mean([m.probabilities for m in group], axis=0)
            candidate = Ensemble(
                tuple(m.name for m in group), metric.score(mean, labels), latency, kilobytes
            )
            if best is None or (candidate.accuracy, -candidate.latency_ms) > (
                best.accuracy,
                -best.latency_ms,
            ):
                best = candidate
    return best


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def bundle_probabilities(
    bundle_dir: str | Path, inputs: np.ndarray, threads: int = 1
) -> np.ndarray:
    """Class probabilities of a bundle's first backbone and default head on `inputs`.

    Raises:
        BundleError: not a bundle; RuntimeLoadError: the backbone cannot be loaded.
    """
    from edgefl.bundle import load_bundle
    from edgefl.head import head_forward
    from edgefl.runtime import load_backbone

    bundle = load_bundle(bundle_dir)
    runner = load_backbone(bundle.file(bundle.manifest.backbones()[0]), threads=threads)
    spec = bundle.head_spec()
    weights: Mapping[str, np.ndarray] = bundle.head_weights()
    return softmax(head_forward(spec.layers, weights, runner.run(inputs)))
