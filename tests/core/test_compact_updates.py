"""The compact update frame: its bytes, and the round engines reading it beside safetensors."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np
import pytest

from edgefl.core.codecs import ErrorFeedback, encode_payload
from edgefl.core.local_round import encode_update
from edgefl.core.rounds import ACCEPTED, REJECTED, RoundEngine
from edgefl.core.settings import PrivacySettings, RoundSettings
from edgefl.core.strategies import build_strategies
from edgefl.errors import MessageError
from edgefl.head import Weights, head_digest
from edgefl.security.update_mac import mac_open, mac_seal
from edgefl.transport.messages import DeviceStatus, UpdateHeader
from edgefl.transport.update_frame import (
    COMPACT_FRAME,
    encode_compact,
    is_compact,
    read_compact,
    task_ref,
)

NOW = 1_000_000.0
RUN, BUNDLE = "run-1", "b" * 64
# A 64x10 head: the size the wire targets are stated for.
HEAD = {"0.weight": np.zeros((10, 64), np.float32), "0.bias": np.zeros(10, np.float32)}
HEAD_DIGEST = head_digest({"default": HEAD})
METRICS = {"loss": 0.71234, "global_accuracy": 0.5, "personal_accuracy": 0.75,
           "train_seconds": 0.01}  # fmt: skip


def sample_delta(seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {key: rng.normal(0, 0.01, value.shape).astype(np.float32) for key, value in HEAD.items()}


def header(number: int = 1, device: str = "a", **changes: object) -> UpdateHeader:
    values: dict[str, object] = dict(
        round=number, device_id=device, task="default", samples=10, head_version=0,
        metrics=dict(METRICS), run_id=RUN, head_digest=HEAD_DIGEST, bundle_digest=BUNDLE,
    )  # fmt: skip
    values.update(changes)
    return UpdateHeader(**values)  # type: ignore[arg-type]


def engine(privacy: PrivacySettings | None = None) -> RoundEngine:
    heads = {"default": {key: value.copy() for key, value in HEAD.items()}}
    settings = RoundSettings(privacy=privacy) if privacy is not None else None
    built = build_strategies("fedavg", {}, heads)
    result = RoundEngine(heads, 0, built, BUNDLE, settings=settings, run_id=RUN)
    for device in ("a", "b"):
        result.observe_status(DeviceStatus(device, "online", samples=10, model_version=1,
                                           bundle_digest=BUNDLE), NOW)  # fmt: skip
    result.open_round(1, NOW)
    return result


# -- the frame's bytes --


def test_a_64x10_update_meets_the_wire_targets_with_and_without_its_mac() -> None:
    delta = sample_delta()
    sizes = {
        codec: len(encode_update(header(), delta, codec, COMPACT_FRAME, feedback=ErrorFeedback()))
        for codec in ("float32", "int8", "topk")
    }
    key, topic = bytes(32), "edgefl/v1/f/rounds/1/update/a"
    macd = {codec: size + 4 + 16 for codec, size in sizes.items()}  # EFM2: magic + 16-byte tag
    for table in (sizes, macd):
        assert table["int8"] / table["float32"] <= 0.27
        assert table["topk"] / table["float32"] <= 0.05
    # The header is 34 bytes with the four usual metrics (18 + 4 per metric).
    assert sizes["float32"] == 34 + 4 * 650
    sealed = mac_seal(key, topic, encode_update(header(), delta, "int8", COMPACT_FRAME))
    assert len(sealed) == macd["int8"] and sealed[:4] == b"EFM2"
    assert is_compact(mac_open(key, topic, sealed))
    # The safetensors form of the same update is what an old aggregator gets, 3.5x larger.
    legacy = encode_update(header(), delta, "int8", 0)
    assert not is_compact(legacy) and len(legacy) > 1.9 * sizes["int8"]


def test_fields_survive_the_round_trip_with_metrics_as_float32() -> None:
    ref = task_ref(RUN, 3, "default", HEAD_DIGEST, 2, BUNDLE)
    data = encode_compact("topk", ref, 420, b"\x01" * 12, METRICS, clip_norm=0.5,
                          noise_multiplier=1.25)  # fmt: skip
    read = read_compact(data)
    assert (read.codec, read.ref, read.samples, read.clip_norm, read.noise_multiplier) == (
        "topk", ref, 420, 0.5, 1.25)  # fmt: skip
    assert read.metrics == {name: float(np.float32(value)) for name, value in METRICS.items()}
    assert read.metrics["loss"] == pytest.approx(0.71234, rel=1e-7)
    assert data[read.body_offset :] == b"\x01" * 12
    assert task_ref(RUN, 3, "default", HEAD_DIGEST, 2, BUNDLE) == ref
    assert task_ref(RUN, 4, "default", HEAD_DIGEST, 2, BUNDLE) != ref


def test_an_update_with_a_metric_the_frame_has_no_slot_for_goes_as_safetensors() -> None:
    data = encode_update(header(metrics={"loss": 1.0, "custom": 2.0}), sample_delta(), "int8",
                         COMPACT_FRAME)  # fmt: skip
    assert not is_compact(data)


HOSTILE = [
    (b"EFU1\x00", "18-byte header"),
    (b"EFU1\x08" + bytes(13), "reserved bits"),
    (b"EFU1\x03" + bytes(13), "reserved bits"),
    (b"EFU1\x00" + bytes(12) + b"\x40", "reserved bits"),
    (b"EFU1\x00" + bytes(12) + b"\x01", "shorter than its header"),
    (b"EFU1\x00" + bytes(12) + b"\x01" + struct.pack("<f", float("nan")), "non-finite metric"),
    (b"EFU1\x04" + bytes(13) + struct.pack("<ff", -1.0, 0.0), "norm must be positive"),
    (b"EFU1\x04" + bytes(13) + struct.pack("<f", 1.0), "shorter than its header"),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE)
def test_hostile_frames_raise_a_message_error_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message):
        read_compact(data)


# -- the engine reads both forms --


def test_compact_and_safetensors_updates_aggregate_to_the_same_head() -> None:
    results = []
    for frame in (0, COMPACT_FRAME):
        rounds = engine()
        for device, seed in (("a", 1), ("b", 2)):
            data = encode_update(header(device=device), sample_delta(seed), "float32", frame)
            assert rounds.receive(1, device, data).outcome == ACCEPTED
        rounds.close_round()
        results.append(rounds.heads["default"])
    for key in HEAD:
        np.testing.assert_array_equal(results[0][key], results[1][key])


REF_CASES = [
    ("another run", {"run_id": "run-0"}),
    ("another head", {"head_version": 7}),
    ("another bundle", {"bundle_digest": "c" * 64}),
    ("another task", {"task": "other"}),
    ("another round's answer on this round's topic", {"round": 2}),
]


@pytest.mark.parametrize(("case", "changes"), REF_CASES)
def test_a_compact_update_answering_another_task_is_refused_as_ref_mismatch(
    case: str, changes: dict[str, object]
) -> None:
    data = encode_update(header(**changes), sample_delta(), "int8", COMPACT_FRAME)
    verdict = engine().receive(1, "a", data)
    assert (verdict.outcome, verdict.code) == (REJECTED, "ref-mismatch"), case
    assert "another run, round, task, head or bundle" in verdict.reason


def test_a_compact_update_must_claim_the_privacy_the_round_asked() -> None:
    rounds = engine(PrivacySettings(clip_norm=1.0, noise_multiplier=0.5))
    weak = encode_update(header(clip_norm=1.0, noise_multiplier=0.1), sample_delta(), "int8",
                         COMPACT_FRAME)  # fmt: skip
    assert rounds.receive(1, "a", weak).code == "privacy"
    ok = encode_update(header(device="b", clip_norm=1.0, noise_multiplier=0.5), sample_delta(),
                       "int8", COMPACT_FRAME)  # fmt: skip
    assert rounds.receive(1, "b", ok).outcome == ACCEPTED


def test_a_compact_body_that_does_not_fit_the_head_is_malformed() -> None:
    ref = task_ref(RUN, 1, "default", HEAD_DIGEST, 0, BUNDLE)
    short = encode_compact("float32", ref, 10, bytes(4 * 649))
    verdict = engine().receive(1, "a", short)
    assert (verdict.code, verdict.reason) == (
        "malformed", "float32 update holds 2596 bytes, its shapes need 2600")  # fmt: skip
    nan = encode_compact("float32", ref, 10, encode_payload({"0.bias": np.full(10, np.nan),
                                                             "0.weight": np.zeros((10, 64))},
                                                            "float32"))  # fmt: skip
    assert engine().receive(1, "a", nan).code == "non-finite"


@dataclass
class Stored:
    device_id: str
    samples: int
    sha256: str
    payload: bytes
    metrics: dict[str, float] = field(default_factory=dict)


def test_a_resumed_round_decodes_its_stored_compact_updates_with_the_head() -> None:
    data = encode_update(header(), sample_delta(3), "int8", COMPACT_FRAME)
    first = engine()
    first.receive(1, "a", data)
    restarted = engine()
    restarted.round = None
    stored = [Stored("a", 10, hashlib.sha256(data).hexdigest(), data)]
    reopened = restarted.resume(1, {"a": "default", "b": "default"}, 0,
                                RoundSettings().to_wire(), stored, NOW)  # fmt: skip
    for key in HEAD:
        np.testing.assert_array_equal(reopened.accepted["a"].delta[key],
                                      first.round.accepted["a"].delta[key])  # type: ignore[union-attr]  # fmt: skip
