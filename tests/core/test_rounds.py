"""The round engine on literal statuses, headers and arrays: no broker, no clock, no database."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from edgefl.core.codecs import encode_delta
from edgefl.core.rounds import (
    ACCEPTED,
    LATE,
    REJECTED,
    REPEATED,
    RoundEngine,
)
from edgefl.core.settings import (
    AcceptancePolicy,
    PrivacySettings,
    RoundPolicy,
    RoundSettings,
    TrainConfig,
)
from edgefl.core.strategies import FedAvg, FedProx, RoundPlan, Strategy, build_strategies
from edgefl.head import Weights, head_digest
from edgefl.transport.messages import (
    DeviceStatus,
    UpdateHeader,
    encode_update_error,
    update_metadata,
)

NOW = 1_000_000.0
HEAD = {"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}
RUN = "run-1"
BUNDLE = "b" * 64
HEAD_DIGEST = head_digest({"default": HEAD})


def delta(value: float) -> Weights:
    return {key: np.full(v.shape, value, np.float32) for key, v in HEAD.items()}


def update(
    number: int = 1,
    device: str = "a",
    values: Mapping[str, np.ndarray] | None = None,
    *,
    task: str = "default",
    samples: int = 10,
    head_version: int = 0,
    metrics: Mapping[str, float] | None = None,
    run_id: str = RUN,
    head: str = HEAD_DIGEST,
    bundle: str = BUNDLE,
    clip: float | None = None,
    noise: float = 0.0,
) -> bytes:
    header = UpdateHeader(number, device, task, samples, head_version, metrics=dict(metrics or {}),
                          run_id=run_id, head_digest=head, bundle_digest=bundle, clip_norm=clip,
                          noise_multiplier=noise)  # fmt: skip
    values = delta(0.1) if values is None else values
    return encode_delta(values, "float32", metadata=update_metadata(header))


def status(
    device: str, *, task: str = "default", bundle: str = BUNDLE, **fields: object
) -> DeviceStatus:
    fields = {"samples": 10, **fields}
    return DeviceStatus(device, "online", task=task, model_version=1,
                        bundle_digest=bundle, **fields)  # type: ignore[arg-type]  # fmt: skip


def engine(
    devices: Sequence[str] = ("a", "b"),
    *,
    tasks: Sequence[str] = ("default",),
    policy: RoundPolicy | None = None,
    settings: RoundSettings | None = None,
    acceptance: AcceptancePolicy | None = None,
    strategy: object = "fedavg",
    open_round: bool = True,
) -> RoundEngine:
    heads = {task: dict(HEAD) for task in tasks}
    built = build_strategies(strategy, {}, heads)  # type: ignore[arg-type]
    result = RoundEngine(heads, 0, built, BUNDLE, policy, settings, acceptance, run_id=RUN)
    for device in devices:
        result.observe_status(status(device), NOW)
    if open_round:
        result.open_round(1, NOW)
    return result


# -- acceptance: one case per rule, from literal bytes --

ARRAY_CASES = [
    ("missing-key", {"0.weight": np.zeros((2, 3), np.float32)}, "lacks 0.bias"),
    ("extra-key", {**delta(0.0), "1.weight": np.zeros(1, np.float32)}, "unknown 1.weight"),
    ("shape", {**delta(0.0), "0.bias": np.zeros(3, np.float32)}, "0.bias has shape [3]"),
    ("non-finite", {**delta(0.0), "0.bias": np.array([0.0, np.inf], np.float32)}, "1 NaN or Inf"),
    ("norm", delta(10.0), "exceeds the bound 1"),
]


@pytest.mark.parametrize(("code", "values", "reason"), ARRAY_CASES)
def test_deltas_that_do_not_fit_the_head_are_rejected_with_the_validation_code(
    code: str, values: Weights, reason: str
) -> None:
    rounds = engine(acceptance=AcceptancePolicy(max_norm=1.0))
    verdict = rounds.receive(1, "a", update(values=values))
    assert (verdict.outcome, verdict.code) == (REJECTED, code)
    assert reason in verdict.reason
    assert rounds.round is not None and rounds.round.rejected == {code: 1}
    # A rejected update is the device's answer: the round need not wait for it.
    assert rounds.round.accepted == {} and rounds.round.answers == {"a": code}


def test_a_delta_of_integers_is_refused_by_the_codec_before_it_is_validated() -> None:
    # validate_delta's "dtype" check (tests/core/test_validation.py) is the second line.
    header = UpdateHeader(1, "a", "default", 10, 0, run_id=RUN, head_digest=HEAD_DIGEST,
                          bundle_digest=BUNDLE)  # fmt: skip
    shapes = json.dumps({k: list(v.shape) for k, v in HEAD.items()})
    payload = save_safetensors(
        {k: np.zeros(v.shape, np.int32) for k, v in HEAD.items()},
        metadata={"codec": "float32", "shapes": shapes, **update_metadata(header)},
    )
    verdict = engine().receive(1, "a", bytes(payload))
    assert (verdict.outcome, verdict.code) == (REJECTED, "malformed")
    assert "'0.weight' is int32[2, 3], expected float32[2, 3]" in verdict.reason


IDENTITY_CASES = [
    # (code, topic round, topic device, payload, reason)
    ("unknown-device", 1, "stranger", update(device="stranger"), "not in the fleet list"),
    ("malformed", 1, "a", b"\x00garbage that is not safetensors", "not safetensors"),
    ("device-mismatch", 1, "a", update(device="b"), "from 'b' on 'a'"),
    ("round-mismatch", 1, "a", update(number=2), "for round 2 on round 1"),
    ("round-unknown", 2, "a", update(number=2), "round 2 has not started"),
    ("not-selected", 1, "c", update(device="c"), "c was not selected"),
    ("task-mismatch", 1, "a", update(task="pets"), "for task 'pets', not 'default'"),
    ("head-mismatch", 1, "a", update(head_version=3), "from head v3"),
    ("head-mismatch", 1, "a", update(head="f" * 64), "(ffffffffffff), round sends v0"),
    ("no-samples", 1, "a", update(samples=0), "no training samples"),
    ("run-mismatch", 1, "a", update(run_id="run-0"), "for run run-0, not run-1"),
    ("run-mismatch", 3, "a", update(3, run_id=""), "for run (none)"),
    ("bundle-mismatch", 1, "a", update(bundle="c" * 64), "from bundle cccccccccccc"),
]


@pytest.mark.parametrize(("code", "number", "device", "payload", "reason"), IDENTITY_CASES)
def test_updates_that_do_not_answer_the_open_round_are_rejected(
    code: str, number: int, device: str, payload: bytes, reason: str
) -> None:
    rounds = engine(("a", "b"), acceptance=AcceptancePolicy(allow=("a", "b", "c")))
    rounds.observe_status(status("c"), NOW)  # online, but after the round selected
    verdict = rounds.receive(number, device, payload)
    assert (verdict.outcome, verdict.code, verdict.round, verdict.device) == (
        REJECTED, code, number, device,
    )  # fmt: skip
    assert reason in verdict.reason
    assert rounds.round is not None
    # Counted in the round it names; the answer of a selected device for the open round.
    assert rounds.round.rejected == ({code: 1} if number == 1 else {})
    answers = {device: code} if number == 1 and device in ("a", "b") else {}
    assert rounds.round.answers == answers and not verdict.complete


def test_an_accepted_update_joins_the_round_with_what_the_record_keeps() -> None:
    rounds = engine()
    payload = update(metrics={"loss": 0.5})
    verdict = rounds.receive(1, "a", payload)
    assert (verdict.outcome, verdict.task, verdict.samples, verdict.size) == (
        ACCEPTED, "default", 10, len(payload),
    )  # fmt: skip
    assert verdict.metrics == {"loss": 0.5} and len(verdict.sha256) == 64
    assert not verdict.complete  # "b" has not answered
    assert rounds.round is not None
    np.testing.assert_array_equal(
        rounds.round.accepted["a"].delta["0.bias"], np.float32([0.1, 0.1])
    )
    assert rounds.receive(1, "b", update(device="b")).complete


def test_the_same_bytes_again_change_nothing_and_a_second_answer_is_a_duplicate() -> None:
    rounds = engine()
    first = update(values=delta(0.1))
    assert rounds.receive(1, "a", first).outcome == ACCEPTED
    again = rounds.receive(1, "a", first)
    assert (again.outcome, again.code) == (REPEATED, "")
    other = rounds.receive(1, "a", update(values=delta(0.2)))
    assert (other.outcome, other.code) == (REJECTED, "duplicate")
    assert rounds.round is not None
    assert rounds.round.rejected == {"duplicate": 1} and list(rounds.round.accepted) == ["a"]
    np.testing.assert_array_equal(
        rounds.round.accepted["a"].delta["0.bias"], np.float32([0.1, 0.1])
    )


def test_a_device_error_is_rejected_with_its_code_but_counts_as_its_answer() -> None:
    rounds = engine(("a",))
    header = UpdateHeader(1, "a", "default", 0, 0, status="error", error_code="no-data",
                          reason="no labelled samples", run_id=RUN)  # fmt: skip
    verdict = rounds.receive(1, "a", encode_update_error(header))
    assert (verdict.outcome, verdict.code, verdict.reason) == (
        REJECTED, "device:no-data", "no labelled samples",
    )  # fmt: skip
    assert verdict.complete and rounds.due(NOW)  # the round need not wait for "a"
    assert rounds.receive(1, "a", update()).code == "duplicate"


def test_refused_unread_updates_are_counted_in_the_open_round() -> None:
    rounds = engine()
    oversized = rounds.refuse(1, "a", "oversized", "99 bytes exceeds the limit 9", 99)
    bad_topic = rounds.refuse(-1, "?", "bad-topic", "x/y is not an update topic", 3)
    assert (oversized.outcome, bad_topic.outcome) == (REJECTED, REJECTED)
    assert rounds.round is not None
    assert rounds.round.rejected == {"oversized": 1, "bad-topic": 1}


def test_updates_for_a_closed_round_are_late_and_not_counted_in_the_next_one() -> None:
    rounds = engine(("a",), policy=RoundPolicy(quorum=1.0))
    payload = update()
    assert rounds.receive(1, "a", payload).outcome == ACCEPTED
    rounds.close_round()
    after_close = rounds.receive(1, "a", update(values=delta(0.3)))
    assert (after_close.outcome, after_close.code) == (LATE, "round-closed")
    rounds.open_round(2, NOW + 10)
    late = rounds.receive(1, "a", payload)  # round 1's update replayed after round 2 opened
    assert (late.outcome, late.code, late.reason) == (LATE, "round-closed", "round 1 is closed")
    assert late.round == 1  # the record keeps it under round 1
    assert rounds.round is not None and (rounds.round.late, rounds.round.rejected) == (0, {})
    replayed = rounds.receive(2, "a", payload)  # the same bytes on round 2's topic
    assert replayed.code == "round-mismatch"


# -- presence and selection --


def test_only_eligible_devices_with_a_fresh_status_are_online() -> None:
    allow = AcceptancePolicy(allow=("a", "b", "c", "d", "e"))
    policy = RoundPolicy(stale_after_s=30.0)
    rounds = engine((), acceptance=allow, policy=policy, open_round=False)
    rounds.observe_status(status("a"), NOW)
    rounds.observe_status(status("b"), NOW - 31)  # not heard within stale_after_s
    rounds.observe_status(status("c", bundle="c" * 64), NOW)  # same version, other bundle
    rounds.observe_status(status("d", task="pets"), NOW)  # a task without a head here
    rounds.observe_status(DeviceStatus("e", "offline", bundle_digest=BUNDLE), NOW)
    rounds.observe_status(status("f"), NOW)  # not on the allow-list
    assert rounds.device_presence(NOW) == {"a": "online", "b": "stale", "e": "offline"}
    assert list(rounds.online_devices(NOW)) == ["a"] and rounds.stale_devices(NOW) == ["b"]
    rounds.observe_status(status("b"), NOW - 100)  # an old retained copy does not age it
    assert rounds.stale_devices(NOW) == ["b"]
    assert rounds.online_devices(NOW + 31) == {}  # "a" turns stale by time alone


def test_a_round_waits_until_min_devices_are_online() -> None:
    rounds = engine(("a",), policy=RoundPolicy(min_devices=2), open_round=False)
    assert not rounds.ready(NOW)
    rounds.observe_status(status("b"), NOW)
    assert rounds.ready(NOW)


def test_open_round_selects_a_seeded_fraction_and_sends_the_strategys_settings() -> None:
    ids = [f"pi-{i}" for i in range(10)]
    settings = RoundSettings(train=TrainConfig(lr=0.3, seed=7))
    policy = RoundPolicy(fraction=0.3, deadline_s=5.0)
    first = engine(ids, policy=policy, settings=settings, strategy=FedProx(mu=0.2))
    again = engine(ids, policy=policy, settings=settings, strategy=FedProx(mu=0.2))
    other_seed = engine(ids, policy=policy, settings=RoundSettings(train=TrainConfig(seed=8)))
    assert first.round is not None and again.round is not None and other_seed.round is not None
    assert len(first.round.selected) == 3 and first.round.selected == again.round.selected
    assert first.round.selected != other_seed.round.selected
    assert set(first.round.selected.values()) == {"default"}
    assert first.round.deadline == NOW + 5.0 and first.round.online == 10
    sent = RoundSettings.from_wire(first.round.config)
    assert (sent.train.proximal_mu, sent.train.lr, sent.train.seed) == (0.2, 0.3, 7)


class OnlyTheBiggest(Strategy):
    """A user's strategy: one device trains (the one with most samples), for 3 epochs, and the
    new head is the global head plus twice its delta."""

    name = "only-the-biggest"

    def configure_round(
        self,
        round_number: int,
        devices: Mapping[str, DeviceStatus],
        settings: RoundSettings,
        policy: RoundPolicy,
        seed: int,
    ) -> RoundPlan:
        biggest = max(devices, key=lambda d: (devices[d].samples, d))
        return RoundPlan((biggest,), RoundSettings(train=TrainConfig(epochs=3)))

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], deltas: Sequence[tuple[Weights, int]]
    ) -> Weights:
        ((only, _),) = deltas
        return {k: v + 2 * only[k] for k, v in global_weights.items()}


def test_a_strategy_from_outside_the_package_selects_configures_and_aggregates() -> None:
    rounds = engine(("a", "b"), strategy=OnlyTheBiggest, open_round=False)
    rounds.observe_status(DeviceStatus("big", "online", samples=500, bundle_digest=BUNDLE), NOW)
    opened = rounds.open_round(1, NOW)
    assert list(opened.selected) == ["big"]
    assert RoundSettings.from_wire(opened.config).train.epochs == 3
    assert rounds.receive(1, "a", update()).code == "not-selected"
    assert rounds.receive(1, "big", update(device="big", values=delta(0.25))).complete
    closed = rounds.close_round()
    assert (closed.status, closed.head_version) == ("closed", 1)
    np.testing.assert_array_equal(rounds.heads["default"]["0.bias"], [0.5, 0.5])


class PicksAStranger(FedAvg):
    def configure_round(self, *args: object, **kwargs: object) -> RoundPlan:
        return RoundPlan(("nobody-knows",), RoundSettings())


def test_a_strategy_that_selects_an_unknown_device_is_refused() -> None:
    rounds = engine(("a",), strategy=PicksAStranger, open_round=False)
    with pytest.raises(ValueError, match="not online: nobody-knows"):
        rounds.open_round(1, NOW)
    assert rounds.round is None


# -- quorum, deadline, closing --


def test_the_round_is_due_when_everyone_answered_or_at_the_deadline() -> None:
    rounds = engine(("a", "b"), policy=RoundPolicy(deadline_s=10.0))
    assert not rounds.due(NOW + 9.9)
    assert rounds.due(NOW + 10.0)
    rounds.receive(1, "a", update())
    assert not rounds.due(NOW + 1)
    rounds.receive(1, "b", update(device="b"))
    assert rounds.due(NOW + 1)


def test_below_quorum_the_round_fails_and_the_heads_stay() -> None:
    rounds = engine(("a", "b", "c"), policy=RoundPolicy(quorum=0.5))  # needs 2 of 3
    rounds.receive(1, "a", update())
    closed = rounds.close_round()
    assert (closed.status, closed.reason, closed.head_version) == (
        "failed", "1 accepted, quorum is 2", 0,
    )  # fmt: skip
    assert rounds.head_version == 0
    np.testing.assert_array_equal(rounds.heads["default"]["0.bias"], [0.0, 0.0])
    with pytest.raises(RuntimeError, match="no round is open"):
        rounds.close_round()


def test_at_quorum_the_heads_advance_by_the_weighted_mean_delta_per_task() -> None:
    rounds = engine((), tasks=("default", "pets"), policy=RoundPolicy(quorum=1.0),
                    open_round=False)  # fmt: skip
    for device, task in (("a", "default"), ("b", "default"), ("p", "pets")):
        rounds.observe_status(status(device, task=task), NOW)
    opened = rounds.open_round(1, NOW)
    assert opened.selected == {"a": "default", "b": "default", "p": "pets"}
    both = opened.head_digest  # the digest of both tasks' heads, as the task carries them
    rounds.receive(1, "a", update(values=delta(0.1), samples=1, metrics={"loss": 1.0}, head=both))
    rounds.receive(1, "b", update(device="b", values=delta(0.5), samples=3,
                                  metrics={"loss": 2.0}, head=both))  # fmt: skip
    rounds.receive(1, "p", update(device="p", task="pets", values=delta(-1.0), samples=4,
                                  head=both))  # fmt: skip
    closed = rounds.close_round()
    assert (closed.status, closed.head_version, closed.accepted) == ("closed", 1, 3)
    np.testing.assert_allclose(rounds.heads["default"]["0.weight"], np.full((2, 3), 0.4))
    np.testing.assert_allclose(rounds.heads["pets"]["0.bias"], [-1.0, -1.0])
    assert closed.metrics["samples"] == 8.0
    assert "device_loss" not in closed.metrics  # "p" reported no loss: no average
    np.testing.assert_array_equal(HEAD["0.bias"], [0.0, 0.0])  # the bundle's head untouched
    # The next round's updates must start from the new head version.
    rounds.open_round(2, NOW + 60)
    assert rounds.receive(2, "a", update(2, head_version=1)).code == "head-mismatch"
    assert rounds.round is not None
    new_head = rounds.round.head_digest
    assert new_head == head_digest(rounds.heads) != opened.head_digest
    assert rounds.receive(2, "b", update(2, "b", head_version=1, head=new_head)).outcome == ACCEPTED


# -- resume --


@dataclass
class Stored:
    device_id: str
    samples: int
    sha256: str
    payload: bytes
    metrics: dict[str, float] = field(default_factory=dict)


def test_a_resumed_round_keeps_its_accepted_updates_and_ends_as_if_uninterrupted() -> None:
    import hashlib

    first, second = update(values=delta(0.2)), update(device="b", values=delta(0.4))
    uninterrupted = engine(policy=RoundPolicy(deadline_s=30.0))
    uninterrupted.receive(1, "a", first)
    uninterrupted.receive(1, "b", second)
    expected = uninterrupted.close_round()

    restarted = engine(open_round=False, policy=RoundPolicy(deadline_s=30.0))
    stored = [
        Stored("a", 10, hashlib.sha256(first).hexdigest(), first),
        Stored("ghost", 10, "0" * 64, b"corrupt"),  # unreadable: left out, not fatal
    ]
    config = RoundSettings().to_wire()
    reopened = restarted.resume(1, {"a": "default", "b": "default"}, 0, config, stored, NOW + 99)
    assert (reopened.deadline, list(reopened.accepted), reopened.config) == (
        NOW + 129, ["a"], config,
    )  # fmt: skip
    assert restarted.receive(1, "a", first).outcome == REPEATED  # the device sends it again
    assert restarted.receive(1, "a", update(values=delta(0.9))).code == "duplicate"
    assert restarted.receive(1, "b", second).complete
    resumed = restarted.close_round()
    assert (resumed.status, resumed.accepted) == (expected.status, expected.accepted)
    for key in HEAD:
        np.testing.assert_array_equal(restarted.heads["default"][key],
                                      uninterrupted.heads["default"][key])  # fmt: skip


# -- run identity, answers, settling, bounded influence (issue 9) --


def test_a_rejected_update_is_the_devices_answer_and_the_result_says_why() -> None:
    rounds = engine(("a", "b", "c"), policy=RoundPolicy(quorum=0.3))
    stale = update(device="a", run_id="run-0")  # a stored answer of an earlier run
    assert rounds.receive(1, "a", stale).code == "run-mismatch"
    assert rounds.receive(1, "a", stale).outcome == REPEATED  # re-delivered: nothing new
    assert rounds.receive(1, "a", update(device="a")).code == "duplicate"  # a second answer
    assert rounds.receive(1, "b", update(device="b")).outcome == ACCEPTED
    assert not rounds.due(NOW)  # "c" has not answered
    assert rounds.receive(1, "c", update(device="c", bundle="c" * 64)).complete
    assert rounds.due(NOW)  # all answered, long before the deadline
    closed = rounds.close_round()
    assert closed.answers == {"a": "run-mismatch", "b": ACCEPTED, "c": "bundle-mismatch"}
    assert "for run run-0" in closed.reasons["a"] and set(closed.reasons) == {"a", "c"}
    assert closed.rejected == {"run-mismatch": 1, "duplicate": 1, "bundle-mismatch": 1}


def test_a_device_that_never_answered_is_named_in_the_result() -> None:
    rounds = engine(("a", "b"), policy=RoundPolicy(quorum=0.5))
    rounds.receive(1, "a", update())
    closed = rounds.close_round()
    assert closed.answers == {"a": ACCEPTED, "b": "no-answer"}
    assert closed.reasons == {"b": "no update before the round closed"}


def test_a_rejection_is_counted_in_the_round_it_names_not_the_open_one() -> None:
    rounds = engine(("a",), policy=RoundPolicy(quorum=1.0))
    for number in range(1, 5):
        rounds.receive(number, "a", update(number, head_version=number - 1,
                                           head=rounds.round.head_digest))  # type: ignore[union-attr]  # fmt: skip
        rounds.close_round()
        rounds.open_round(number + 1, NOW + number)
    assert rounds.round is not None and rounds.round.number == 5
    old_run = rounds.receive(3, "a", update(3, run_id="run-0"))
    old_round = rounds.receive(3, "a", update(3, head_version=2))
    assert (old_run.round, old_run.code, old_round.round, old_round.code) == (
        3, "run-mismatch", 3, "round-closed",
    )  # fmt: skip
    assert (rounds.round.rejected, rounds.round.late, rounds.round.answers) == ({}, 0, {})
    rounds.refuse(-1, "?", "bad-topic", "x is not an update topic", 1)  # names no round
    assert rounds.round.rejected == {"bad-topic": 1}


def test_the_first_round_waits_until_no_new_device_came_online_for_settle_s() -> None:
    rounds = engine((), policy=RoundPolicy(min_devices=1, settle_s=2.0), open_round=False)
    rounds.observe_status(status("a"), NOW, NOW)
    assert rounds.ready(NOW) and not rounds.settled(NOW + 1.9)
    rounds.observe_status(status("b"), NOW - 50, NOW + 1.5)  # a retained status heard later
    assert not rounds.settled(NOW + 3.4) and rounds.settled(NOW + 3.5)
    rounds.observe_status(status("a"), NOW + 3.0, NOW + 3.0)  # a heartbeat is not a newcomer
    rounds.observe_status(status("z", bundle="c" * 64), NOW + 3.0, NOW + 3.0)  # not eligible
    assert rounds.settled(NOW + 3.5)


def test_open_round_names_the_run_the_heads_and_the_bundle() -> None:
    rounds = engine(("a",))
    assert rounds.round is not None
    assert (rounds.round.run_id, rounds.round.bundle_digest, rounds.round.head_digest) == (
        RUN, BUNDLE, HEAD_DIGEST,
    )  # fmt: skip
    assert rounds.round.announced == {"a": 10}
    assert head_digest(rounds.task_heads()) == HEAD_DIGEST


@pytest.mark.parametrize("forged", ["values", "samples"])
def test_one_forged_update_is_bounded_when_the_round_closes(forged: str) -> None:
    devices = ("a", "b", "c", "d")
    bound = AcceptancePolicy(influence_factor=10.0)
    rounds = engine(devices, policy=RoundPolicy(quorum=1.0), acceptance=bound)
    for index, device in enumerate(devices[:3]):
        rounds.receive(1, device, update(device=device, values=delta(0.1 + 0.01 * index)))
    if forged == "values":
        rounds.receive(1, "d", update(device="d", values=delta(1e30)))
    else:
        rounds.receive(1, "d", update(device="d", values=delta(-1.0), samples=10**15))
    closed = rounds.close_round()
    assert (closed.status, closed.accepted) == ("closed", 4)
    # 1e30 is clipped to 10x the median norm; 1e15 samples are capped to the 10 announced (the
    # -1 values are within 10x the median norm).
    expected = {"values": (1.0, 0.0), "samples": (0.0, 1.0)}[forged]
    assert (closed.metrics["clipped"], closed.metrics["capped"]) == expected
    moved = float(np.abs(rounds.heads["default"]["0.bias"]).max())
    # Weighted like the others, at most 10x the median norm (0.115 per value): the head moves
    # by at most (0.10 + 0.11 + 0.12 + 10 x 0.115) / 4 = 0.37 per value.
    assert moved <= 0.37 + 1e-6


def test_a_resumed_round_keeps_rejected_answers_and_refuses_another_head_version() -> None:
    restarted = engine(("a", "b"), open_round=False)
    config = RoundSettings().to_wire()
    rejected = [("a", "shape", "0.bias has shape [3]", "1" * 64), ("zz", "not-selected", "", "")]
    reopened = restarted.resume(1, {"a": "default", "b": "default"}, 0, config, [], NOW, rejected)
    assert reopened.answers == {"a": "shape"} and reopened.answered == {"a": "1" * 64}
    assert restarted.receive(1, "b", update(device="b")).complete
    with pytest.raises(ValueError, match="opened on head v3, the heads are v0"):
        restarted.resume(1, {"a": "default"}, 3, config, [], NOW)


def test_an_update_claiming_less_clip_or_noise_than_the_round_asked_is_refused() -> None:
    asked = RoundSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0))
    rounds = engine(("a", "b", "c", "d"), settings=asked)
    older = rounds.receive(1, "a", update(device="a"))  # a board that does not say
    weaker = rounds.receive(1, "b", update(device="b", clip=1.0, noise=0.5))
    looser = rounds.receive(1, "c", update(device="c", clip=5.0, noise=1.0))
    honest = rounds.receive(1, "d", update(device="d", clip=0.5, noise=1.0))  # stricter: fine
    assert [v.outcome for v in (older, weaker, looser, honest)] == [
        REJECTED, REJECTED, REJECTED, ACCEPTED,
    ]  # fmt: skip
    assert {older.code, weaker.code, looser.code} == {"privacy"}
    assert weaker.reason == ("update claims clip 1, noise x0.5; the round asked clip 1, noise x1")
    closed = rounds.close_round()
    assert closed.answers == {"a": "privacy", "b": "privacy", "c": "privacy", "d": ACCEPTED}
    assert closed.rejected == {"privacy": 3}


def test_a_device_without_samples_is_online_but_never_selected_until_it_has_some() -> None:
    rounds = engine(("a",), open_round=False)
    rounds.observe_status(status("fresh", samples=0), NOW)  # a board whose data folder is empty
    assert list(rounds.online_devices(NOW)) == ["a"]
    assert list(rounds.open_round(1, NOW).selected) == ["a"]
    rounds.close_round()
    rounds.observe_status(status("fresh", samples=3), NOW + 1)
    assert sorted(rounds.open_round(2, NOW + 1).selected) == ["a", "fresh"]


def test_readiness_and_settling_follow_devices_joining_and_leaving() -> None:
    rounds = engine(devices=(), policy=RoundPolicy(min_devices=2, settle_s=5.0), open_round=False)
    assert not rounds.ready(NOW)
    rounds.observe_status(status("a"), NOW, NOW)
    assert not rounds.ready(NOW)  # one of two
    rounds.observe_status(status("b"), NOW, NOW + 3)
    assert rounds.ready(NOW + 3) and not rounds.settled(NOW + 7)  # b joined at +3
    assert rounds.settled(NOW + 8)
    # b leaves: the last join still standing is a's, so the set settled long ago.
    rounds.observe_status(DeviceStatus("b", "offline", model_version=1, bundle_digest=BUNDLE),
                          NOW + 4, NOW + 4)  # fmt: skip
    assert not rounds.ready(NOW + 4) and rounds.settled(NOW + 5)


def test_a_late_will_of_an_earlier_connection_does_not_take_a_board_offline() -> None:
    rounds = engine(devices=(), open_round=False)
    rounds.observe_status(status("a", connected_at=200.0), NOW, NOW)  # reconnected at 200
    will = DeviceStatus("a", "offline", model_version=1, bundle_digest=BUNDLE)
    # The will of the connection opened at 100, re-sent by a bridge after the reconnect.
    rounds.observe_status(dataclasses.replace(will, connected_at=100.0), NOW + 1, NOW + 1)
    assert rounds.device_presence(NOW + 1) == {"a": "online"}
    # The current connection's will, and a will from a board that does not say, do count.
    rounds.observe_status(dataclasses.replace(will, connected_at=200.0), NOW + 2, NOW + 2)
    assert rounds.device_presence(NOW + 2) == {"a": "offline"}
    rounds.observe_status(status("a", connected_at=300.0), NOW + 3, NOW + 3)
    rounds.observe_status(will, NOW + 4, NOW + 4)
    assert rounds.device_presence(NOW + 4) == {"a": "offline"}
