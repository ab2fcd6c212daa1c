"""The head as numpy: forward pass of a layer spec, so boards need no torch to run or score it.

A head is Linear/ReLU layers (`HeadSpec.layers`, what trains and federates) followed by output
operations (`HeadSpec.outputs`): element-wise steps a model's forward applies after its last
Linear, such as a pitch tracker's sigmoid. Every output operation keeps the order of the values in
a row (sigmoid, tanh, softmax, log-softmax, scaling by a positive factor plus a shift), so the
argmax, and with it accuracy and training, is that of the logits: training minimises
cross-entropy on the logits (the last Linear's outputs), and the operations only shape what the
head outputs. A reader that ignores `outputs` (an older edgefl) therefore still predicts the same
classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]

# The output operations a head may end with; each keeps the order of the values in a row.
OUTPUT_OPS: tuple[str, ...] = ("sigmoid", "tanh", "softmax", "log_softmax", "affine")


def check_output_ops(outputs: Sequence[Mapping[str, Any]]) -> None:
    """Check a head's output operations (see the module docstring).

    Raises:
        ValueError: an unknown operation, or an affine one whose scale is not a positive number.
    """
    for index, op in enumerate(outputs):
        kind = op.get("op")
        if kind not in OUTPUT_OPS:
            raise ValueError(
                f"head output operation {index} is {kind!r}; supported: {', '.join(OUTPUT_OPS)}"
            )
        if kind == "affine":
            scale, shift = op.get("scale", 1.0), op.get("shift", 0.0)
            if not isinstance(scale, int | float) or not isinstance(shift, int | float):
                raise ValueError(f"head output operation {index} (affine) needs numbers")
            if not scale > 0 or not np.isfinite(scale) or not np.isfinite(shift):
                raise ValueError(
                    f"head output operation {index} scales by {scale!r}; only a finite positive "
                    "scale keeps the order of the outputs"
                )


def apply_output_ops(outputs: Sequence[Mapping[str, Any]], logits: np.ndarray) -> np.ndarray:
    """Apply a head's output operations to its logits, row-wise (float32 out).

    Raises:
        ValueError: see `check_output_ops`.
    """
    check_output_ops(outputs)
    x = np.asarray(logits, dtype=np.float32)
    for op in outputs:
        kind = op["op"]
        if kind == "sigmoid":
            # exp of a non-positive number only: no overflow warning for large logits.
            e = np.exp(-np.abs(x))
            x = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        elif kind == "tanh":
            x = np.tanh(x)
        elif kind in ("softmax", "log_softmax"):
            shifted = x - x.max(axis=-1, keepdims=True)
            log_total = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            x = shifted - log_total if kind == "log_softmax" else np.exp(shifted - log_total)
        else:
            x = x * np.float32(op.get("scale", 1.0)) + np.float32(op.get("shift", 0.0))
    return np.asarray(x, dtype=np.float32)


def head_forward(
    layers: Sequence[Mapping[str, Any]],
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    outputs: Sequence[Mapping[str, Any]] = (),
) -> np.ndarray:
    """Run a head on a batch of features.

    Args:
        layers: the head's layers (see `edgefl.bundle.HeadSpec`).
        weights: parameters named `"{index}.weight"` / `"{index}.bias"`.
        features: (batch, in_features) float array.
        outputs: the head's output operations (`HeadSpec.outputs`); none gives the logits.

    Returns:
        (batch, outputs) float32: the logits, or what the output operations make of them.

    Raises:
        ValueError: a layer kind other than "linear" or "relu", or a bad output operation.
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
    x = x.astype(np.float32, copy=False)
    return apply_output_ops(outputs, x) if outputs else x


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
