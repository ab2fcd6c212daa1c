"""Privacy accounting for DP-FedAvg: the (ε, δ) a run's noised rounds have spent, and a budget.

Each board clips its delta to `clip_norm` and adds Gaussian noise of std
`noise_multiplier · clip_norm` itself (`edgefl.core.privacy`). The unit of privacy is a board's
whole data set (user-level DP, McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"). Google's `dp-accounting` RDP accountant composes the rounds:

- `epsilon` is what the released global heads reveal about one board's data, to anyone who does
  not know which boards were selected: every noised round is a Poisson-subsampled Gaussian
  mechanism with sampling rate q = selected / eligible online boards and noise multiplier z.
  Assumptions and limits: the aggregator's selection is a seeded random fraction of the online
  boards, not true Poisson sampling (the amplification it is credited with is the standard
  approximation, as in McMahan et al.); each board's noise is counted alone, although the
  aggregate carries the noise of every board (so the bound is loose, never optimistic); failed
  rounds count too (their updates were sent); the device metrics a round reports (loss,
  accuracy) are not noised and not counted.
- `epsilon_unsampled` is the same without amplification by sampling: the bound for someone who
  sees each board's own noised update and knows it was selected (the aggregator, the broker's
  operator), for a board selected in every noised round.

A round that asks for no noise has no finite ε: after one, no ε is reported for the run.
`dp_accounting` is imported only when a noised round is accounted (the host extra has it; boards
never need it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefl.core.round_state import OpenRound
from edgefl.core.settings import PrivacySettings, RoundPolicy, RoundSettings
from edgefl.core.validation import UpdateRejected
from edgefl.errors import FederationError

# Integer RDP orders: the accountant's fractional default orders fail to converge (and log it)
# at the large sampling rates small fleets have; integers cover the same range of ε.
RDP_ORDERS: tuple[float, ...] = (*range(2, 65), 128, 256, 512)


class PrivacyBudgetSpent(FederationError):
    """The next round would spend more ε than the run's target allows."""


@dataclass(frozen=True)
class NoisedRound:
    """One round as the accountant sees it.

    Attributes:
        round: the round number.
        sampling_rate: q, selected / eligible online boards (1.0 when none were counted).
        noise_multiplier: z, the noise std in units of the clip norm (0: no noise).
    """

    round: int
    sampling_rate: float
    noise_multiplier: float

    @property
    def noised(self) -> bool:
        """Whether the round's updates carry noise, so that it has a finite ε."""
        return self.noise_multiplier > 0


def round_privacy(
    number: int, selected: int, online: int, config: Mapping[str, Any]
) -> NoisedRound:
    """Return the accountant's view of a round from what a record keeps of it.

    Args:
        number: the round number.
        selected: how many boards were selected.
        online: how many eligible boards were online when it selected (0: not counted).
        config: the task's settings as sent (`RoundSettings.to_wire()`).

    Returns:
        The round; noise_multiplier 0 when the round asked for no clip norm or no noise.
    """
    privacy = RoundSettings.from_wire(config).privacy
    noise = privacy.noise_multiplier if privacy.clip_norm is not None else 0.0
    rate = min(1.0, selected / online) if online > 0 else 1.0
    return NoisedRound(number, rate, noise)


def open_round_privacy(round_: OpenRound) -> NoisedRound:
    """Return the accountant's view of a round the engine opened (see `round_privacy`)."""
    return round_privacy(round_.number, len(round_.selected), round_.online, round_.config)


def epsilon_spent(rounds: Sequence[NoisedRound], delta: float, *, sampled: bool = True) -> float:
    """Return the ε after `rounds` at `delta`, by dp-accounting's RDP accountant.

    Args:
        rounds: the noised rounds, in any order (composition is commutative).
        delta: the δ of the (ε, δ) guarantee, in (0, 1).
        sampled: credit each round's amplification by sampling (q); False treats every round as
            a plain Gaussian mechanism (q = 1).

    Returns:
        ε (0.0 for no rounds; inf when a round has no noise).

    Raises:
        FederationError: dp-accounting is not installed.
    """
    if any(not r.noised for r in rounds):
        return math.inf
    if not rounds:
        return 0.0
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise FederationError(
            "privacy accounting needs dp-accounting: pip install 'edgefl[host]'"
        ) from None
    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    # Rounds alike are composed at once: a long run has a handful of distinct (q, z) pairs, and
    # the ledger recomputes ε from every round after each one.
    alike = Counter((r.sampling_rate if sampled else 1.0, r.noise_multiplier) for r in rounds)
    for (rate, noise), count in sorted(alike.items()):
        event = dp_accounting.GaussianDpEvent(noise)
        if rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(rate, event)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """The rounds a federation has run and the privacy they spent; the budget for the next one.

    Attributes:
        delta: the δ every ε is stated for.
        target_epsilon: refuse a round whose ε after it would exceed this (None: no target).
        rounds: every round so far (noised or not), oldest first.
    """

    delta: float
    target_epsilon: float | None = None
    rounds: list[NoisedRound] = field(default_factory=list)

    @classmethod
    def from_rounds(
        cls,
        delta: float,
        target_epsilon: float | None,
        records: Iterable[tuple[int, int, int, Mapping[str, Any]]],
    ) -> PrivacyLedger:
        """Rebuild a ledger from stored rounds: (number, selected, online, config) each."""
        return cls(delta, target_epsilon, [round_privacy(*r) for r in records])

    @property
    def accounted(self) -> bool:
        """Whether the run has a finite ε: at least one round, and every round noised."""
        return bool(self.rounds) and all(r.noised for r in self.rounds)

    def add(self, round_: NoisedRound) -> dict[str, float]:
        """Count a finished round; return its privacy metrics (empty when ε is not finite).

        The metrics are "epsilon", "epsilon_unsampled", "delta" and "sampling_rate" (see the
        module docstring).
        """
        self.rounds.append(round_)
        if not self.accounted:
            return {}
        return {
            "epsilon": epsilon_spent(self.rounds, self.delta),
            "epsilon_unsampled": epsilon_spent(self.rounds, self.delta, sampled=False),
            "delta": self.delta,
            "sampling_rate": round_.sampling_rate,
        }

    def check_next(self, round_: NoisedRound) -> None:
        """Refuse `round_` if the ε after it would exceed the target.

        Raises:
            PrivacyBudgetSpent: saying the ε spent, the ε after the round and the target.
        """
        if self.target_epsilon is None:
            return
        if not round_.noised:
            raise PrivacyBudgetSpent(
                f"round {round_.round} asks for no noise, so its ε is unbounded; the target is "
                f"ε={self.target_epsilon:g}"
            )
        spent = epsilon_spent(self.rounds, self.delta)
        after = epsilon_spent([*self.rounds, round_], self.delta)
        if after > self.target_epsilon:
            raise PrivacyBudgetSpent(
                f"privacy budget: round {round_.round} would bring ε from {spent:.3f} to "
                f"{after:.3f} (δ={self.delta:g}, q={round_.sampling_rate:.3g}, "
                f"z={round_.noise_multiplier:g}), beyond the target ε={self.target_epsilon:g}; "
                f"the run stops before it"
            )


def check_budget_settings(policy: RoundPolicy, privacy: PrivacySettings) -> None:
    """Refuse a privacy target for rounds that add no noise (their ε is unbounded).

    Raises:
        ValueError: `policy.target_epsilon` is set without a clip norm and noise multiplier.
    """
    if policy.target_epsilon is not None and not (
        privacy.clip_norm is not None and privacy.noise_multiplier > 0
    ):
        raise ValueError(
            "target_epsilon needs clip_norm and noise_multiplier: without noise a round's "
            "epsilon is unbounded"
        )


def check_applied_privacy(
    asked: PrivacySettings, clip_norm: float | None, noise_multiplier: float
) -> None:
    """Refuse an update whose claimed clip and noise are less than its round asked.

    Every ε above assumes each counted update was clipped to at most the round's clip norm and
    noised with at least its noise multiplier; an update claiming less (or nothing: an older
    board) is rejected with code "privacy".

    Args:
        asked: the round's privacy settings, as its task sent them.
        clip_norm: the clip norm the update's header says the board applied (None: none).
        noise_multiplier: the noise multiplier it says the board applied.

    Raises:
        UpdateRejected: code "privacy", saying what was asked and what was claimed.
    """
    if asked.clip_norm is None:
        return  # no clip asked, so no noise either (PrivacySettings.check)
    if (
        clip_norm is None
        or clip_norm > asked.clip_norm
        or noise_multiplier < (asked.noise_multiplier)
    ):
        claimed = "no clip" if clip_norm is None else f"clip {clip_norm:g}"
        raise UpdateRejected(
            "privacy",
            f"update claims {claimed}, noise x{noise_multiplier:g}; the round asked clip "
            f"{asked.clip_norm:g}, noise x{asked.noise_multiplier:g}",
        )
