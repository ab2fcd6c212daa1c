"""The board's answer to a task, without a broker: decode the bytes it returns and check numbers."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from edgefl.core.board_limits import BoardLimits, bound_training
from edgefl.core.codecs import ErrorFeedback, decode_delta
from edgefl.core.local_round import (
    MAX_REASON_CHARS,
    BoardSettings,
    LocalData,
    LocalRound,
    error_update,
    read_round_settings,
    run_local_round,
    task_key,
)
from edgefl.core.personal_head import judging_split
from edgefl.core.privacy import add_gaussian_noise, clip_by_norm, global_norm
from edgefl.core.settings import (
    CodecSettings,
    PrivacySettings,
    RoundSettings,
    TrainConfig,
)
from edgefl.core.training import train_head
from edgefl.head import Weights, head_accuracy, head_digest, init_head
from edgefl.transport.messages import RoundTask, UpdateHeader, read_update_header

LAYERS: list[dict[str, Any]] = [{"kind": "linear", "in": 8, "out": 3}]
BOARD = BoardSettings(device_id="pi-7")


@pytest.fixture(scope="module")
def data() -> LocalData:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((60, 8)).astype(np.float32)
    labels = (features @ rng.standard_normal((8, 3))).argmax(axis=1).astype(np.int64)
    return LocalData(features, labels)


@pytest.fixture(scope="module")
def head() -> Weights:
    return init_head(LAYERS, seed=3)


def _task(settings: RoundSettings | dict[str, Any] | None = None, **fields: Any) -> RoundTask:
    config = settings.to_wire() if isinstance(settings, RoundSettings) else settings
    values: dict[str, Any] = dict(
        round=3, selected=["pi-7"], tasks=["default"], head_version=2, model_version=1,
        deadline_s=30.0, config=RoundSettings().to_wire() if config is None else config,
    )  # fmt: skip
    values.update(fields)
    return RoundTask(**values)


def _settings(**parts: Any) -> RoundSettings:
    return RoundSettings(
        train=TrainConfig(**parts.get("train", {"epochs": 2, "lr": 0.5, "seed": 11})),
        privacy=PrivacySettings(**parts.get("privacy", {})),
        codec=CodecSettings(**parts.get("codec", {})),
    )


def _run(
    task: RoundTask,
    head: Weights,
    data: LocalData | None,
    board: BoardSettings = BOARD,
    feedback: ErrorFeedback | None = None,
    layers: list[dict[str, Any]] | None = LAYERS,
    noise_seed: int = 0,
) -> LocalRound:
    clock = itertools.count(100.0, 0.25).__next__  # each reading 0.25 s after the last
    return run_local_round(
        task, {"default": head}, data, layers, 1, board, feedback or ErrorFeedback(),
        clock=clock, noise_rng=np.random.default_rng(noise_seed),
    )  # fmt: skip


def _trained(head: Weights, data: LocalData, settings: RoundSettings, round_: int) -> Weights:
    """What the board should have trained: the round's settings, the seed moved by the round."""
    train = dataclasses.replace(settings.train, seed=settings.train.seed + round_)
    return train_head(LAYERS, head, data.features, data.labels, train).weights


def test_the_update_is_the_trained_head_minus_the_global_one(
    data: LocalData, head: Weights
) -> None:
    settings = _settings()
    result = _run(_task(settings), head, data)
    trained = _trained(head, data, settings, round_=3)
    delta, _ = decode_delta(result.payload)
    assert delta.keys() == head.keys()
    for key in head:
        np.testing.assert_array_equal(delta[key], trained[key] - head[key])
        np.testing.assert_array_equal(result.trained[key], trained[key])  # type: ignore[index]
    header = read_update_header(result.payload)
    assert (header.round, header.device_id, header.task, header.status) == (
        3,
        "pi-7",
        "default",
        "ok",
    )
    assert (header.samples, header.head_version, header.model_version) == (60, 2, 1)
    # From the clock passed in: read at the start, before each of 2 x 4 steps, and at the end.
    assert header.metrics["train_seconds"] == 0.25 * 9
    assert "limited" not in header.metrics
    assert header.metrics["personal_accuracy"] > header.metrics["global_accuracy"]
    assert (result.outcome.status, result.outcome.bytes_sent) == ("ok", len(result.payload))
    assert result.outcome.metrics == header.metrics


def test_the_training_seed_moves_with_the_round_and_a_round_replays_identically(
    data: LocalData, head: Weights
) -> None:
    settings = _settings(train={"epochs": 1, "lr": 0.5, "batch_size": 4, "seed": 11})
    first = _run(_task(settings, round=4), head, data)
    again = _run(_task(settings, round=4), head, data)
    later = _run(_task(settings, round=5), head, data)
    for key in head:
        np.testing.assert_array_equal(
            decode_delta(first.payload)[0][key], decode_delta(again.payload)[0][key]
        )
    assert decode_delta(first.payload)[0]["0.weight"].tolist() != (
        decode_delta(later.payload)[0]["0.weight"].tolist()
    )
    expected = _trained(head, data, settings, round_=5)
    np.testing.assert_array_equal(later.trained["0.weight"], expected["0.weight"])  # type: ignore[index]


@pytest.mark.parametrize(
    ("board_clip", "round_clip", "expected"),
    [(None, 0.05, 0.05), (0.02, 0.05, 0.02), (0.5, 0.05, 0.05), (0.03, None, 0.03)],
)
def test_the_delta_is_clipped_to_the_tighter_of_the_board_and_the_round(
    data: LocalData,
    head: Weights,
    board_clip: float | None,
    round_clip: float | None,
    expected: float,
) -> None:
    free = decode_delta(_run(_task(_settings()), head, data).payload)[0]
    assert global_norm(free) > 0.5  # so every bound below binds
    board = dataclasses.replace(BOARD, privacy=PrivacySettings(clip_norm=board_clip))
    task = _task(_settings(privacy={"clip_norm": round_clip}))
    payload = _run(task, head, data, board).payload
    delta = decode_delta(payload)[0]
    assert global_norm(delta) == pytest.approx(expected, rel=1e-5)
    header = read_update_header(payload)  # the update says what the board applied
    assert (header.clip_norm, header.noise_multiplier) == (expected, 0.0)
    for key in free:  # the direction is kept
        np.testing.assert_allclose(delta[key], free[key] * expected / global_norm(free), atol=1e-6)


@pytest.mark.parametrize(("board_noise", "round_noise"), [(0.0, 2.0), (3.0, 2.0), (3.0, 0.0)])
def test_noise_is_the_larger_multiplier_times_the_clip_norm(
    data: LocalData, head: Weights, board_noise: float, round_noise: float
) -> None:
    free = decode_delta(_run(_task(_settings()), head, data).payload)[0]
    board = dataclasses.replace(BOARD, privacy=PrivacySettings(noise_multiplier=board_noise))
    task = _task(_settings(privacy={"clip_norm": 0.1, "noise_multiplier": round_noise}))
    payload = _run(task, head, data, board, noise_seed=9).payload
    delta = decode_delta(payload)[0]
    header = read_update_header(payload)
    assert (header.clip_norm, header.noise_multiplier) == (0.1, max(board_noise, round_noise))
    std = max(board_noise, round_noise) * 0.1
    expected = add_gaussian_noise(clip_by_norm(free, 0.1), std, np.random.default_rng(9))
    for key in free:
        np.testing.assert_allclose(delta[key], expected[key], rtol=1e-5, atol=1e-6)


def test_noise_without_any_clip_norm_is_an_error_update(data: LocalData, head: Weights) -> None:
    board = dataclasses.replace(BOARD, privacy=PrivacySettings(noise_multiplier=1.0))
    result = _run(_task(_settings()), head, data, board)
    header = read_update_header(result.payload)
    assert (header.status, header.error_code) == ("error", "train-failed")
    assert "clip_norm" in header.reason and result.trained is None


def test_int8_updates_carry_error_feedback_into_the_next_round(
    data: LocalData, head: Weights
) -> None:
    settings = _settings(codec={"codec": "int8"})
    feedback = ErrorFeedback()
    result = _run(_task(settings), head, data, feedback=feedback)
    delta, meta = decode_delta(result.payload)
    trained = _trained(head, data, settings, round_=3)
    exact = {key: trained[key] - head[key] for key in head}
    assert meta["codec"] == "int8"
    for key in head:
        scale = float(np.abs(exact[key]).max()) / 127
        np.testing.assert_allclose(delta[key], exact[key], atol=scale)
        # What int8 lost this round is what the board adds to the next one.
        np.testing.assert_allclose(feedback.residuals[key], exact[key] - delta[key], atol=1e-7)
    assert any(np.abs(r).max() > 0 for r in feedback.residuals.values())


def test_topk_keeps_the_rounds_fraction_and_a_board_can_force_its_codec(
    data: LocalData, head: Weights
) -> None:
    task = _task(_settings(codec={"codec": "topk", "topk_fraction": 0.25}))
    delta, meta = decode_delta(_run(task, head, data).payload)
    size = sum(v.size for v in head.values())
    assert meta["codec"] == "topk"
    assert sum(int(np.count_nonzero(v)) for v in delta.values()) == round(0.25 * size)

    forced = dataclasses.replace(BOARD, codec="float32")
    delta, meta = decode_delta(_run(task, head, data, forced).payload)
    assert meta["codec"] == "float32"
    assert sum(int(np.count_nonzero(v)) for v in delta.values()) == size


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ({"layers": None}, "no-bundle", "no bundle"),
        ({"task": {"model_version": 4}}, "model-version", "bundle v4, device runs v1"),
        ({"board": dataclasses.replace(BOARD, task="faces")}, "no-head", "'faces'"),
        ({"data": None}, "no-data", "no labelled samples"),
        ({"data": LocalData(np.zeros((0, 8), np.float32), np.zeros(0, np.int64))}, "no-data", ""),
        ({"data": LocalData(np.zeros((5, 7), np.float32), np.zeros(5, np.int64))},
         "train-failed", "ValueError"),
        ({"task": {"config": {"schema_version": 2}}}, "train-failed", "schema_version 2"),
        ({"task": {"config": {"schema_version": 1, "train": {"lr": "fast"}}}},
         "train-failed", "lr must be a number"),
    ],
)  # fmt: skip
def test_each_failure_becomes_an_error_update(
    data: LocalData, head: Weights, change: dict[str, Any], code: str, says: str
) -> None:
    feedback = ErrorFeedback()
    result = _run(
        _task(**change.get("task", {})),
        head,
        change.get("data", data),
        change.get("board", BOARD),
        feedback,
        layers=change.get("layers", LAYERS),
    )
    header = read_update_header(result.payload)
    assert (header.status, header.error_code, header.samples) == ("error", code, 0)
    assert (header.round, header.device_id, header.head_version) == (3, "pi-7", 2)
    assert says in header.reason and says in result.reason
    assert (result.outcome.status, result.outcome.error_code) == ("error", code)
    assert result.trained is None and feedback.residuals == {}
    assert load_safetensors(result.payload) == {}  # no tensors, only the header


def test_an_error_reason_is_one_bounded_line(head: Weights) -> None:
    result = error_update(_task(), BOARD, 1, "train-failed", "x" * 5000)
    header: UpdateHeader = read_update_header(result.payload)
    assert len(header.reason) == MAX_REASON_CHARS


def test_a_board_that_does_not_personalize_returns_no_trained_head(
    data: LocalData, head: Weights
) -> None:
    board = dataclasses.replace(BOARD, personalize=False)
    result = _run(_task(_settings()), head, data, board)
    assert result.outcome.status == "ok" and result.trained is None


def test_task_settings_ignore_unknown_fields_and_read_the_flat_form_of_older_servers() -> None:
    wire = _settings(codec={"codec": "int8"}).to_wire()
    wire["train"]["momentum"] = 0.9  # a newer server's field
    wire["sampling"] = {"kind": "poisson"}
    assert read_round_settings(wire) == _settings(codec={"codec": "int8"})
    flat = {"epochs": 2, "lr": 0.5, "seed": 11, "codec": "int8", "clip_norm": 0.3, "extra": 1}
    assert read_round_settings(flat) == _settings(
        privacy={"clip_norm": 0.3}, codec={"codec": "int8"}
    )
    assert read_round_settings({}) == RoundSettings()


# -- identity: what the task names, the update echoes; a task for other heads or another bundle


def _named(heads: dict[str, Weights], **fields: Any) -> RoundTask:
    values = {"run_id": "run-b", "head_digest": head_digest(heads), "bundle_digest": "b" * 64}
    values.update(fields)
    return _task(_settings(), **values)


@pytest.mark.parametrize("failing", [False, True])
def test_an_update_echoes_the_tasks_run_head_and_bundle(
    data: LocalData, head: Weights, failing: bool
) -> None:
    task = _named({"default": head})
    result = run_local_round(
        task, {"default": head}, None if failing else data, LAYERS, 1, BOARD, ErrorFeedback(),
        clock=itertools.count().__next__, noise_rng=np.random.default_rng(0),
        bundle_digest="b" * 64,
    )  # fmt: skip
    header = read_update_header(result.payload)
    assert header.status == ("error" if failing else "ok")
    assert (header.run_id, header.head_digest, header.bundle_digest) == (
        "run-b",
        head_digest({"default": head}),
        "b" * 64,
    )
    assert result.outcome.run_id == "run-b"


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({"head_digest": "0" * 64}, "head-digest", "do not hash"),
        ({"bundle_digest": "c" * 64}, "bundle-digest", "bundle cccccccccccc, device runs bbbb"),
    ],
)
def test_a_task_naming_other_heads_or_another_bundle_is_an_error_update(
    data: LocalData, head: Weights, fields: dict[str, str], code: str, says: str
) -> None:
    task = _named({"default": head}, **fields)
    result = run_local_round(
        task, {"default": head}, data, LAYERS, 1, BOARD, ErrorFeedback(),
        clock=itertools.count().__next__, noise_rng=np.random.default_rng(0),
        bundle_digest="b" * 64,
    )  # fmt: skip
    header = read_update_header(result.payload)
    assert (header.status, header.error_code, header.run_id) == ("error", code, "run-b")
    assert says in header.reason and result.trained is None


def test_a_task_with_empty_digests_from_an_older_aggregator_is_answered(
    data: LocalData, head: Weights
) -> None:
    result = run_local_round(
        _task(_settings()), {"default": head}, data, LAYERS, 1, BOARD, ErrorFeedback(),
        clock=itertools.count().__next__, noise_rng=np.random.default_rng(0),
        bundle_digest="b" * 64,
    )  # fmt: skip
    header = read_update_header(result.payload)
    assert (header.status, header.run_id, header.head_digest) == ("ok", "", "")


def test_a_task_is_named_by_run_round_heads_and_bundle_not_by_round_alone(head: Weights) -> None:
    heads = {"default": head}
    first = task_key(_named(heads, run_id="run-a"), heads)
    assert first == task_key(_named(heads, run_id="run-a"), heads)
    assert first != task_key(_named(heads, run_id="run-b"), heads)
    other = {"default": {k: v + 1 for k, v in head.items()}}
    assert first != task_key(_named(other, run_id="run-a"), other)
    # An older aggregator names no heads: their own digest tells two such tasks apart.
    assert task_key(_task(), heads) != task_key(_task(), other)
    assert task_key(_task(), heads)[2] == head_digest(heads)


# -- limits: a round's settings are clamped to the board's, and training stops at its budget


def test_settings_beyond_the_boards_limits_are_clamped_and_reported(
    data: LocalData, head: Weights
) -> None:
    limits = BoardLimits(max_epochs=3, max_batch_size=8, max_lr=0.2, round_budget_s=1e9)
    board = dataclasses.replace(BOARD, limits=limits)
    asked = _settings(train={"epochs": 30000, "lr": 50.0, "batch_size": 4096, "seed": 11})
    result = _run(_task(asked), head, data, board)
    header = read_update_header(result.payload)
    assert header.status == "ok"
    assert (header.metrics["limited"], header.metrics["steps"]) == (1.0, 3 * 8)  # 60 / 8: 8 steps
    assert result.limited == ["epochs 30000 -> 3", "batch_size 4096 -> 8", "lr 50.0 -> 0.2"]
    allowed = _settings(train={"epochs": 3, "lr": 0.2, "batch_size": 8, "seed": 11})
    expected = _trained(head, data, allowed, round_=3)
    delta = decode_delta(result.payload)[0]
    for key in head:
        np.testing.assert_allclose(delta[key], expected[key] - head[key], atol=1e-6)


def test_training_stops_at_the_time_budget_and_the_update_holds_what_ran(
    data: LocalData, head: Weights
) -> None:
    # The clock advances 0.25 s per reading: start, then one reading before each step.
    board = dataclasses.replace(BOARD, limits=BoardLimits(max_epochs=1000, round_budget_s=1.0))
    asked = _settings(train={"epochs": 1000, "lr": 0.5, "batch_size": 16, "seed": 11})
    result = _run(_task(asked), head, data, board)
    header = read_update_header(result.payload)
    assert header.status == "ok" and header.metrics["steps"] == 4.0  # at 0.25 .. 1.0 s
    assert result.limited == ["stopped at the 1 s budget after 1 epochs"]
    assert global_norm(decode_delta(result.payload)[0]) > 0


def test_bound_training_leaves_settings_within_the_limits_alone() -> None:
    train = TrainConfig(epochs=2, lr=0.1, batch_size=16)
    assert bound_training(train, BoardLimits()) == (train, [])
    with pytest.raises(ValueError, match="max_lr"):
        BoardLimits(max_lr=0).check()


# -- the personal head: replaced only when the new one is not worse on held-out samples


def test_the_held_out_share_is_fixed_disjoint_and_a_fifth() -> None:
    fit, held = judging_split(60)
    assert (len(fit), len(held)) == (48, 12)
    assert sorted([*fit, *held]) == list(range(60))
    again_fit, again_held = judging_split(60)
    assert held.tolist() == again_held.tolist() and fit.tolist() == again_fit.tolist()
    assert judging_split(4)[1].size == 0  # too few samples to hold any out


def test_a_round_with_zero_epochs_does_not_replace_a_good_personal_head(
    data: LocalData, head: Weights
) -> None:
    good = _run(_task(_settings(train={"epochs": 30, "lr": 0.5})), head, data).trained
    assert good is not None
    _, held = judging_split(len(data.labels))
    good_accuracy = head_accuracy(LAYERS, good, data.features[held], data.labels[held])
    assert good_accuracy > head_accuracy(LAYERS, head, data.features[held], data.labels[held])

    def answer(epochs: int, personal: Weights | None) -> LocalRound:
        return run_local_round(
            _task(_settings(train={"epochs": epochs, "lr": 0.5})), {"default": head}, data,
            LAYERS, 1, BOARD, ErrorFeedback(), clock=itertools.count().__next__,
            noise_rng=np.random.default_rng(0), personal=personal,
        )  # fmt: skip

    assert answer(0, personal=good).trained is None  # the global head is worse: kept
    assert answer(0, personal=None).trained is not None  # nothing better to keep
    better = answer(30, personal=head)  # an untrained personal head gives way
    assert better.trained is not None
    assert read_update_header(answer(0, personal=good).payload).status == "ok"
