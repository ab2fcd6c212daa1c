"""The head as numpy: forward pass of a layer spec, so boards need no torch to run or score it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


def head_forward(
    layers: Sequence[Mapping[str, Any]], weights: Mapping[str, np.ndarray], features: np.ndarray
) -> np.ndarray:
    """Run a head on a batch of features.

    Args:
        layers: the head's layers (see `edgefl.bundle.HeadSpec`).
        weights: parameters named `"{index}.weight"` / `"{index}.bias"`.
        features: (batch, in_features) float array.

    Returns:
        (batch, outputs) float32 logits.

    Raises:
        ValueError: a layer kind other than "linear" or "relu".
    """
    x = np.asarray(features, dtype=np.float32)
    for index, layer in enumerate(layers):
        kind = layer["kind"]
        if kind == "linear":
            x = x @ weights[f"{index}.weight"].T + weights[f"{index}.bias"]
        elif kind == "relu":
            x = np.maximum(x, 0.0)
        else:
            raise ValueError(f"unsupported head layer kind {kind!r}")
    return x.astype(np.float32, copy=False)


def init_head(layers: Sequence[Mapping[str, Any]], seed: int = 0) -> Weights:
    """Initialise head parameters like torch's nn.Linear default (uniform ±1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    weights: Weights = {}
    for index, layer in enumerate(layers):
        if layer["kind"] == "linear":
            fan_in, fan_out = int(layer["in"]), int(layer["out"])
            bound = 1.0 / np.sqrt(fan_in)
            weights[f"{index}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(
                np.float32
            )
            weights[f"{index}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return weights


def head_accuracy(
    layers: Sequence[Mapping[str, Any]],
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
) -> float:
    """Return top-1 accuracy of a head on labelled features (0.0 for an empty set)."""
    if len(labels) == 0:
        return 0.0
    predictions = head_forward(layers, weights, features).argmax(axis=1)
    return float((predictions == np.asarray(labels)).mean())


def head_digest(heads: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Return the SHA-256 (hex) that names a set of heads, as tasks and updates carry it.

    The hash runs over each task in sorted order, each parameter in sorted order, as the UTF-8
    line `"{task}/{param} {shape}\n"` (shape as comma-separated integers) followed by the values
    as little-endian float32 (docs/protocol.md). Two heads have the same digest only when every
    value is the same float32.
    """
    digest = hashlib.sha256()
    for task in sorted(heads):
        for key in sorted(heads[task]):
            value = np.ascontiguousarray(heads[task][key], dtype="<f4")
            digest.update(f"{task}/{key} {','.join(map(str, value.shape))}\n".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()
