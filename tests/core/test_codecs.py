"""Update codecs: round trips, sizes on the wire, error feedback, and hostile bytes."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from edgefl.core.codecs import CODEC_NAMES, ErrorFeedback, decode_delta, encode_delta
from edgefl.errors import MessageError
from edgefl.transport.messages import read_safetensors_metadata


def head_delta(in_features: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "0.weight": rng.normal(0, 0.01, (10, in_features)).astype(np.float32),
        "0.bias": rng.normal(0, 0.01, 10).astype(np.float32),
    }


def test_float32_is_exact_and_keeps_caller_metadata() -> None:
    delta = head_delta(64)
    decoded, meta = decode_delta(encode_delta(delta, metadata={"round": "3", "device": "pi-01"}))
    for key in delta:
        np.testing.assert_array_equal(decoded[key], delta[key])
    assert list(decoded) == list(delta)
    assert meta["codec"] == "float32" and meta["round"] == "3" and meta["device"] == "pi-01"
    assert json.loads(meta["shapes"]) == [["0.weight", [10, 64]], ["0.bias", [10]]]


def test_shapes_give_the_payload_order_explicitly() -> None:
    # The same tensors listed in another order decode in that order: the list, not a JSON
    # object's key order, says which scale and which values belong to which tensor.
    payload = np.array([0.5, 2.0], "<f4").tobytes() + np.array([1, 2, 3], np.int8).tobytes()
    data = np.frombuffer(payload, np.uint8)
    decoded, _ = decode_delta(blob("int8", '[["b",[1]],["a",[2]]]', data))
    assert list(decoded) == ["b", "a"]
    np.testing.assert_array_equal(decoded["b"], [0.5])
    np.testing.assert_array_equal(decoded["a"], [4.0, 6.0])


def test_the_first_shapes_form_still_decodes() -> None:
    # Version 1 wrote "shapes" as an object in key order; such updates are still read.
    delta = head_delta(4)
    payload = encode_delta(delta, "int8")
    arrays, meta = load(payload), read_safetensors_metadata(payload)
    meta["shapes"] = json.dumps({key: list(value.shape) for key, value in delta.items()})
    decoded, _ = decode_delta(save(arrays, metadata=meta))
    expected, _ = decode_delta(payload)
    assert list(decoded) == list(expected)
    for key in delta:
        np.testing.assert_array_equal(decoded[key], expected[key])


def test_int8_error_is_at_most_half_a_quantization_step() -> None:
    delta = head_delta(64)
    decoded, meta = decode_delta(encode_delta(delta, "int8"))
    assert meta["codec"] == "int8"
    for key, value in delta.items():
        step = np.abs(value).max() / 127
        assert np.abs(decoded[key] - value).max() <= step / 2 + 1e-9
        assert decoded[key].shape == value.shape


def test_topk_keeps_the_largest_entries_of_each_tensor() -> None:
    delta = {"a": np.array([[0.1, -5.0, 0.2, 3.0]], np.float32), "b": np.array([0.5, -0.7])}
    decoded, _ = decode_delta(encode_delta(delta, "topk", topk_fraction=0.5))
    np.testing.assert_array_equal(decoded["a"], [[0.0, -5.0, 0.0, 3.0]])
    np.testing.assert_allclose(decoded["b"], [0.0, -0.7], rtol=1e-3)  # float16 values
    # At least one entry per tensor, even when 1% of it rounds to zero.
    tiny, _ = decode_delta(encode_delta(delta, "topk", topk_fraction=0.01))
    assert np.count_nonzero(tiny["a"]) == 1 and np.count_nonzero(tiny["b"]) == 1


@pytest.mark.parametrize("in_features", [64, 1280])
def test_bytes_on_the_wire_shrink(in_features: int) -> None:
    delta = head_delta(in_features)
    sizes = {codec: len(encode_delta(delta, codec)) for codec in CODEC_NAMES}
    # Data bytes alone give 0.25x and 0.015x; safetensors' JSON header (~140 bytes) is what is
    # left, and it weighs most on the 64x10 head (see benchmarks/RESULTS.md).
    limits = {64: (0.29, 0.07), 1280: (0.26, 0.02)}[in_features]
    assert sizes["int8"] <= limits[0] * sizes["float32"]
    assert sizes["topk"] <= limits[1] * sizes["float32"]


def test_error_feedback_delivers_what_topk_dropped() -> None:
    delta = {"w": np.array([1.0, 0.6, 0.3], np.float32)}
    feedback = ErrorFeedback()
    sent = np.zeros(3, np.float32)
    for _ in range(3):
        decoded, _ = decode_delta(encode_delta(delta, "topk", feedback=feedback, topk_fraction=0.3))
        sent += decoded["w"]
    # Three rounds sent three updates' worth in total; what is still owed stays in the residual.
    np.testing.assert_allclose(sent + feedback.residuals["w"], 3 * delta["w"], rtol=1e-3)
    assert np.count_nonzero(sent) >= 2  # the smaller entries did get through
    without = sum(
        decode_delta(encode_delta(delta, "topk", topk_fraction=0.3))[0]["w"] for _ in range(3)
    )
    assert np.count_nonzero(without) == 1


def test_error_feedback_state_survives_a_restart() -> None:
    delta = head_delta(64)
    first = ErrorFeedback()
    encode_delta(delta, "topk", feedback=first)
    second = ErrorFeedback()
    second.load_state_dict(first.state_dict())
    after_first, _ = decode_delta(encode_delta(delta, "topk", feedback=first))
    after_second, _ = decode_delta(encode_delta(delta, "topk", feedback=second))
    for key in delta:
        np.testing.assert_array_equal(after_first[key], after_second[key])
    assert np.count_nonzero(first.residuals["0.weight"]) > 600  # a residual was really restored


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown codec 'gzip'"):
        encode_delta(head_delta(4), "gzip")
    with pytest.raises(ValueError, match="reserved"):
        encode_delta(head_delta(4), metadata={"codec": "int8"})
    with pytest.raises(ValueError, match="topk_fraction"):
        encode_delta(head_delta(4), "topk", topk_fraction=0.0)


def blob(codec: str, shapes: str, data: np.ndarray, **arrays: np.ndarray) -> bytes:
    return save({"d": data, **arrays}, metadata={"codec": codec, "shapes": shapes})


HOSTILE = {
    "empty": b"",
    "garbage": b"\x00\x01garbage" * 10,
    "huge header length": (10**12).to_bytes(8, "little") + b"{}",
    "json but no tensors": len(b"[1,2]").to_bytes(8, "little") + b"[1,2]",
    "no metadata": save({"d": np.zeros(3, np.uint8)}),
    "unknown codec": blob("zip", "{}", np.zeros(3, np.uint8)),
    "shapes not json": blob("int8", "{not json", np.zeros(3, np.uint8)),
    "negative dim": blob("int8", '{"a":[-1]}', np.zeros(3, np.uint8)),
    "float dim": blob("int8", '{"a":[1.5]}', np.zeros(3, np.uint8)),
    "shapes a number": blob("int8", "7", np.zeros(5, np.uint8)),
    "shapes pair too long": blob("int8", '[["a",[1],0]]', np.zeros(5, np.uint8)),
    "shapes name not a string": blob("int8", "[[1,[1]]]", np.zeros(5, np.uint8)),
    "shapes name twice": blob("int8", '[["a",[1]],["a",[1]]]', np.zeros(10, np.uint8)),
    "int8 too short": blob("int8", '{"a":[10]}', np.zeros(12, np.uint8)),
    "topk index out of range": blob(
        "topk", '{"a":[2]}', np.frombuffer(np.array([3], "<i4").tobytes() + bytes(2), np.uint8)
    ),
    "topk negative index": blob(
        "topk", '{"a":[2]}', np.frombuffer(np.array([-1], "<i4").tobytes() + bytes(2), np.uint8)
    ),
    "topk ragged": blob("topk", '{"a":[4]}', np.zeros(7, np.uint8)),
    "topk duplicate index": blob(
        "topk", '{"a":[4]}', np.frombuffer(np.array([1, 1], "<i4").tobytes() + bytes(4), np.uint8)
    ),
    "gigantic shape": blob("topk", '{"a":[100000,100000,100000]}', np.zeros(6, np.uint8)),
    "float32 wrong shape": save(
        {"a": np.zeros(3, np.float32)}, metadata={"codec": "float32", "shapes": '{"a":[4]}'}
    ),
    "float32 wrong dtype": save(
        {"a": np.zeros(4, np.float64)}, metadata={"codec": "float32", "shapes": '{"a":[4]}'}
    ),
    "extra array": blob("int8", '{"a":[1]}', np.zeros(5, np.uint8), e=np.zeros(1, np.uint8)),
    "wrong blob dtype": save(
        {"d": np.zeros(5, np.int8)}, metadata={"codec": "int8", "shapes": '{"a":[1]}'}
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_bytes_raise_message_error_only(name: str) -> None:
    with pytest.raises(MessageError):
        decode_delta(HOSTILE[name])


def test_random_bytes_never_raise_anything_but_message_error() -> None:
    rng = np.random.default_rng(0)
    valid = encode_delta(head_delta(8), "topk", topk_fraction=0.2)
    for _ in range(300):
        corrupt = bytearray(valid)
        for position in rng.integers(0, len(corrupt), 3):
            corrupt[position] = int(rng.integers(0, 256))
        with contextlib.suppress(MessageError):
            decode_delta(bytes(corrupt))


def test_handmade_payloads_of_the_documented_layout_decode() -> None:
    # The hostile cases above differ from these valid ones in one detail each.
    topk = np.array([3], "<i4").tobytes() + np.array([2.5], "<f2").tobytes()
    decoded, _ = decode_delta(blob("topk", '{"a":[4]}', np.frombuffer(topk, np.uint8)))
    np.testing.assert_array_equal(decoded["a"], [0.0, 0.0, 0.0, 2.5])
    int8 = np.array([0.5], "<f4").tobytes() + np.array([-2, 4], np.int8).tobytes()
    decoded, _ = decode_delta(blob("int8", '{"a":[2]}', np.frombuffer(int8, np.uint8)))
    np.testing.assert_array_equal(decoded["a"], [-1.0, 2.0])
