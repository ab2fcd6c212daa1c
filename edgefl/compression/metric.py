"""The accuracy metric a recipe names: top-1, top-k, or within N classes of the label.

`within-N` is for ordinal labels, whose class indices are ordered (pitch bins, ages, grades): a
prediction N classes or fewer from the label counts as right. The metric scores every stage, the
drop against the original model, the chance level, and the agreement an artifact must keep with
PyTorch (`verify.min_top1_agreement`, where PyTorch's prediction plays the label).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_PATTERN = re.compile(r"^(top|within)-(\d+)$")
METRIC_FORMS = "top-1, top-K (K >= 1) or within-N (N >= 0)"


@dataclass(frozen=True)
class Metric:
    """A metric: `kind` "top" (the label among the K largest logits, K = `n`) or "within"
    (the argmax at most `n` classes from the label)."""

    kind: str = "top"
    n: int = 1

    @classmethod
    def parse(cls, text: str) -> Metric:
        """Parse "top-1", "top-5" or "within-2".

        Raises:
            ValueError: another form, or top-0.
        """
        match = _PATTERN.match(str(text).strip()) if isinstance(text, str) else None
        if match is None or (match.group(1) == "top" and int(match.group(2)) < 1):
            raise ValueError(f"metric must be {METRIC_FORMS}, got {text!r}")
        return cls(match.group(1), int(match.group(2)))

    @property
    def name(self) -> str:
        """The metric as a recipe writes it: "top-1", "within-2"."""
        return f"{self.kind}-{self.n}"

    @property
    def label(self) -> str:
        """The metric in words, for tables and messages."""
        if self.kind == "top":
            return "top-1 accuracy" if self.n == 1 else f"top-{self.n} accuracy"
        return f"accuracy within {self.n} classes"

    def hits(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Return, per sample, whether the logits count as right for the label."""
        scores = np.asarray(logits)
        y = np.asarray(labels, dtype=np.int64)
        if self.kind == "within":
            return np.asarray(np.abs(scores.argmax(axis=1) - y) <= self.n)
        if self.n == 1:
            return np.asarray(scores.argmax(axis=1) == y)
        k = min(self.n, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return np.asarray((top == y[:, None]).any(axis=1))

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """Return the share of samples the logits get right (0.0 for no samples)."""
        return float(self.hits(logits, labels).mean()) if len(labels) else 0.0

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> float:
        """Return how often `candidate` logits are right for `reference`'s prediction."""
        return self.score(candidate, np.asarray(reference).argmax(axis=1))

    def chance(self, labels: np.ndarray, num_classes: int) -> float:
        """Return the score of guessing: the larger of a uniform guess and the best constant
        prediction on `labels` (always the most common class, or classes)."""
        classes = max(num_classes, 1)
        y = np.asarray(labels, dtype=np.int64)
        if self.kind == "top":
            uniform = min(self.n, classes) / classes
            counts = np.sort(np.bincount(y, minlength=classes))[::-1] if len(y) else np.zeros(1)
            constant = float(counts[: self.n].sum()) / max(len(y), 1)
        else:
            near = np.abs(np.arange(classes)[:, None] - np.arange(classes)[None, :]) <= self.n
            uniform = float(near.sum(axis=1).mean()) / classes
            constant = float(near[:, y].sum(axis=1).max()) / len(y) if len(y) else 0.0
        return max(uniform, constant)
