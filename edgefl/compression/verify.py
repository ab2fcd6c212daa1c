"""Check an exported artifact in its real runtime against the PyTorch backbone's features.

Tolerance is relative to the feature scale: the max absolute error divided by the reference's
max absolute value. int8 features land a few percent off whatever their magnitude, so one
tolerance (say 0.1) serves backbones whose features are 0.01 or 100 in size; fp32 artifacts
agree to about 1e-6 on that scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.compression.metric import Metric
from edgefl.errors import VerificationError
from edgefl.head import head_forward
from edgefl.runtime import load_backbone

# Below this, a reference is all zeros and errors are judged in absolute terms.
_TINY = 1e-12


@dataclass
class Agreement:
    """How closely an artifact's outputs match the reference.

    `max_abs_error` and `mean_abs_error` are absolute; `relative_max_error` is the max abs error
    over the reference's max abs value (what tolerances compare against). `top1_agreement` is the
    share of samples whose argmax matches (classifier logits only, else None).
    """

    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None
    samples: int
    relative_max_error: float = 0.0


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, logits: bool) -> Agreement:
    """Compare two output batches row by row.

    Args:
        reference: (n, ...) outputs of the reference model.
        candidate: (n, ...) outputs of the artifact, same number of values per sample.
        logits: the outputs are class logits, so top-1 agreement is computed.

    Returns:
        The agreement (errors 0.0 and top-1 1.0 for an empty batch).

    Raises:
        VerificationError: the two batches differ in sample count or per-sample size.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if len(ref) != len(cand) or ref.size != cand.size:
        raise VerificationError(
            f"outputs do not match in shape: reference {ref.shape}, artifact {cand.shape}"
        )
    samples = len(ref)
    if samples == 0:
        return Agreement(0.0, 0.0, 1.0 if logits else None, 0, 0.0)
    ref = ref.reshape(samples, -1)
    cand = cand.reshape(samples, -1)
    diff = np.abs(ref - cand)
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    relative = max_abs / scale if scale > _TINY else max_abs
    top1 = None
    if logits:
        top1 = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())
    return Agreement(max_abs, mean_abs, top1, samples, relative)


def verify_artifact(
    path: Path,
    reference: np.ndarray,
    inputs: np.ndarray,
    tolerance: float,
    head: tuple[Sequence[Mapping[str, Any]], Mapping[str, np.ndarray]] | None = None,
    min_top1: float = 0.0,
    threads: int = 1,
    metric: Metric | None = None,
) -> Agreement:
    """Run an artifact in its real runtime and check it against the reference features.

    Args:
        path: a `.onnx` or `.tflite` backbone.
        reference: (n, features) the PyTorch backbone's features on `inputs`.
        inputs: (n, *input_shape) held-out samples, preprocessed.
        tolerance: the largest allowed relative max error (see the module docstring).
        head: (layers, weights) of the head; when given, both feature sets go through it and
            top-1 agreement is checked against `min_top1`.
        min_top1: the smallest allowed top-1 agreement (only with `head`).
        threads: runtime threads.
        metric: how predictions agree (top-1 when None): with "top-K" PyTorch's prediction must
            be among the artifact's K best, with "within-N" at most N classes away.

    Returns:
        The agreement of the features, with top-1 agreement of the head's predictions when a
        head is given.

    Raises:
        VerificationError: the artifact disagrees beyond tolerance, or shapes do not match.
        RuntimeLoadError: the artifact cannot be loaded.
        DataError: `inputs` do not fit the artifact.
    """
    path = Path(path)
    reference = np.asarray(reference, dtype=np.float32)
    if len(reference) != len(inputs):
        raise VerificationError(
            f"cannot verify {path.name}: {len(inputs)} inputs but {len(reference)} reference rows"
        )
    runner = load_backbone(path, threads=threads)
    features = runner.run(np.asarray(inputs, dtype=np.float32))
    reference = reference.reshape(len(reference), -1)
    agreement = compare_outputs(reference, features, logits=False)
    if head is not None:
        layers, weights = head
        agreement.top1_agreement = (metric or Metric()).agreement(
            head_forward(layers, weights, reference), head_forward(layers, weights, features)
        )
    problems = _non_finite(reference, "PyTorch's features") + _non_finite(features, "its features")
    # Written as `not <=` so that a NaN error, which compares False to everything, fails too.
    if not agreement.relative_max_error <= tolerance:
        problems.append(
            f"relative max error {agreement.relative_max_error:.3g} > tolerance {tolerance:g}"
        )
    if agreement.top1_agreement is not None and not agreement.top1_agreement >= min_top1:
        problems.append(f"top-1 agreement {agreement.top1_agreement:.3f} < {min_top1:g}")
    if problems:
        raise VerificationError(
            f"{path.name} disagrees with PyTorch on {agreement.samples} samples: "
            + ", ".join(problems)
        )
    return agreement


def _non_finite(values: np.ndarray, what: str) -> list[str]:
    """Name the rows of `values` holding NaN or Inf (an empty list when there are none)."""
    rows = ~np.isfinite(np.asarray(values, dtype=np.float64).reshape(len(values), -1)).all(axis=1)
    if not rows.any():
        return []
    first = int(np.flatnonzero(rows)[0])
    return [f"{what} hold NaN or Inf on {int(rows.sum())} samples (first: sample {first})"]
