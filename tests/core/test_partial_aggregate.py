"""Partial sums, bounds planned from claims, and the coordinator's engine fed verdict notes."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.core.aggregate import aggregate_weighted
from edgefl.core.influence import InfluenceBound, bound_updates, plan_bounds
from edgefl.core.partial_aggregate import combine_sums, fold_weighted, mean_delta
from edgefl.core.partial_rounds import WORKER_LOST, PartialRoundEngine
from edgefl.core.privacy import global_norm
from edgefl.core.settings import RoundPolicy
from edgefl.core.strategies import FedAdam, FedAvg, FedMedian, make_strategy
from edgefl.transport.messages import DeviceStatus

DELTAS = {
    "a": ({"w": np.array([1.0, 2.0], np.float32)}, 10),
    "b": ({"w": np.array([3.0, -1.0], np.float32)}, 30),
    "c": ({"w": np.array([0.5, 0.5], np.float32)}, 20),
    "d": ({"w": np.array([40.0, 0.0], np.float32)}, 5000),  # an outlier: clipped and capped
}


def test_folded_shares_give_the_bounded_weighted_mean_of_all_updates() -> None:
    bound = InfluenceBound(factor=2.0)
    plans = plan_bounds({d: (n, global_norm(w)) for d, (w, n) in DELTAS.items()}, {}, bound)
    bounded = bound_updates(DELTAS, {}, bound)
    assert {d: (b.samples, b.clipped_norm) for d, b in bounded.items()} == {
        d: (p.samples, p.clipped_norm) for d, p in plans.items()
    }
    assert plans["d"].clip_to is not None and plans["d"].capped_samples == 5000
    expected = aggregate_weighted([(b.delta, b.samples) for b in bounded.values()])
    # Two workers: a and c on one, b and d on the other.
    shares = [
        fold_weighted([(DELTAS[d][0], plans[d]) for d in part]) for part in (("a", "c"), ("b", "d"))
    ]
    combined = combine_sums(s for s in shares if s is not None)
    assert combined is not None and combined.count == 4
    # Equal up to the order of float64 additions: Σ wΔ / Σ w here, Σ (w / Σ w) Δ there (this
    # case's exact 0 comes out as 2.8e-17 one way and 0 the other).
    np.testing.assert_allclose(mean_delta(combined, {"w": DELTAS["a"][0]["w"]})["w"],
                               expected["w"], rtol=1e-6, atol=1e-12)  # fmt: skip
    assert fold_weighted([]) is None


def test_combining_refuses_sums_of_other_shapes_and_the_mean_of_nothing() -> None:
    plan = plan_bounds({"a": (1, 1.0)}, {}, InfluenceBound())["a"]
    one = fold_weighted([(DELTAS["a"][0], plan)])
    other = fold_weighted([({"w": np.zeros(3, np.float32)}, plan)])
    assert one is not None and other is not None
    with pytest.raises(ValueError, match="different parameters or shapes"):
        combine_sums([one, other])
    one.weight = 0.0
    with pytest.raises(ValueError, match="weight 0"):
        mean_delta(one, {"w": np.zeros(2, np.float32)})


def test_weighted_sum_marks_the_strategies_that_only_see_the_mean() -> None:
    assert FedAvg.weighted_sum and FedAdam.weighted_sum and make_strategy("fedprox").weighted_sum
    assert make_strategy("fedyogi").weighted_sum
    assert not FedMedian.weighted_sum and not make_strategy("krum").weighted_sum
    assert not make_strategy("trimmed-mean").weighted_sum


def _engine(strategy: FedAvg | FedMedian) -> PartialRoundEngine:
    head = {"w": np.zeros(2, np.float32)}
    engine = PartialRoundEngine({"default": head}, 0, {"default": strategy}, "bundle",
                                RoundPolicy(min_devices=1, quorum=0.1), run_id="run")  # fmt: skip
    for device in ("a", "b", "c"):
        status = DeviceStatus(device, "online", samples=100, bundle_digest="bundle")
        engine.observe_status(status, 0.0)
    engine.open_round(1, 0.0)
    return engine


def _note(device: str, outcome: str = "accepted", sha: str = "", code: str = "") -> dict:
    return {"outcome": outcome, "round": 1, "device": device, "code": code, "reason": "why",
            "task": "default", "samples": 10, "sha256": sha or f"sha-{device}", "size": 100,
            "metrics": {}, "norm": 1.0}  # fmt: skip


def test_notes_count_each_answer_once_whichever_worker_judged_it() -> None:
    engine = _engine(FedAvg())
    first = engine.note("w0", _note("a"), sealed=True)
    assert first is not None and first.outcome == "accepted" and not first.complete
    # The same bytes judged again by another worker after a re-delivery: nothing to record.
    assert engine.note("w1", _note("a"), sealed=True) is None
    other = engine.note("w1", _note("a", sha="sha-other"), sealed=True)
    assert other is not None and other.code == "duplicate"
    assert engine.note("w1", _note("b", "rejected", code="norm"), sealed=True).code == "norm"  # type: ignore[union-attr]
    # Oversized and sealed: dropped unread, so not c's answer; the round still waits for c.
    engine.note("w0", _note("c", "rejected", sha="", code="oversized"), sealed=True)
    assert not engine.round.complete  # type: ignore[union-attr]
    last = engine.note("w0", _note("c"), sealed=True)
    assert last is not None and last.complete
    assert engine.holders() == {"w0": ["a", "c"]}
    assert dict(engine.round.rejected) == {"duplicate": 1, "norm": 1, "oversized": 1}  # type: ignore[union-attr]


def test_updates_a_worker_lost_are_counted_and_not_aggregated() -> None:
    engine = _engine(FedAvg())
    for device in ("a", "b"):
        engine.note("w0" if device == "a" else "w1", _note(device), sealed=True)
    assert engine.lose(["b"], "ingest worker w1 sent no partial") == ["b"]
    take = engine.plan_fold()
    assert take == {"w0": {"a": [10.0, None]}}
    part = fold_weighted([({"w": np.array([2.0, 4.0], np.float32)}, engine.plans["a"])])
    assert part is not None
    engine.take_sums({"default": part})
    closed = engine.close_round()
    assert (closed.accepted, closed.rejected) == (1, {WORKER_LOST: 1})
    assert closed.answers == {"a": "accepted", "b": WORKER_LOST, "c": "no-answer"}
    np.testing.assert_array_equal(engine.heads["default"]["w"], [2.0, 4.0])


def test_a_robust_strategy_aggregates_the_gathered_deltas() -> None:
    engine = _engine(FedMedian())
    for device, value in (("a", 1.0), ("b", 5.0), ("c", 2.0)):
        engine.note("w0", _note(device), sealed=True)
        engine.take_deltas({device: {"w": np.array([value, -value], np.float32)}})
    assert not engine.weighted_sum
    engine.close_round()
    np.testing.assert_array_equal(engine.heads["default"]["w"], [2.0, -2.0])
    # A note after the close is late: recorded, never aggregated.
    late = engine.note("w0", _note("a", sha="sha-new"), sealed=True)
    assert late is not None and late.code == "round-closed"
