"""Checks an aggregator runs on every incoming delta before it may count toward a round."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

REJECTION_CODES: tuple[str, ...] = (
    "missing-key",
    "extra-key",
    "dtype",
    "shape",
    "non-finite",
    "norm",
)

# Refusals that are no device's answer: a second copy, or a message the device may never have
# sent (a forgery in its name must not use up its answer to the round).
NOT_AN_ANSWER: tuple[str, ...] = ("duplicate", "bad-signature", "unknown-device")


class UpdateRejected(Exception):
    """An update that must not be aggregated, with a machine-readable code and a one-line reason.

    Codes are the ones in `REJECTION_CODES`; the aggregator logs the reason and counts the code.
    Other parts (round, device, duplicate checks) may raise it with their own short codes.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def validate_delta(
    delta: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    max_norm: float | None = None,
) -> None:
    """Check a delta against the global weights it claims to update.

    Checks, in order: same keys as `reference`, float dtype, same shapes, finite values, and
    global L2 norm at most `max_norm` when given.

    Args:
        delta: the decoded delta.
        reference: the current global weights (only keys and shapes are used).
        max_norm: the norm bound; None skips the check.

    Raises:
        UpdateRejected: the first check that fails, with its code and reason.
    """
    missing = sorted(set(reference) - set(delta))
    if missing:
        raise UpdateRejected("missing-key", f"update lacks {', '.join(missing)}")
    extra = sorted(set(delta) - set(reference))
    if extra:
        raise UpdateRejected("extra-key", f"update has unknown {', '.join(extra)}")
    for key in reference:
        value = delta[key]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise UpdateRejected("dtype", f"{key} is {kind}, expected a float array")
        expected = np.shape(reference[key])
        if value.shape != expected:
            raise UpdateRejected(
                "shape", f"{key} has shape {list(value.shape)}, expected {list(expected)}"
            )
    validate_values(delta, max_norm)


def validate_values(delta: Mapping[str, np.ndarray], max_norm: float | None = None) -> None:
    """The checks of `validate_delta` on the values alone: finite, and the norm bound.

    For a delta whose keys, dtype and shapes are right by construction (a compact update is
    decoded into the head's own shapes, as float32).

    Raises:
        UpdateRejected: "non-finite" or "norm".
    """
    # One dot product per tensor says both: it is finite only when every value is, and it is
    # the squared norm. Cheaper than isfinite().all() plus a pass for the norm, on every update
    # the aggregator reads. (A float32 sum of squares can overflow where the values are finite:
    # then it is redone in float64.)
    total = 0.0
    for key, value in delta.items():
        flat = value.ravel()
        squares = float(np.vdot(flat, flat))
        if not math.isfinite(squares):
            bad = int((~np.isfinite(value)).sum())
            if bad:
                raise UpdateRejected("non-finite", f"{key} holds {bad} NaN or Inf values")
            squares = float(np.square(value, dtype=np.float64).sum())
        total += squares
    if max_norm is not None:
        norm = math.sqrt(total)
        if norm > max_norm:
            raise UpdateRejected("norm", f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
