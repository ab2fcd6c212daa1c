"""Distillation: the loss is KD·T² mixed with CE, and it recovers a pruned student."""

from __future__ import annotations

import copy

import pytest
import torch

from edgefl.compression.distill import accuracy, distill, distillation_loss
from edgefl.compression.prune import apply_pruning
from edgefl.compression.recipe import DistillStep, PruneStep
from edgefl.data import holdout_split, load_digits
from edgefl.models import load_model, split_model

torch.set_num_threads(1)


def test_loss_is_zero_kd_for_equal_logits_and_ce_at_alpha_zero() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 2])
    assert float(distillation_loss(logits, logits, targets, 4.0, 1.0)) == pytest.approx(
        0.0, abs=1e-6
    )
    ce = float(torch.nn.functional.cross_entropy(logits, targets))
    assert float(distillation_loss(logits, logits * 0, targets, 4.0, 0.0)) == pytest.approx(ce)
    # T² scaling: at alpha 1 the loss is T² times the KL of the softened distributions.
    teacher = torch.tensor([[1.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.softmax(teacher / 2, 1)
    kl = float((p * (p.log() - torch.log_softmax(student / 2, 1))).sum())
    assert float(distillation_loss(student, teacher, torch.tensor([0]), 2.0, 1.0)) == pytest.approx(
        4 * kl
    )


@pytest.mark.slow
def test_distillation_recovers_a_pruned_student() -> None:
    train, test = holdout_split(load_digits())
    teacher = split_model(load_model("digits-cnn"), None, torch.from_numpy(train.X[:2]))
    student = copy.deepcopy(teacher)
    apply_pruning(student, torch.from_numpy(train.X[:2]), PruneStep(ratio=0.5))
    pruned = accuracy(student, test.X, test.y)
    losses = distill(student, teacher, train, DistillStep(epochs=6, lr=0.002))
    distilled = accuracy(student, test.X, test.y)
    assert losses[-1] < losses[0]
    assert distilled > pruned and distilled >= accuracy(teacher, test.X, test.y) - 0.01
