"""Privacy accounting: ε of DP-FedAvg rounds against Google's dp-accounting, the ledger, the
budget, and the check of what an update claims it applied."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import rdp

from edgefl.core.accounting import (
    RDP_ORDERS,
    NoisedRound,
    PrivacyBudgetSpent,
    PrivacyLedger,
    check_applied_privacy,
    epsilon_spent,
    round_privacy,
)
from edgefl.core.settings import PrivacySettings, RoundSettings
from edgefl.core.validation import UpdateRejected


def rounds(count: int, rate: float, noise: float) -> list[NoisedRound]:
    return [NoisedRound(n, rate, noise) for n in range(1, count + 1)]


# Literal values, computed once with dp-accounting 0.6.0's RdpAccountant over RDP_ORDERS.
LITERAL_CASES = [
    (rounds(1, 1.0, 1.0), 1e-5, 4.752728336819822),
    (rounds(2, 1.0, 1.0), 1e-5, 7.087861628831665),
    (rounds(3, 1.0, 1.0), 1e-5, 9.087861628831664),
    (rounds(3, 0.6, 1.0), 1e-5, 7.187932620336367),
    (rounds(1000, 0.01, 1.1), 1e-5, 1.7252908180449444),
    ([NoisedRound(1, 0.5, 2.0), NoisedRound(2, 0.25, 1.5)], 1e-6, 2.3618643017962935),
]


@pytest.mark.parametrize(("noised", "delta", "expected"), LITERAL_CASES)
def test_epsilon_matches_literal_values_of_the_rdp_accountant(
    noised: list[NoisedRound], delta: float, expected: float
) -> None:
    assert epsilon_spent(noised, delta) == pytest.approx(expected, rel=1e-9)


def test_epsilon_is_the_librarys_poisson_subsampled_gaussian_composed_per_round() -> None:
    accountant = rdp.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(2.0)))
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.5))
    )
    direct = accountant.get_epsilon(1e-6)
    ours = epsilon_spent([NoisedRound(1, 0.5, 2.0), NoisedRound(2, 0.25, 1.5)], 1e-6)
    assert ours == pytest.approx(direct, rel=1e-12)


def test_sampling_lowers_epsilon_and_unsampled_ignores_the_rate() -> None:
    sampled = rounds(3, 0.6, 1.0)
    assert epsilon_spent(sampled, 1e-5) < epsilon_spent(rounds(3, 1.0, 1.0), 1e-5)
    assert epsilon_spent(sampled, 1e-5, sampled=False) == pytest.approx(9.087861628831664)


def test_no_rounds_spend_nothing_and_a_round_without_noise_is_unbounded() -> None:
    assert epsilon_spent([], 1e-5) == 0.0
    assert epsilon_spent([*rounds(2, 1.0, 1.0), NoisedRound(3, 1.0, 0.0)], 1e-5) == math.inf


def test_a_round_is_read_from_what_the_record_keeps() -> None:
    noised = RoundSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.5))
    assert round_privacy(4, 3, 5, noised.to_wire()) == NoisedRound(4, 0.6, 1.5)
    assert round_privacy(4, 3, 0, noised.to_wire()).sampling_rate == 1.0  # online not counted
    plain = RoundSettings().to_wire()
    assert not round_privacy(1, 2, 2, plain).noised


def test_the_ledger_reports_growing_epsilon_and_stops_after_an_unnoised_round() -> None:
    ledger = PrivacyLedger(1e-5)
    first = ledger.add(NoisedRound(1, 1.0, 1.0))
    assert first == {
        "epsilon": pytest.approx(4.752728336819822),
        "epsilon_unsampled": pytest.approx(4.752728336819822),
        "delta": 1e-5,
        "sampling_rate": 1.0,
    }
    second = ledger.add(NoisedRound(2, 0.5, 1.0))
    assert first["epsilon"] < second["epsilon"] < second["epsilon_unsampled"]
    assert second["epsilon_unsampled"] == pytest.approx(7.087861628831665)
    assert ledger.add(NoisedRound(3, 1.0, 0.0)) == {}
    assert ledger.add(NoisedRound(4, 1.0, 1.0)) == {}  # ε is unbounded for the rest of the run


def test_the_budget_refuses_the_round_that_would_exceed_the_target() -> None:
    ledger = PrivacyLedger.from_rounds(
        1e-5, 8.0, [(1, 5, 5, RoundSettings(privacy=PrivacySettings(1.0, 1.0)).to_wire())]
    )
    ledger.check_next(NoisedRound(2, 1.0, 1.0))  # 7.09 <= 8
    ledger.add(NoisedRound(2, 1.0, 1.0))
    with pytest.raises(PrivacyBudgetSpent, match=r"round 3 would bring ε from 7\.088 to 9\.088"):
        ledger.check_next(NoisedRound(3, 1.0, 1.0))
    with pytest.raises(PrivacyBudgetSpent, match="asks for no noise"):
        ledger.check_next(NoisedRound(3, 1.0, 0.0))
    PrivacyLedger(1e-5).check_next(NoisedRound(1, 1.0, 0.0))  # no target: nothing refused


CLAIM_CASES = [
    (1.0, 0.5, None, 0.5, "claims no clip"),
    (1.0, 0.5, 2.0, 0.5, "claims clip 2"),
    (1.0, 0.5, 1.0, 0.25, "noise x0.25; the round asked clip 1, noise x0.5"),
]


@pytest.mark.parametrize(("clip", "noise", "claimed_clip", "claimed_noise", "says"), CLAIM_CASES)
def test_an_update_claiming_less_clip_or_noise_than_asked_is_refused(
    clip: float, noise: float, claimed_clip: float | None, claimed_noise: float, says: str
) -> None:
    with pytest.raises(UpdateRejected) as caught:
        check_applied_privacy(PrivacySettings(clip, noise), claimed_clip, claimed_noise)
    assert caught.value.code == "privacy" and says in caught.value.reason


def test_an_update_applying_at_least_what_was_asked_passes() -> None:
    check_applied_privacy(PrivacySettings(1.0, 0.5), 1.0, 0.5)
    check_applied_privacy(PrivacySettings(1.0, 0.5), 0.5, 2.0)  # a stricter board
    check_applied_privacy(PrivacySettings(), None, 0.0)  # nothing asked
