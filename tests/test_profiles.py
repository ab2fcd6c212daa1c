"""Board profiles: the `[limits]` table, its defaults and its strict parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefl.core.board_limits import BoardLimits
from edgefl.errors import ProfileError
from edgefl.profiles import load_profile, parse_profile


def test_the_shipped_profiles_bound_what_a_round_may_ask() -> None:
    pi, jetson = load_profile("raspberry-pi"), load_profile("jetson")
    assert pi.limits == BoardLimits(
        max_epochs=20, max_batch_size=256, max_lr=1.0, round_budget_s=60.0
    )
    assert jetson.limits.max_epochs == 50 and jetson.limits.round_budget_s == 120.0


def test_a_profile_without_limits_takes_the_defaults_and_a_partial_table_fills_in() -> None:
    assert parse_profile({"name": "x"}, Path("x")).limits == BoardLimits()
    partial = parse_profile({"name": "x", "limits": {"max_epochs": 3}}, Path("x")).limits
    assert partial == BoardLimits(max_epochs=3)


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ({"max_epoch": 3}, "unknown key 'limits.max_epoch'"),
        ({"max_lr": "fast"}, "max_lr must be a number"),
        ({"max_epochs": 2.5}, "max_epochs must be an integer"),
        ({"round_budget_s": 0}, "round_budget_s must be > 0"),
    ],
)
def test_a_wrong_limit_is_an_error_naming_it(limits: dict[str, Any], says: str) -> None:
    with pytest.raises(ProfileError, match=says):
        parse_profile({"name": "x", "limits": limits}, Path("x"))
