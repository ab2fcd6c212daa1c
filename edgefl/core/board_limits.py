"""What a board lets a round ask of it: bounds on epochs, batch size, learning rate and time.

A task comes from the network; a board must not let it run for hours, take all its memory or
diverge. `BoardLimits` come from the board profile's `[limits]` table (`edgefl.profiles`), or
from `AgentConfig.limits`. A task beyond them is **clamped, not refused**: the board still
answers the round (with fewer epochs, a smaller batch or step), and says so in the update's
metrics (`limited` = 1, `epochs_run`) and in its log. Training also stops when the round's time
budget is spent; the update then holds what was trained so far.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgefl.core.settings import TrainConfig, setting


@dataclass(frozen=True)
class BoardLimits:
    """The most a round may ask of this board; larger values are clamped to these."""

    max_epochs: int = setting(50, "Most local epochs a round may ask of this board.")
    max_batch_size: int = setting(1024, "Largest minibatch a round may ask of this board.")
    max_lr: float = setting(1.0, "Largest learning rate a round may ask of this board.")
    round_budget_s: float = setting(
        120.0, "Training stops after this many seconds of a round; the update holds what ran."
    )

    def check(self) -> None:
        """Raise ValueError naming the first limit out of range."""
        if self.max_epochs < 0:
            raise ValueError(f"max_epochs must be >= 0, got {self.max_epochs}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.max_lr > 0:
            raise ValueError(f"max_lr must be > 0, got {self.max_lr}")
        if not self.round_budget_s > 0:
            raise ValueError(f"round_budget_s must be > 0, got {self.round_budget_s}")


def bound_training(train: TrainConfig, limits: BoardLimits) -> tuple[TrainConfig, list[str]]:
    """Clamp a round's training settings to the board's limits.

    Args:
        train: what the round asks.
        limits: what the board allows.

    Returns:
        The settings the board trains with, and one line per clamped setting
        (e.g. "epochs 30000 -> 50"); an empty list when the round asked nothing beyond them.
    """
    bounded = dataclasses.replace(
        train,
        epochs=min(train.epochs, limits.max_epochs),
        batch_size=min(train.batch_size, limits.max_batch_size),
        lr=min(train.lr, limits.max_lr),
    )
    notes = [
        f"{name} {getattr(train, name)} -> {getattr(bounded, name)}"
        for name in ("epochs", "batch_size", "lr")
        if getattr(bounded, name) != getattr(train, name)
    ]
    return bounded, notes
