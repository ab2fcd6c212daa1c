"""Knowledge distillation from the unpruned teacher into the pruned student, and scoring.

loss = alpha * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)
(Hinton et al. 2015); T² keeps the soft-target gradients on the scale of the hard-label ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgefl.compression.recipe import DistillStep
from edgefl.data import Dataset

Progress = Callable[[int, int], None]


def predict(model: nn.Module, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Return the model's outputs on `X` as float32 numpy, in eval mode without gradients."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(X[start : start + batch_size]))
            outputs.append(model(batch).numpy())
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """Return top-1 accuracy of a classifier on labelled samples (0.0 for an empty set)."""
    if len(y) == 0:
        return 0.0
    return float((predict(model, X).argmax(axis=1) == y).mean())


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Return alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)."""
    soft = nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / temperature, dim=1),
        nn.functional.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = nn.functional.cross_entropy(student_logits, targets)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: Dataset,
    step: DistillStep,
    epochs: int | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> list[float]:
    """Train `student` to match `teacher` on `train`; the student is left in eval mode.

    Args:
        student: the model to train (the pruned one), changed in place.
        teacher: the reference (the unpruned one); not changed.
        train: labelled training samples.
        step: temperature, alpha, epochs, learning rate (Adam), batch size.
        epochs: overrides `step.epochs` (the accuracy back-off distills longer).
        progress: called with (epoch done, epochs) after every epoch.
        seed: shuffling seed, so a run is reproducible.

    Returns:
        The mean loss of every epoch.
    """
    n_epochs = step.epochs if epochs is None else epochs
    # The teacher sees no augmentation, so its logits are computed once, not every epoch.
    teacher_logits = torch.from_numpy(predict(teacher, train.X))
    X, y = torch.from_numpy(train.X), torch.from_numpy(train.y)
    optimizer = torch.optim.Adam(student.parameters(), lr=step.lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for epoch in range(n_epochs):
        student.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(y), generator=generator).split(step.batch_size):
            optimizer.zero_grad()
            loss = distillation_loss(
                student(X[batch]), teacher_logits[batch], y[batch], step.temperature, step.alpha
            )
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        losses.append(total / max(count, 1))
        if progress is not None:
            progress(epoch + 1, n_epochs)
    student.eval()
    return losses
