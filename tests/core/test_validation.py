"""Update validation: each bad delta is rejected with its code and a one-line reason."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.validation import UpdateRejected, validate_delta

REFERENCE = {"0.weight": np.zeros((10, 4), np.float32), "0.bias": np.zeros(10, np.float32)}


def good() -> dict[str, np.ndarray]:
    return {"0.weight": np.full((10, 4), 0.1, np.float32), "0.bias": np.zeros(10, np.float32)}


def test_a_good_delta_passes() -> None:
    validate_delta(good(), REFERENCE, max_norm=1.0)
    validate_delta(good(), REFERENCE)


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (lambda d: d.pop("0.bias"), "missing-key", "0.bias"),
        (lambda d: d.update(extra=np.zeros(1, np.float32)), "extra-key", "extra"),
        (lambda d: d.update({"0.bias": np.zeros(10, np.int32)}), "dtype", "int32"),
        (lambda d: d.update({"0.bias": [0.0] * 10}), "dtype", "list"),
        (lambda d: d.update({"0.weight": np.zeros((4, 10), np.float32)}), "shape", "[4, 10]"),
        (lambda d: d["0.weight"].__setitem__((0, 0), np.nan), "non-finite", "1 NaN"),
        (lambda d: d["0.bias"].__setitem__(3, np.inf), "non-finite", "0.bias"),
        (lambda d: d["0.bias"].__setitem__(0, 5.0), "norm", "exceeds the bound 1"),
    ],
)
def test_bad_deltas_are_rejected_with_a_code(change, code: str, words: str) -> None:  # type: ignore[no-untyped-def]
    delta = good()
    change(delta)
    with pytest.raises(UpdateRejected) as caught:
        validate_delta(delta, REFERENCE, max_norm=1.0)
    assert caught.value.code == code
    assert words in caught.value.reason
    assert "\n" not in caught.value.reason
    assert str(caught.value).startswith(f"{code}: ")
