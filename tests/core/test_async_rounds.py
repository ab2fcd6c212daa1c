"""The buffered asynchronous engine on literal statuses, headers and arrays: no broker, no clock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from edgefl.core.async_rounds import AsyncRoundEngine
from edgefl.core.codecs import encode_delta
from edgefl.core.rounds import ACCEPTED, REJECTED, REPEATED
from edgefl.core.settings import AsyncPolicy, PrivacySettings, RoundPolicy, RoundSettings
from edgefl.core.staleness import parse_staleness
from edgefl.core.strategies import build_strategies
from edgefl.head import Weights, head_digest
from edgefl.roles.record import StoredUpdate
from edgefl.transport.messages import DeviceStatus, UpdateHeader, update_metadata

NOW = 1_000_000.0
HEAD = {"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}
RUN = "run-1"
BUNDLE = "b" * 64


def delta(value: float) -> Weights:
    return {key: np.full(v.shape, value, np.float32) for key, v in HEAD.items()}


def status(device: str, task: str = "default") -> DeviceStatus:
    return DeviceStatus(device, "online", samples=10, task=task, model_version=1,
                        bundle_digest=BUNDLE)  # fmt: skip


def engine(
    devices: Sequence[str] = ("a", "b", "c"),
    *,
    buffer: int = 2,
    max_staleness: int = 2,
    staleness: str = "poly:0.5",
    tasks: Mapping[str, str] | None = None,
) -> AsyncRoundEngine:
    task_of = dict(tasks or {})
    heads = {task: dict(HEAD) for task in sorted(set(task_of.values()) | {"default"})}
    result = AsyncRoundEngine(
        heads, 0, build_strategies("fedavg", {}, heads), BUNDLE,
        RoundPolicy(deadline_s=10.0), run_id=RUN,
        asynchronous=AsyncPolicy("async", buffer, max_staleness, staleness),
    )  # fmt: skip
    for device in devices:
        result.observe_status(status(device, task_of.get(device, "default")), NOW)
    result.open_round(1, NOW)
    return result


def update(
    rounds: AsyncRoundEngine,
    number: int,
    device: str,
    value: float = 0.1,
    *,
    task: str = "default",
    head_version: int | None = None,
    head: str | None = None,
) -> bytes:
    """An update answering round `number`'s task as the engine remembers it."""
    known = rounds.tasks.get(number)
    version = known.head_version if known is not None else 0
    digest = known.head_digest if known is not None else "f" * 64
    header = UpdateHeader(
        number, device, task, 10, version if head_version is None else head_version,
        run_id=RUN, head_digest=digest if head is None else head, bundle_digest=BUNDLE,
    )  # fmt: skip
    return encode_delta(delta(value), "float32", metadata=update_metadata(header))


def bias(rounds: AsyncRoundEngine, task: str = "default") -> list[float]:
    return [round(float(v), 6) for v in rounds.heads[task]["0.bias"]]


def test_a_full_buffer_makes_the_next_head_version() -> None:
    rounds = engine(buffer=2)
    first = rounds.receive(1, "a", update(rounds, 1, "a", 0.1))
    assert (first.outcome, first.round, first.complete) == (ACCEPTED, 1, False)
    assert first.metrics == {"trained_round": 1.0, "staleness": 0.0}
    assert not rounds.due(NOW)
    second = rounds.receive(1, "b", update(rounds, 1, "b", 0.3))
    assert second.complete and rounds.due(NOW)
    closed = rounds.close_round()
    assert (closed.number, closed.status, closed.head_version, closed.accepted) == (
        1, "closed", 1, 2,
    )  # fmt: skip
    assert closed.metrics["buffer"] == 2 and closed.metrics["staleness_max"] == 0
    assert closed.answers == {"a": ACCEPTED, "b": ACCEPTED}
    assert bias(rounds) == [0.2, 0.2]  # FedAvg of fresh updates: weight 1 each
    # The next round carries the new head to every online device.
    opened = rounds.open_round(2, NOW + 1)
    assert opened.head_version == 1 and sorted(opened.selected) == ["a", "b", "c"]
    assert opened.head_digest == head_digest({"default": rounds.heads["default"]})


def test_a_stale_update_counts_weighted_by_the_staleness_function() -> None:
    rounds = engine(buffer=1, staleness="poly:0.5")
    assert rounds.receive(1, "a", update(rounds, 1, "a", 0.2)).complete
    rounds.close_round()
    rounds.open_round(2, NOW + 1)
    # "c" trained on round 1's head (v0) while v1 was made: staleness 1, weight 2^-0.5.
    verdict = rounds.receive(1, "c", update(rounds, 1, "c", 0.2))
    assert (verdict.outcome, verdict.round, verdict.metrics["staleness"]) == (ACCEPTED, 2, 1.0)
    closed = rounds.close_round()
    assert closed.metrics["staleness_mean"] == 1.0 and closed.head_version == 2
    assert bias(rounds) == [round(0.2 + 0.2 * 2**-0.5, 6)] * 2


def test_updates_beyond_the_staleness_bound_are_refused_stale_in_the_current_buffer() -> None:
    rounds = engine(buffer=1, max_staleness=1)
    for number in (1, 2):
        rounds.receive(number, "a", update(rounds, number, "a"))
        rounds.close_round()
        rounds.open_round(number + 1, NOW + number)
    assert rounds.head_version == 2
    verdict = rounds.receive(1, "b", update(rounds, 1, "b"))
    assert (verdict.outcome, verdict.code, verdict.round) == (REJECTED, "stale", 3)
    assert "round 1's head is 2 versions old (bound 1)" in verdict.reason
    # One version old is within the bound.
    assert rounds.receive(2, "b", update(rounds, 2, "b")).outcome == ACCEPTED
    closed = rounds.close_round()
    assert closed.rejected == {"stale": 1} and closed.answers == {"b": ACCEPTED}


@pytest.mark.parametrize(
    ("number", "device", "kwargs", "code"),
    [
        (5, "a", {}, "round-unknown"),
        (1, "d", {}, "unknown-device"),
        (1, "a", {"head_version": 3}, "head-mismatch"),
        (1, "a", {"head": "e" * 64}, "head-mismatch"),
        (1, "a", {"task": "pets"}, "task-mismatch"),
    ],
)
def test_the_synchronous_checks_apply_to_every_update(
    number: int, device: str, kwargs: dict[str, object], code: str
) -> None:
    rounds = engine()
    rounds._allow = frozenset({"a", "b", "c"})  # as AcceptancePolicy(allow=...) sets it
    verdict = rounds.receive(number, device, update(rounds, number, device, **kwargs))  # type: ignore[arg-type]
    assert (verdict.outcome, verdict.code, verdict.round) == (REJECTED, code, 1)
    assert rounds.buffer.rejected == {code: 1} and not rounds.buffer.updates


def test_privacy_and_codecs_are_checked_against_the_task_the_update_answers() -> None:
    heads = {"default": dict(HEAD)}
    settings = RoundSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=0.5))
    rounds = AsyncRoundEngine(
        heads, 0, build_strategies("fedavg", {}, heads), BUNDLE, RoundPolicy(deadline_s=10.0),
        settings, run_id=RUN, asynchronous=AsyncPolicy("async", buffer=2),
    )  # fmt: skip
    rounds.observe_status(status("a"), NOW)
    rounds.open_round(1, NOW)
    task = rounds.tasks[1]
    header = UpdateHeader(1, "a", "default", 10, 0, run_id=RUN, head_digest=task.head_digest,
                          bundle_digest=BUNDLE)  # fmt: skip
    unclipped = encode_delta(delta(0.1), "float32", metadata=update_metadata(header))
    verdict = rounds.receive(1, "a", unclipped)
    assert (verdict.outcome, verdict.code) == (REJECTED, "privacy")
    header.clip_norm, header.noise_multiplier = 1.0, 0.5
    int8 = encode_delta(delta(0.1), "int8", metadata=update_metadata(header))
    assert rounds.receive(1, "a", int8).outcome == ACCEPTED


def test_a_device_answers_each_task_once_even_after_its_buffer_closed() -> None:
    rounds = engine(buffer=1)
    payload = update(rounds, 1, "a", 0.1)
    assert rounds.receive(1, "a", payload).outcome == ACCEPTED
    rounds.close_round()
    rounds.open_round(2, NOW + 1)
    # A re-delivery after a reconnect: nothing counted, nothing aggregated twice.
    again = rounds.receive(1, "a", payload)
    assert again.outcome == REPEATED and not rounds.buffer.updates
    other = rounds.receive(1, "a", update(rounds, 1, "a", 0.5))
    assert (other.outcome, other.code) == (REJECTED, "duplicate")
    # Its answer to the newer task is a different one, and counts.
    assert rounds.receive(2, "a", update(rounds, 2, "a")).outcome == ACCEPTED


def test_updates_between_a_close_and_the_next_open_fill_the_next_buffer() -> None:
    rounds = engine(buffer=2)
    rounds.receive(1, "a", update(rounds, 1, "a"))
    rounds.receive(1, "b", update(rounds, 1, "b"))
    rounds.close_round()
    verdict = rounds.receive(1, "c", update(rounds, 1, "c"))
    assert (verdict.outcome, verdict.round) == (ACCEPTED, 2)
    rounds.open_round(2, NOW + 1)
    assert list(rounds.buffer.updates) == [("c", 1)] and rounds.buffer.number == 2


def test_updates_arriving_before_a_full_buffer_closes_join_it() -> None:
    rounds = engine(buffer=1)
    assert rounds.receive(1, "a", update(rounds, 1, "a", 0.2)).complete
    late = rounds.receive(1, "b", update(rounds, 1, "b", 0.4))
    assert (late.outcome, late.round, late.complete) == (ACCEPTED, 1, True)
    closed = rounds.close_round()
    assert closed.accepted == 2 and closed.metrics["buffer"] == 2
    assert bias(rounds) == [0.3, 0.3]


def test_the_deadline_aggregates_a_partial_buffer_and_fails_an_empty_one() -> None:
    rounds = engine(buffer=3)
    rounds.receive(1, "a", update(rounds, 1, "a", 0.4))
    assert not rounds.due(NOW + 9.9) and rounds.due(NOW + 10.0)
    closed = rounds.close_round()
    assert (closed.status, closed.head_version) == ("closed", 1)
    assert "1 of 3 updates buffered" in closed.reason and bias(rounds) == [0.4, 0.4]
    rounds.open_round(2, NOW + 20)
    failed = rounds.close_round()
    assert (failed.status, failed.head_version, failed.accepted) == ("failed", 1, 0)


def test_each_task_aggregates_its_own_updates() -> None:
    rounds = engine(("a", "p"), buffer=2, tasks={"p": "pets"})
    rounds.receive(1, "a", update(rounds, 1, "a", 0.1))
    rounds.receive(1, "p", update(rounds, 1, "p", 0.3, task="pets"))
    rounds.close_round()
    assert bias(rounds) == [0.1, 0.1] and bias(rounds, "pets") == [0.3, 0.3]


def restart(live: AsyncRoundEngine) -> AsyncRoundEngine:
    """A new engine on what a record keeps of `live`: its heads and version, statuses again."""
    restarted = AsyncRoundEngine(
        dict(live.heads), live.head_version, build_strategies("fedavg", {}, live.heads), BUNDLE,
        RoundPolicy(deadline_s=10.0), run_id=RUN, asynchronous=live.asynchronous,
    )  # fmt: skip
    for device in ("a", "b", "c"):
        restarted.observe_status(status(device), NOW)
    return restarted


def test_a_restarted_engine_rebuilds_its_buffer_and_the_answers_already_counted() -> None:
    # Uninterrupted: round 1 closes with "a"; round 2 buffers "b" (stale) and "c".
    live = engine(buffer=2)
    from_a = update(live, 1, "a", 0.1)  # encoded once: every encoding differs
    live.receive(1, "a", from_a)
    live.receive(1, "b", update(live, 1, "b", 0.1))
    live.close_round()
    task1 = live.tasks[1]
    live.open_round(2, NOW + 1)
    stale = update(live, 1, "c", 0.3)
    accepted = live.receive(1, "c", stale)
    first_of_2 = {"a": update(live, 2, "a", 0.2)}
    # The restarted engine, from what a record keeps: heads v1, round 1's task, round 2 open.
    restarted = restart(live)
    restarted.remember_task(1, task1.selected, 0, task1.config, task1.head_digest)
    restarted.remember_answers([
        StoredUpdate("a", "default", 10, live.answered[("a", 1)], b"", {"trained_round": 1.0}),
    ])  # fmt: skip
    restarted.resume(
        2, live.tasks[2].selected, 1, live.tasks[2].config,
        [StoredUpdate("c", "default", 10, accepted.sha256, stale, accepted.metrics)], NOW + 2,
    )  # fmt: skip
    assert list(restarted.buffer.updates) == [("c", 1)]
    assert restarted.receive(1, "a", from_a).outcome == REPEATED
    assert restarted.receive(1, "c", stale).outcome == REPEATED
    for rounds in (live, restarted):
        assert rounds.receive(2, "a", first_of_2["a"]).complete
        rounds.close_round()
    np.testing.assert_array_equal(restarted.heads["default"]["0.bias"],
                                  live.heads["default"]["0.bias"])  # fmt: skip


def test_updates_buffered_before_a_restart_between_rounds_fill_the_next_round() -> None:
    live = engine(buffer=1)
    live.receive(1, "a", update(live, 1, "a", 0.1))
    live.close_round()  # killed here: round 2 not opened, "b"'s update already recorded
    from_b = update(live, 1, "b", 0.3)
    taken = live.receive(1, "b", from_b)
    assert taken.round == 2
    restarted = restart(live)
    task1 = live.tasks[1]
    restarted.remember_task(1, task1.selected, 0, task1.config, task1.head_digest)
    restarted.restore_buffer(
        2, [StoredUpdate("b", "default", 10, taken.sha256, from_b, taken.metrics)]
    )
    restarted.open_round(2, NOW + 5)
    assert restarted.due(NOW + 5)  # the restored update already fills the buffer
    assert restarted.close_round().accepted == 1
    assert bias(restarted) == [round(0.1 + 0.3 * 2**-0.5, 6)] * 2


@pytest.mark.parametrize(
    ("spec", "weights"),
    [
        ("poly:0.5", [1.0, 2**-0.5, 3**-0.5]),
        ("poly:1", [1.0, 0.5, 1 / 3]),
        ("const", [1.0, 1.0, 1.0]),
        ("hinge:2,1", [1.0, 1.0, 1 / 3]),
    ],
)
def test_staleness_functions(spec: str, weights: list[float]) -> None:
    weight = parse_staleness(spec)
    assert [weight(s) for s in range(3)] == pytest.approx(weights)
    assert str(parse_staleness(str(weight))) == str(weight)


@pytest.mark.parametrize(
    ("spec", "says"),
    [("cubic:2", "not one of"), ("poly", "poly:A"), ("hinge:1", "hinge:A,B"),
     ("poly:x", "must be numbers"), ("poly:-1", "must not be negative")],
)  # fmt: skip
def test_bad_staleness_functions_are_refused(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_staleness(spec)
    with pytest.raises(ValueError, match=says):
        AsyncPolicy("async", staleness=spec).check()
