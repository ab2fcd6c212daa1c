"""Write the protocol's conformance vectors (docs/protocol.md, "Conformance vectors").

Each case is `{name}.bin`, the exact bytes as published, beside `{name}.json`, what a reader
must make of them: the decoded message with every default filled in, or `"refused"` with the
error this implementation gives. Everything is fixed (seeds, times, a key made for the vectors
from a constant), so running this twice writes the same files:

    .venv/bin/python tests/vectors/generate.py          # rewrite tests/vectors/
    .venv/bin/python tests/vectors/generate.py OUT_DIR  # write elsewhere

The bytes come from edgefl's own encoders; the expected decodings of lossy codecs come from the
math written out in the protocol (`reference_int8`, `reference_topk` below), not from edgefl's
decoder, so tests/test_conformance.py checks the one against the other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save as save_safetensors_bytes

from edgefl import signing
from edgefl.bundle import (
    Artifact,
    HeadSpec,
    InputSpec,
    Manifest,
    encode_head,
    manifest_digest,
    write_bundle,
)
from edgefl.core.codecs import encode_delta, encode_payload
from edgefl.core.settings import CodecSettings, RoundSettings, TrainConfig
from edgefl.delivery.release import Targets, build_release, open_release
from edgefl.errors import MessageError, SignatureError
from edgefl.head import head_digest
from edgefl.transport import topics
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    RoundTask,
    UpdateHeader,
    encode_round_task,
    encode_update_error,
    update_metadata,
)
from edgefl.transport.update_frame import COMPACT_FRAME, encode_compact, read_compact, task_ref

HERE = Path(__file__).resolve().parent
FLEET = "demo"
DEVICE = "pi-01"
RUN_ID = "5f0c6a1e9d3b4c2a8e7f6a5b4c3d2e1f"
TIME = 1767225600.0  # 2026-01-01T00:00:00Z
# The vectors' own Ed25519 key, derived from a constant: public, so never trust it for anything.
KEY_SEED = hashlib.sha256(b"edgefl conformance vectors: not a secret key").digest()
FLOAT16_MAX = 65504.0
CHUNK_SIZE = 1024  # the smallest a release allows, so the backbone takes 3 chunks

# The head of the vectors: linear 5 -> 2, relu, linear 2 -> 3 (parameters 0.* and 2.*).
LAYERS: list[dict[str, Any]] = [
    {"kind": "linear", "in": 5, "out": 2},
    {"kind": "relu"},
    {"kind": "linear", "in": 2, "out": 3},
]
LABELS = ["cat", "dog", "bird"]


def head_weights() -> dict[str, np.ndarray]:
    """Return the global head the task vectors carry (fixed seed)."""
    rng = np.random.default_rng(7)
    return {
        "0.weight": rng.normal(0, 0.5, (2, 5)).astype(np.float32),
        "0.bias": rng.normal(0, 0.1, 2).astype(np.float32),
        "2.weight": rng.normal(0, 0.5, (3, 2)).astype(np.float32),
        "2.bias": rng.normal(0, 0.1, 3).astype(np.float32),
    }


def trained_delta() -> dict[str, np.ndarray]:
    """Return the delta the update vectors encode, in the order they send it."""
    rng = np.random.default_rng(11)
    return {
        "0.weight": rng.normal(0, 0.02, (2, 5)).astype(np.float32),
        "0.bias": rng.normal(0, 0.02, 2).astype(np.float32),
        "2.weight": rng.normal(0, 0.02, (3, 2)).astype(np.float32),
        "2.bias": rng.normal(0, 0.02, 3).astype(np.float32),
    }


def vector_key() -> Ed25519PrivateKey:
    """Return the vectors' signing key (never a real key: its seed is in this file)."""
    return Ed25519PrivateKey.from_private_bytes(KEY_SEED)


# -- the documented math, written out independently of edgefl.core.codecs --


def reference_int8(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Return (scale as float32, q, decoded) per docs/protocol.md, "int8"."""
    x = np.asarray(x, np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0  # float32 widened to float64
    scale = np.float32(peak / 127.0 if peak > 0.0 else 1.0)  # divided in float64, stored f32
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)  # float32 division, half to even
    return float(scale), q, q.astype(np.float32) * scale


def topk_count(size: int, fraction: float) -> int:
    """k = min(size, max(1, round_half_even(fraction * size)))."""
    return min(size, max(1, round(fraction * size)))  # Python's round is half to even


def reference_topk(
    delta: Mapping[str, np.ndarray], fraction: float
) -> tuple[list[int], list[float], dict[str, np.ndarray]]:
    """Return (global indices, float16 values widened, decoded delta) per "topk"."""
    indices: list[int] = []
    values: list[float] = []
    decoded: dict[str, np.ndarray] = {}
    offset = 0
    for name, value in delta.items():
        flat = np.asarray(value, np.float32).ravel()
        k = topk_count(flat.size, fraction) if flat.size else 0
        order = sorted(range(flat.size), key=lambda i: -abs(float(flat[i])))  # no ties here
        chosen = sorted(order[:k])
        dense = np.zeros(flat.size, np.float32)
        for i in chosen:
            half = np.float16(np.clip(flat[i], -FLOAT16_MAX, FLOAT16_MAX))
            dense[i] = np.float32(half)
            indices.append(offset + i)
            values.append(float(half))
        decoded[name] = dense.reshape(np.shape(value))
        offset += flat.size
    return indices, values, decoded


# -- forms written into the expected JSON --


def tensor_list(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Return tensors as [{"name", "shape", "values" (row-major)}] in the mapping's order."""
    return [
        {
            "name": name,
            "shape": list(np.shape(value)),
            "values": [float(v) for v in np.asarray(value, np.float32).ravel()],
        }
        for name, value in arrays.items()
    ]


def sorted_metadata(data: bytes) -> bytes:
    """Return safetensors bytes with `__metadata__` keys in sorted order, nothing else changed.

    safetensors writes metadata from a hash map, so its key order changes from one encoding to
    the next; sorting it here makes the published vectors the same on every run. The header
    keeps its length (the same keys and values, permuted), so offsets and data are untouched.
    """
    length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + length].decode()
    header = json.loads(text)
    metadata = header.pop("__metadata__", {})
    rebuilt = json.dumps(
        {"__metadata__": dict(sorted(metadata.items())), **header},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    if len(rebuilt.encode()) != len(text.rstrip(" ").encode()):
        raise RuntimeError("rewritten safetensors header changed length")
    padded = rebuilt.encode().ljust(length, b" ")
    return data[:8] + padded + data[8 + length :]


def safetensors_with_header(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """Return safetensors bytes whose metadata "edgefl" is `header` (a hand-written dict)."""
    metadata = {"edgefl": json.dumps(header, separators=(",", ":"))}
    return sorted_metadata(bytes(save_safetensors_bytes(dict(arrays), metadata=metadata)))


# -- the cases --

Case = tuple[bytes, dict[str, Any]]


def status_cases() -> dict[str, Case]:
    """Statuses: a full one, a minimal one, an older and a newer peer's."""
    topic = topics.device_status(FLEET, DEVICE)
    full = DeviceStatus(
        device_id=DEVICE,
        state="online",
        task="default",
        arch="aarch64",
        runtimes=["onnxruntime", "litert"],
        memory_mb=3792,
        samples=420,
        model_version=3,
        heartbeat_s=10.0,
        time=TIME,
        group="lab-b",
        profile="raspberry-pi",
        last_round=4,
        bundle_digest=manifest_digest(tiny_manifest().to_json()),
        artifact="backbone-int8.onnx",
        runtime="onnxruntime",
        provider="CPUExecutionProvider",
        connected_at=TIME - 3600.0,  # the connection it went out on opened an hour before
    )
    minimal = {"schema_version": 2, "device_id": "jetson-02", "state": "offline"}
    v1 = {
        "schema_version": 1,
        "device_id": "pi-03",
        "state": "online",
        "samples": 12,
        "model_version": 3,
        "time": TIME,
    }
    extra = {**asdict(full), "battery_pct": 81, "location": {"room": "B2"}}
    cases: dict[str, Case] = {
        "status-full": (full.encode(), expect_status(full, topic, True, "every field given")),
        "status-minimal": (
            json_bytes(minimal),
            expect_status(
                DeviceStatus(device_id="jetson-02", state="offline"),
                topics.device_status(FLEET, "jetson-02"),
                False,
                "only the required fields: every other field takes its default",
            ),
        ),
        "status-v1": (
            json_bytes(v1),
            expect_status(
                DeviceStatus(
                    device_id="pi-03", state="online", samples=12, model_version=3, time=TIME
                ),
                topics.device_status(FLEET, "pi-03"),
                False,
                "schema_version 1 (an older board, no bundle_digest): read, defaults filled in",
            ),
        ),
        "status-unknown-fields": (
            json_bytes(extra),
            expect_status(
                full, topic, False, "a newer peer's extra fields (any JSON type) are ignored"
            ),
        ),
    }
    return cases


def json_bytes(data: Any) -> bytes:
    """Return compact UTF-8 JSON, as a hand-written peer would send it."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def expect_status(
    message: DeviceStatus, topic: str, canonical: bool, description: str
) -> dict[str, Any]:
    """Return the expected decoding of a status."""
    return {
        "kind": "status",
        "description": description,
        "topic": topic,
        "canonical": canonical,
        "message": asdict(message),
    }


def result_cases() -> dict[str, Case]:
    """A round result with per-device answers."""
    result = RoundResult(
        round=5,
        status="closed",
        head_version=5,
        selected=3,
        accepted=2,
        rejected={"head-mismatch": 1},
        late=0,
        metrics={"accuracy": 0.875, "samples": 860.0, "bytes_per_update": 412.0},
        online=4,
        stale=1,
        run_id=RUN_ID,
        answers={DEVICE: "accepted", "pi-03": "head-mismatch", "jetson-02": "accepted"},
        reasons={"pi-03": "update trained from head version 3, the round sent 4"},
    )
    return {
        "result-closed": (
            result.encode(),
            {
                "kind": "result",
                "description": "a closed round: two accepted, one rejected with its reason",
                "topic": topics.round_result(FLEET, 5),
                "canonical": True,
                "message": asdict(result),
            },
        )
    }


def backbone_bytes() -> bytes:
    """The bundle's backbone stand-in: not a model, 2,900 bytes, so releases chunk it in 3."""
    return "".join(f"not a model: vectors backbone line {i:03d}\n" for i in range(80)).encode()


def tiny_manifest() -> Manifest:
    """Return the manifest of the vectors' bundle (its artifacts' sizes and digests filled)."""
    backbone = backbone_bytes()
    head = encode_head(head_weights())
    return Manifest(
        name="vectors-tiny",
        version=3,
        input=InputSpec(shape=[1, 8, 8]),
        feature_size=5,
        artifacts=[
            Artifact(
                file="backbone-int8.onnx",
                role="backbone",
                format="onnx",
                precision="int8",
                size=len(backbone),
                sha256=hashlib.sha256(backbone).hexdigest(),
            ),
            Artifact(
                file="head.safetensors",
                role="head",
                format="safetensors",
                precision="fp32",
                size=len(head),
                sha256=hashlib.sha256(head).hexdigest(),
                task="default",
            ),
        ],
        heads={"default": HeadSpec(layers=LAYERS, labels=LABELS)},
        recipe="vectors",
        created="2026-01-01T00:00:00Z",
    )


def reference_forward(weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head of `LAYERS` written out: relu(x W0ᵀ + b0) W2ᵀ + b2, in float64."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    hidden = np.maximum(x @ w["0.weight"].T + w["0.bias"], 0.0)
    return hidden @ w["2.weight"].T + w["2.bias"]


def bundle_cases() -> dict[str, Case]:
    """The bundle manifest (its digest, its head spec, the head's forward pass) and head file."""
    manifest = tiny_manifest()
    text = manifest.to_json()
    # Seed 6 gives one row with each hidden unit on alone and one with both off (relu).
    features = np.random.default_rng(6).normal(0, 1, (3, 5)).astype(np.float32)
    weights = head_weights()
    return {
        "bundle-manifest": (
            text.encode(),
            {
                "kind": "manifest",
                "description": "a bundle manifest as Manifest.to_json() writes it and a release "
                "carries it; its SHA-256 is the bundle digest",
                "canonical": True,
                "manifest": manifest.to_dict(),
                "bundle_digest": manifest_digest(text),
                "head_forward": {
                    "task": "default",
                    "weights_vector": "bundle-head",
                    "features": features.astype(np.float64).tolist(),
                    "logits": reference_forward(weights, features.astype(np.float64)).tolist(),
                },
            },
        ),
        "bundle-head": (
            encode_head(weights),
            {
                "kind": "head-file",
                "description": "head.safetensors of the bundle: float32 tensors named as the "
                "head spec says, no metadata",
                "canonical": True,
                "tensors": tensor_list(dict(sorted(weights.items()))),
            },
        ),
    }


def digest_preimage(heads: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """The bytes head_digest hashes, written out from the protocol's description."""
    out = b""
    for task in sorted(heads):
        for key in sorted(heads[task]):
            value = np.asarray(heads[task][key], "<f4")
            out += f"{task}/{key} {','.join(str(d) for d in value.shape)}\n".encode()
            out += value.tobytes()
    return out


def round_task() -> RoundTask:
    """Return the task of round 5 that the update vectors answer."""
    heads = {"default": head_weights()}
    settings = RoundSettings(
        train=TrainConfig(epochs=2, lr=0.05, batch_size=8, seed=42),
        codec=CodecSettings(codec="int8"),
    )
    return RoundTask(
        round=5,
        selected=[DEVICE, "pi-03", "jetson-02"],
        tasks=["default"],
        head_version=4,
        model_version=3,
        deadline_s=60.0,
        config=settings.to_wire(),
        run_id=RUN_ID,
        head_digest=head_digest(heads),
        bundle_digest=manifest_digest(tiny_manifest().to_json()),
        update_frame=COMPACT_FRAME,
    )


def task_cases() -> dict[str, Case]:
    """A task with its head, and the head digest's exact preimage."""
    task = round_task()
    heads = {"default": head_weights()}
    preimage = digest_preimage(heads)
    expected = {
        "kind": "task",
        "description": "round 5's task: settings, identity digests and the global head",
        "topic": topics.round_task(FLEET, 5),
        "canonical": True,
        "message": asdict(task),
        "settings": RoundSettings.from_wire(task.config).to_wire(),
        "heads": {
            name: tensor_list(dict(sorted(weights.items()))) for name, weights in heads.items()
        },
        "head_digest": head_digest(heads),
        "head_digest_preimage": "head-digest-preimage",
    }
    return {
        "task-round5": (encode_round_task(task, heads), expected),
        "head-digest-preimage": (
            preimage,
            {
                "kind": "digest-preimage",
                "description": "the exact bytes whose SHA-256 is task-round5's head_digest",
                "canonical": True,
                "sha256": hashlib.sha256(preimage).hexdigest(),
            },
        ),
    }


def update_header(**changes: Any) -> UpdateHeader:
    """Return pi-01's header answering `round_task()`."""
    task = round_task()
    values: dict[str, Any] = {
        "round": task.round,
        "device_id": DEVICE,
        "task": "default",
        "samples": 420,
        "head_version": task.head_version,
        "model_version": task.model_version,
        "metrics": {"loss": 0.3125, "global_accuracy": 0.75, "personal_accuracy": 0.8125},
        "run_id": task.run_id,
        "head_digest": task.head_digest,
        "bundle_digest": task.bundle_digest,
        # What the board applied: its own clip and noise (the task asks for none); the delta's
        # norm, 0.0736, is within the clip.
        "clip_norm": 0.125,
        "noise_multiplier": 0.5,
    }
    values.update(changes)
    return UpdateHeader(**values)


def update_cases() -> dict[str, Case]:
    """Updates in each codec, an error update, and the first "shapes" form."""
    topic = topics.round_update(FLEET, 5, DEVICE)
    header = update_header()
    delta = trained_delta()
    cases: dict[str, Case] = {}

    def add(name: str, codec: str, fraction: float, source: dict[str, np.ndarray]) -> None:
        data = sorted_metadata(
            encode_delta(source, codec, topk_fraction=fraction, metadata=update_metadata(header))
        )
        expected: dict[str, Any] = {
            "kind": "update",
            "topic": topic,
            "canonical": True,
            "message": asdict(header),
            "codec": codec,
            "shapes": [[key, list(value.shape)] for key, value in source.items()],
            "encode": {"codec": codec, "topk_fraction": fraction, "delta": tensor_list(source)},
        }
        if codec == "float32":
            expected["description"] = "float32: the delta exactly"
            expected["delta"] = tensor_list(source)
        elif codec == "int8":
            parts = {key: reference_int8(value) for key, value in source.items()}
            expected["description"] = "int8: one scale per tensor (an all-zero tensor has scale 1)"
            expected["int8"] = {
                "scales": [scale for scale, _, _ in parts.values()],
                "q": [[int(v) for v in q.ravel()] for _, q, _ in parts.values()],
            }
            expected["delta"] = tensor_list({key: part[2] for key, part in parts.items()})
        else:
            indices, values, decoded = reference_topk(source, fraction)
            expected["description"] = (
                "topk, fraction 0.25: counts 2 (2.5 rounds half to even), 1 (0.5 -> 0 -> at "
                "least 1), 2 (1.5), 1; one value beyond float16 range is clipped to 65504"
            )
            expected["topk"] = {
                "counts": [topk_count(v.size, fraction) for v in source.values()],
                "indices": indices,
                "values": values,
            }
            expected["delta"] = tensor_list(decoded)
        cases[name] = (data, expected)

    add("update-float32", "float32", 0.01, delta)
    with_zero = {**delta, "0.bias": np.zeros(2, np.float32)}
    add("update-int8", "int8", 0.01, with_zero)
    huge = {key: value.copy() for key, value in delta.items()}
    huge["0.weight"][1, 3] = 1.0e5
    add("update-topk", "topk", 0.25, huge)

    # Version 1 wrote "shapes" as an object in key order; it is still read.
    shapes_v1 = json.dumps({key: list(value.shape) for key, value in delta.items()})
    meta = {"codec": "float32", "shapes": shapes_v1, **update_metadata(header)}
    data = sorted_metadata(bytes(save_safetensors_bytes(dict(delta), metadata=meta)))
    cases["update-shapes-object"] = (
        data,
        {
            "kind": "update",
            "description": "the first 'shapes' form (an object in key order) is still decoded",
            "topic": topic,
            "canonical": False,
            "message": asdict(header),
            "codec": "float32",
            "shapes": [[key, list(value.shape)] for key, value in delta.items()],
            "delta": tensor_list(delta),
        },
    )

    error = update_header(
        samples=0, metrics={}, status="error", error_code="no-data",
        reason="the device has no labelled samples", clip_norm=None, noise_multiplier=0.0,
    )  # fmt: skip
    cases["update-error"] = (
        encode_update_error(error),
        {
            "kind": "update",
            "description": "an error update: no tensors, the header says what failed",
            "topic": topic,
            "canonical": True,
            "message": asdict(error),
            "delta": None,
        },
    )
    return cases


def refused_cases() -> dict[str, Case]:
    """Messages a reader must refuse; `refused` is the error edgefl gives (wording is free)."""
    status = asdict(
        DeviceStatus(device_id=DEVICE, state="online", samples=12, model_version=3, time=TIME)
    )
    header = asdict(update_header())
    task = asdict(round_task())
    del task["round"]
    topk_bad = np.array([2, 1], "<i4").tobytes() + np.array([1.0, 2.0], "<f2").tobytes()
    update_topic = topics.round_update(FLEET, 5, DEVICE)
    raw: dict[str, tuple[str, str, str, bytes]] = {
        "refuse-status-newer-schema": (
            "status", topics.device_status(FLEET, DEVICE),
            "schema_version 3 is newer than this reader's 2",
            json_bytes({**status, "schema_version": 3}),
        ),
        "refuse-status-wrong-type": (
            "status", topics.device_status(FLEET, DEVICE),
            "samples is a string, not an integer",
            json_bytes({**status, "samples": "12"}),
        ),
        "refuse-status-missing-field": (
            "status", topics.device_status(FLEET, DEVICE),
            "the required field state is missing",
            json_bytes({k: v for k, v in status.items() if k != "state"}),
        ),
        "refuse-status-no-schema": (
            "status", topics.device_status(FLEET, DEVICE),
            "schema_version is missing",
            json_bytes({k: v for k, v in status.items() if k != "schema_version"}),
        ),
        "refuse-result-nan-metric": (
            "result", topics.round_result(FLEET, 5),
            "numbers must be finite (NaN is not JSON, but some parsers accept it)",
            b'{"schema_version":2,"round":5,"status":"closed","head_version":5,"selected":1,'
            b'"accepted":1,"metrics":{"accuracy":NaN}}',
        ),
        "refuse-task-missing-round": (
            "task", topics.round_task(FLEET, 5),
            "the task header lacks the required field round",
            safetensors_with_header(task, {"default/0.bias": np.zeros(2, np.float32)}),
        ),
        "refuse-task-float64-head": (
            "task", topics.round_task(FLEET, 5),
            "head tensors are float32; a float64 one is refused",
            safetensors_with_header(
                asdict(round_task()), {"default/0.bias": np.zeros(2, np.float64)}
            ),
        ),
        "refuse-update-newer-schema": (
            "update", update_topic,
            "an update header of schema_version 3",
            safetensors_with_header({**header, "schema_version": 3}, {}),
        ),
        "refuse-update-wrong-status": (
            "update", update_topic,
            "status must be 'ok' or 'error'",
            safetensors_with_header({**header, "status": "done"}, {}),
        ),
        "refuse-update-topk-unsorted": (
            "update", update_topic,
            "top-k indices must be strictly increasing",
            sorted_metadata(bytes(save_safetensors_bytes(
                {"d": np.frombuffer(topk_bad, np.uint8)},
                metadata={"codec": "topk", "shapes": '[["a",[4]]]', **update_metadata(
                    update_header())},
            ))),
        ),
        "refuse-update-not-safetensors": (
            "update", update_topic, "not safetensors at all", b"\x05\x00\x00\x00\x00\x00\x00\x00{}",
        ),
    }  # fmt: skip
    cases: dict[str, Case] = {}
    for name, (kind, topic, description, data) in raw.items():
        cases[name] = (
            data,
            {
                "kind": kind,
                "description": description,
                "topic": topic,
                "refused": refusal(kind, data),
            },
        )
    return cases


def refusal(kind: str, data: bytes) -> str:
    """Return the error edgefl's reader gives for `data` (a bug in the vectors when none)."""
    readers: dict[str, Callable[[bytes], Any]] = {
        "status": DeviceStatus.decode,
        "result": RoundResult.decode,
    }
    try:
        if kind in readers:
            readers[kind](data)
        elif kind == "compact-update":
            read_compact(data)
        elif kind == "task":
            from edgefl.transport.messages import decode_round_task

            decode_round_task(data)
        else:
            from edgefl.core.codecs import decode_delta
            from edgefl.transport.messages import read_update_header

            if read_update_header(data).status == "ok":
                decode_delta(data)
    except MessageError as exc:
        return str(exc)
    raise RuntimeError(f"a {kind} vector meant to be refused was accepted")


def key_cases() -> dict[str, Case]:
    """The vectors' key files and one signature over given bytes."""
    key = vector_key()
    message = "Ed25519 over these exact bytes, UTF-8: é ü 1.0".encode()
    raw_public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        "signature": (
            message,
            {
                "kind": "signature",
                "description": "an Ed25519 signature (base64) by keys/operator.key over the "
                "exact bytes of signature.bin",
                "canonical": True,
                "public_key_file": "keys/operator.pub",
                "public_key_raw_hex": raw_public.hex(),
                "key_id": signing.key_id(key.public_key()),
                "signature": signing.sign(key, message),
            },
        )
    }


def sealed_cases() -> dict[str, Case]:
    """A status sealed by the vectors' key (standing in for a board's), one moved to another
    device's topic, and one altered: the seal's layout in docs/protocol.md, "Sealed messages"."""
    from edgefl.transport.sealed import SealError, seal, unseal

    key = vector_key()
    status = DeviceStatus(device_id=DEVICE, state="online", samples=12, model_version=3, time=TIME)
    topic = topics.device_status(FLEET, DEVICE)
    payload = status.encode()
    sealed = seal(key, topic, payload)
    raw_public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    common = {"kind": "sealed", "public_key_raw_hex": raw_public.hex(),
              "public_key_file": "keys/operator.pub"}  # fmt: skip

    def refusal(data: bytes, at: str) -> str:
        try:
            unseal(data).verify(at, key.public_key())
        except SealError as exc:
            return str(exc)
        raise RuntimeError("a sealed vector meant to be refused was accepted")

    other = topics.device_status(FLEET, "pi-0")
    altered = sealed[:-2] + b"9}"
    return {
        "sealed-status": (sealed, {
            **common, "description": "a status sealed for its topic: magic, raw public key, "
            "signature over the domain, topic and payload, then the payload unchanged",
            "topic": topic, "signed_preimage_hex": (b"edgefl-seal-v1\0" + topic.encode()
                                                    + b"\0" + payload).hex(),
            "payload": payload.decode(), "canonical": True,
        }),
        "refuse-sealed-moved": (sealed, {
            **common, "description": "the same bytes published on another device's topic",
            "topic": other, "refused": refusal(sealed, other),
        }),
        "refuse-sealed-altered": (altered, {
            **common, "description": "the payload changed after sealing", "topic": topic,
            "refused": refusal(altered, topic),
        }),
    }  # fmt: skip


def key_files() -> dict[str, bytes]:
    """Return the vectors' PEM key files by relative path."""
    key = vector_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"keys/operator.key": private, "keys/operator.pub": signing.public_pem(key.public_key())}


def release_cases() -> dict[str, Case]:
    """Releases: one as deploy publishes it, one from a newer peer, and ones to refuse."""
    key = vector_key()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(
            Path(tmp) / "bundle",
            tiny_manifest(),
            {"backbone-int8.onnx": backbone_bytes()},
            {"default": head_weights()},
        )
        release = build_release(bundle, key, Targets(group="atelier-é"), CHUNK_SIZE, TIME)
    signed = json.loads(release.envelope.signed)
    topic = topics.group_release(FLEET, "atelier-é")

    def expect(description: str, canonical: bool, content: dict[str, Any]) -> dict[str, Any]:
        return {
            "kind": "release",
            "description": description,
            "topic": topic,
            "canonical": canonical,
            "public_key_file": "keys/operator.pub",
            "key_id": signing.key_id(key.public_key()),
            "signed": content,
            "release": {
                "manifest_json": content["manifest_json"],
                "targets": content["targets"],
                "chunk_size": content["chunk_size"],
                "chunks": content["chunks"],
                "published": float(content["published"]),
                "schema_version": content["schema_version"],
            },
            "bundle_digest": manifest_digest(content["manifest_json"]),
            "artifact_vectors": {"backbone-int8.onnx": "bundle-backbone", "head.safetensors":
                                 "bundle-head"},
        }  # fmt: skip

    def envelope(content: Any, signer: Ed25519PrivateKey = key, **extra: Any) -> bytes:
        signed = json_bytes(content) if not isinstance(content, bytes) else content
        sealed = signing.seal(signer, signed)
        if not extra:
            return sealed.to_bytes()
        fields = json.loads(sealed.to_bytes())
        return json_bytes({**fields, **extra})

    newer = {**signed, "rollout": {"percent": 25}}
    cases: dict[str, Case] = {
        "release-group": (
            release.to_bytes(),
            {
                **expect(
                    "a release for group atelier-é as edgefl deploy publishes it: the envelope "
                    "carries the signed UTF-8 JSON as base64",
                    True,
                    signed,
                ),
                "release_id": release.release_id,
            },
        ),
        "release-unknown-fields": (
            envelope(newer, note="outside the signed part: ignored"),
            expect("a newer peer's fields, signed and unsigned, are ignored", False, newer),
        ),
    }
    other = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"another key").digest())
    good = release.to_bytes()
    altered = json.loads(good)
    altered["signed"] = base64.b64encode(
        release.envelope.signed.replace(b'"chunk_size":1024', b'"chunk_size":1025')
    ).decode()
    refused = {
        "refuse-release-altered": ("the signed bytes were changed after signing",
                                   json_bytes(altered)),
        "refuse-release-other-key": ("signed by a key the board does not trust",
                                     envelope(signed, other)),
        "refuse-release-newer-schema": ("release schema_version 3",
                                        envelope({**signed, "schema_version": 3})),
        "refuse-release-wrong-type": ("chunk_size is a string",
                                      envelope({**signed, "chunk_size": "1024"})),
        "refuse-release-not-a-release": ("the signed part is of another type",
                                         envelope({**signed, "type": "task"})),
    }  # fmt: skip
    for name, (description, data) in refused.items():
        cases[name] = (
            data,
            {
                "kind": "release",
                "description": description,
                "topic": topic,
                "public_key_file": "keys/operator.pub",
                "refused": release_refusal(data),
            },
        )
    cases["bundle-backbone"] = (
        backbone_bytes(),
        {
            "kind": "artifact",
            "description": "the bundle's backbone file (a stand-in), chunked by release-group",
            "canonical": True,
            "sha256": hashlib.sha256(backbone_bytes()).hexdigest(),
        },
    )
    return cases


def release_refusal(data: bytes) -> str:
    """Return the error a board gives for a release it must refuse."""
    try:
        open_release(data, vector_key().public_key())
    except (MessageError, SignatureError) as exc:
        return f"{type(exc).__name__}: {exc}"
    raise RuntimeError("a release vector meant to be refused was accepted")


def compact_cases() -> dict[str, Case]:
    """pi-01's answer to round 5 in the compact frame (int8 and float32), and one refused."""
    task = round_task()
    header = update_header()
    delta = trained_delta()
    ordered = dict(sorted(delta.items()))  # the frame's order: byte-wise names
    preimage = "\0".join([task.run_id, str(task.round), "default", task.head_digest,
                           str(task.head_version), task.bundle_digest])  # fmt: skip
    ref = task_ref(task.run_id, task.round, "default", task.head_digest, task.head_version,
                   task.bundle_digest)  # fmt: skip
    cases: dict[str, Case] = {}
    for codec in ("int8", "float32"):
        payload = encode_payload(ordered, codec)
        data = encode_compact(codec, ref, header.samples, payload, header.metrics,
                              header.clip_norm, header.noise_multiplier)  # fmt: skip
        decoded = (
            ordered if codec == "float32"
            else {key: reference_int8(value)[2] for key, value in ordered.items()}
        )  # fmt: skip
        cases[f"update-compact-{codec}"] = (
            data,
            {
                "kind": "compact-update",
                "description": f"{codec} in the compact frame: the same answer as update-{codec}'s"
                " header, its task named by an 8-byte reference",
                "topic": topics.round_update(FLEET, 5, DEVICE),
                "canonical": True,
                "answers": "task-round5",
                "ref_preimage": "edgefl-task-ref-v1\\0" + preimage.replace("\0", "\\0"),
                "ref": ref.hex(),
                "codec": codec,
                "samples": header.samples,
                "metrics": header.metrics,
                "clip_norm": header.clip_norm,
                "noise_multiplier": header.noise_multiplier,
                "header_bytes": len(data) - len(payload),
                "shapes": [[key, list(value.shape)] for key, value in ordered.items()],
                "delta": tensor_list(decoded),
            },
        )
    reserved = bytearray(cases["update-compact-int8"][0])
    reserved[4] |= 0x08
    cases["refuse-update-compact-reserved"] = (
        bytes(reserved),
        {
            "kind": "compact-update",
            "description": "a compact frame with a reserved flag bit set (a newer frame)",
            "topic": topics.round_update(FLEET, 5, DEVICE),
            "refused": refusal("compact-update", bytes(reserved)),
        },
    )
    return cases


def all_cases() -> dict[str, Case]:
    """Return every case by name."""
    cases: dict[str, Case] = {}
    for group in (
        status_cases, result_cases, bundle_cases, task_cases, update_cases, key_cases,
        release_cases, refused_cases, sealed_cases, compact_cases,
    ):  # fmt: skip
        cases.update(group())
    return cases


def expected_json(expected: Mapping[str, Any]) -> str:
    """Return an expected decoding as JSON text: one top-level field a line, values compact."""
    lines = [
        f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False, separators=(', ', ': '))}"
        for key, value in expected.items()
    ]
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def write_vectors(out: Path) -> list[Path]:
    """Write every vector file under `out`; return the paths written."""
    written: list[Path] = []
    (out / "keys").mkdir(parents=True, exist_ok=True)
    for relative, data in key_files().items():
        (out / relative).write_bytes(data)
        written.append(out / relative)
    for name, (data, expected) in all_cases().items():
        (out / f"{name}.bin").write_bytes(data)
        (out / f"{name}.json").write_text(expected_json(expected))
        written += [out / f"{name}.bin", out / f"{name}.json"]
    return written


def main(argv: list[str]) -> int:
    """Write the vectors into argv[0] (default: this folder)."""
    out = Path(argv[0]) if argv else HERE
    paths = write_vectors(out)
    print(f"wrote {len(paths)} files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
