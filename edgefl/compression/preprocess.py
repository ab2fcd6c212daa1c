"""Preprocessing overrides for `edgefl compress`: `--resize`, `--mean`, `--std`, `--grayscale`.

A built-in model brings its standard preprocessing and a user model the default image scaling
(`edgefl.data.DEFAULT_IMAGE_PREPROCESS`); these flags change it for any model. The result is what
the pipeline applies to the data and records in the manifest, so boards apply the same.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgefl.bundle import Preprocess
from edgefl.errors import DataError

_RESIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class PreprocessOverrides:
    """What the user asked to change; None (or False) keeps the model's own setting.

    Attributes:
        resize: (height, width) every image is resized to.
        mean: per-channel mean subtracted after scaling (one value, or one per channel).
        std: per-channel standard deviation divided by (one value, or one per channel).
        grayscale: decode images as one gray channel instead of RGB.
    """

    resize: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    grayscale: bool = False

    def __bool__(self) -> bool:
        return any((self.resize, self.mean, self.std, self.grayscale))


def parse_resize(text: str) -> list[int]:
    """Parse `--resize`: "HxW" or a single "N" (N x N), both positive.

    Returns:
        [height, width].

    Raises:
        DataError: anything else.
    """
    match = _RESIZE.match(text)
    sizes = [int(g) for g in match.groups() if g is not None] if match else []
    if not sizes or min(sizes) < 1:
        raise DataError(f"`resize` takes HxW or N with positive sizes (e.g. 224x224), not {text!r}")
    return [sizes[0], sizes[-1]]


def parse_channels(text: str, flag: str) -> list[float]:
    """Parse `--mean`/`--std`: comma-separated finite numbers, one or three of them.

    Args:
        text: the flag's value, e.g. "0.485,0.456,0.406".
        flag: the flag's name for the error message, e.g. "--mean".

    Raises:
        DataError: not numbers, not finite, or a count other than 1 or 3.
    """
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise DataError(
            f"{flag} takes 1 or 3 comma-separated numbers (e.g. 0.485,0.456,0.406), not {text!r}"
        )
    return values


def apply_overrides(base: Preprocess, overrides: PreprocessOverrides) -> Preprocess:
    """Return `base` with the user's overrides applied (a new object; `base` is unchanged).

    Raises:
        DataError: a standard deviation is not positive, or mean/std do not have one value per
            channel (one for grayscale, one or three for RGB).
    """
    result = dataclasses.replace(
        base,
        resize=list(overrides.resize) if overrides.resize is not None else base.resize,
        mean=list(overrides.mean) if overrides.mean is not None else base.mean,
        std=list(overrides.std) if overrides.std is not None else base.std,
        grayscale=overrides.grayscale or base.grayscale,
    )
    if result.std is not None and min(result.std) <= 0:
        raise DataError(f"`std` values must be positive, not {result.std}")
    channels = 1 if result.grayscale else 3
    for flag, values in (("`mean`", result.mean), ("`std`", result.std)):
        if values is not None and len(values) not in (1, channels):
            raise DataError(
                f"{flag} has {len(values)} values but grayscale images have 1 channel; "
                f"pass {flag} with one value"
            )
    return result


def input_shape(
    shape: Sequence[int] | None, overrides: PreprocessOverrides, layout: str = "NCHW"
) -> list[int] | None:
    """Return a model's image input shape (C, H, W, or H, W, C for "NHWC") after the overrides.

    A built-in's shape says 224x224 RGB; after `--resize` or `--grayscale` the model gets other
    inputs, and the shape the data is checked against follows them. Shapes that are not images
    (3-D) are returned as they are.
    """
    if shape is None or len(shape) != 3:
        return None if shape is None else list(shape)
    nchw = layout == "NCHW"
    channels, height, width = shape if nchw else (shape[2], shape[0], shape[1])
    if overrides.resize is not None:
        height, width = overrides.resize
    if overrides.grayscale:
        channels = 1
    return [channels, height, width] if nchw else [height, width, channels]


def describe(preprocess: Preprocess, shape: Sequence[int]) -> str:
    """Return one line saying what a board does to a raw sample, e.g. for `--dry-run`."""
    steps = ["gray" if preprocess.grayscale else "RGB"]
    if preprocess.resize is not None:
        steps.append("resize {}x{}".format(*preprocess.resize))
    steps.append(f"x{preprocess.scale:.6g}")
    if preprocess.mean is not None:
        steps.append(f"- mean {preprocess.mean}")
    if preprocess.std is not None:
        steps.append(f"/ std {preprocess.std}")
    return f"inputs {list(shape)} {preprocess.layout}: " + ", ".join(steps)
