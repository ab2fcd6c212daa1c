"""Strategies on literal arrays: round plans, new global weights, resumable optimizer state."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.bundle import decode_head, encode_head
from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.core.strategies import (
    STRATEGY_NAMES,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    RoundPlan,
    build_strategies,
    make_strategy,
    select_fraction,
)
from edgefl.transport.messages import DeviceStatus

GLOBAL = {"0.weight": np.array([[1.0, -1.0]], np.float32), "0.bias": np.array([0.5], np.float32)}


def delta(a: float, b: float, c: float) -> dict[str, np.ndarray]:
    return {"0.weight": np.array([[a, b]], np.float32), "0.bias": np.array([c], np.float32)}


DELTAS = [(delta(0.1, 0.2, -0.1), 1), (delta(0.3, -0.2, 0.1), 3)]


def test_fedavg_adds_the_weighted_mean_delta() -> None:
    new = make_strategy("fedavg").aggregate(GLOBAL, DELTAS)
    np.testing.assert_allclose(new["0.weight"], [[1.25, -1.1]], rtol=1e-6)
    np.testing.assert_allclose(new["0.bias"], [0.55], rtol=1e-6)
    np.testing.assert_array_equal(GLOBAL["0.bias"], [0.5])  # the input is not modified


def _online(*ids: str) -> dict[str, DeviceStatus]:
    return {d: DeviceStatus(d, "online", samples=10) for d in ids}


def test_fedprox_asks_devices_for_its_mu_and_averages_like_fedavg() -> None:
    strategy = make_strategy("fedprox", mu=0.05)
    base = RoundSettings(train=TrainConfig(lr=0.3))
    plan = strategy.configure_round(1, _online("a", "b"), base, RoundPolicy(), seed=0)
    assert plan.selected == ("a", "b")
    assert (plan.settings.train.proximal_mu, plan.settings.train.lr) == (0.05, 0.3)
    assert base.train.proximal_mu == 0.0  # the configured settings are not modified
    fedavg = make_strategy("fedavg").aggregate(GLOBAL, DELTAS)
    np.testing.assert_array_equal(
        strategy.aggregate(GLOBAL, DELTAS)["0.weight"], fedavg["0.weight"]
    )


def test_fedadam_first_step_matches_the_paper_by_hand() -> None:
    # m = 0.1Δ, v = 0.99τ² + 0.01Δ², step = η m / (√v + τ) with Δ = weighted mean delta.
    eta, tau = 0.1, 1e-3
    new = FedAdam(eta=eta, tau=tau).aggregate(GLOBAL, DELTAS)
    mean = np.array([0.25, -0.1, 0.05])
    m, v = 0.1 * mean, 0.99 * tau**2 + 0.01 * mean**2
    expected = np.array([1.0, -1.0, 0.5]) + eta * m / (np.sqrt(v) + tau)
    got = np.concatenate([new["0.weight"].ravel(), new["0.bias"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_fedyogi_second_moment_differs_from_adam_after_two_rounds() -> None:
    adam, yogi = FedAdam(eta=0.1), FedYogi(eta=0.1)
    a = y = GLOBAL
    for _ in range(2):
        a, y = adam.aggregate(a, DELTAS), yogi.aggregate(y, DELTAS)
    mean = 0.25
    v_adam = 0.99 * (0.99 * 1e-6 + 0.01 * mean**2) + 0.01 * mean**2
    v1 = 1e-6 - 0.01 * mean**2 * np.sign(1e-6 - mean**2)
    v_yogi = v1 - 0.01 * mean**2 * np.sign(v1 - mean**2)
    assert adam.v["0.weight"][0, 0] == pytest.approx(v_adam)
    assert yogi.v["0.weight"][0, 0] == pytest.approx(v_yogi)
    assert not np.allclose(a["0.weight"], y["0.weight"])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_a_restarted_server_optimizer_resumes_exactly(name: str) -> None:
    steady = make_strategy(name, eta=0.05)
    weights = GLOBAL
    for _ in range(3):
        weights = steady.aggregate(weights, DELTAS)
    # Stored the way the aggregator stores it: float32 safetensors, like a head.
    saved = decode_head(encode_head(steady.state_dict()))
    expected = steady.aggregate(weights, DELTAS)

    restarted = make_strategy(name, eta=0.05)
    restarted.load_state_dict(saved)
    resumed = restarted.aggregate(weights, DELTAS)
    for key in GLOBAL:
        np.testing.assert_array_equal(resumed[key], expected[key])
    assert int(restarted.state_dict()["rounds"]) == 4


def test_robust_strategies_resist_a_poisoned_delta() -> None:
    poisoned = [*DELTAS, (delta(0.2, 0.0, 0.0), 2), (delta(1e4, -1e4, 1e4), 50)]
    robust: list[tuple[str, dict[str, float]]] = [
        ("fedmedian", {}),
        ("trimmed-mean", {"trim_fraction": 0.25}),
        ("krum", {"num_byzantine": 1}),
    ]
    for name, params in robust:
        new = make_strategy(name, **params).aggregate(GLOBAL, poisoned)
        assert np.abs(new["0.weight"] - GLOBAL["0.weight"]).max() < 0.5, name
    fedavg = make_strategy("fedavg").aggregate(GLOBAL, poisoned)
    assert np.abs(fedavg["0.weight"]).max() > 1000


def test_every_listed_name_builds_and_aggregates() -> None:
    for name in STRATEGY_NAMES:
        strategy = make_strategy(name)
        assert strategy.name == name
        new = strategy.aggregate(GLOBAL, DELTAS)
        assert set(new) == set(GLOBAL)


def test_unknown_names_and_params_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="fedavg, fedprox, fedadam"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="valid parameters: mu"):
        make_strategy("fedprox", eta=0.1)
    with pytest.raises(ValueError, match="mu must be >= 0"):
        make_strategy("fedprox", mu=-1)


def test_deltas_that_do_not_match_the_global_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_strategy("fedavg").aggregate(GLOBAL, [({**DELTAS[0][0], "0.bias": np.zeros(2)}, 1)])
    with pytest.raises(ValueError, match="empty"):
        make_strategy("fedadam").aggregate(GLOBAL, [])
    with pytest.raises(ValueError, match="keeps no state"):
        make_strategy("fedavg").load_state_dict({"m/0.bias": np.zeros(1)})


def test_params_rebuild_the_strategy_and_devices_get_only_training_settings() -> None:
    for name in STRATEGY_NAMES:
        original = make_strategy(name)
        rebuilt = make_strategy(name, **original.params())
        assert rebuilt.params() == original.params()
        plan = original.configure_round(1, _online("a"), RoundSettings(), RoundPolicy(), 0)
        changed = {
            k for k, v in vars(plan.settings.train).items() if v != getattr(TrainConfig(), k)
        }
        assert changed <= {"proximal_mu"}, name
    assert make_strategy("fedadam", eta=0.2).params()["eta"] == 0.2
    assert "eta=0.2" in repr(make_strategy("fedyogi", eta=0.2))


def test_default_selection_is_a_seeded_fraction_of_at_least_min_devices() -> None:
    ids = [f"pi-{i}" for i in range(10)]
    first = select_fraction(ids, 1, 0.3, 1, seed=0)
    assert len(first) == 3 and set(first) <= set(ids) and list(first) == sorted(first)
    assert select_fraction(reversed(ids), 1, 0.3, 1, seed=0) == first  # order does not matter
    draws = {select_fraction(ids, n, 0.3, 1, seed=0) for n in range(1, 9)}
    assert len(draws) > 1  # the round number changes the draw
    assert len(select_fraction(ids, 1, 0.1, 4, seed=0)) == 4  # min_devices wins over fraction
    assert select_fraction(ids[:2], 1, 0.5, 5, seed=0) == ("pi-0", "pi-1")  # fewer: all
    policy = RoundPolicy(fraction=0.3)
    plan = FedAvg().configure_round(1, _online(*ids), RoundSettings(), policy, seed=0)
    assert plan == RoundPlan(first, RoundSettings())


class Counting(FedAvg):
    """A stateful user strategy: counts the rounds it aggregated."""

    def __init__(self, start: int = 0) -> None:
        self.rounds = start


def test_strategies_are_built_per_task_from_a_name_an_instance_or_a_factory() -> None:
    by_name = build_strategies("fedprox", {"mu": 0.2}, ["a", "b"])
    assert [type(s) for s in by_name.values()] == [FedProx, FedProx]
    assert by_name["a"] is not by_name["b"] and by_name["b"].params() == {"mu": 0.2}
    mine = Counting(5)
    shared = build_strategies(mine, {}, ["a", "b"])
    assert shared["a"] is mine and shared["b"] is not mine  # tasks never share state
    assert isinstance(shared["b"], Counting) and shared["b"].rounds == 5
    made = build_strategies(Counting, {"start": 2}, ["a", "b"])
    assert made["a"] is not made["b"] and made["a"].rounds == 2  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not a Strategy"):
        build_strategies(lambda: "fedavg", {}, ["a"])
    with pytest.raises(ValueError, match="not an instance"):
        build_strategies(mine, {"start": 1}, ["a"])
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategies("fedsomething", {}, ["a"])
    with pytest.raises(ValueError, match="a name, a Strategy or a factory"):
        build_strategies(3, {}, ["a"])  # type: ignore[arg-type]
