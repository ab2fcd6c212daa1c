"""edgefl's own code against the protocol's conformance vectors (tests/vectors/, docs/protocol.md).

Every `{name}.bin` is decoded by edgefl's readers and compared with `{name}.json`; where the
encoding is deterministic, encoding the expected message again must give the published bytes.
Another implementation runs the same comparisons with its own code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edgefl import signing
from edgefl.bundle import Manifest, decode_head, encode_head, manifest_digest
from edgefl.core.codecs import decode_delta, decode_payload, encode_delta, encode_payload
from edgefl.core.settings import RoundSettings
from edgefl.delivery.release import open_release
from edgefl.errors import MessageError, SignatureError
from edgefl.head import head_digest, head_forward
from edgefl.transport import topics
from edgefl.transport.messages import (
    DeviceStatus,
    RoundResult,
    RoundTask,
    UpdateHeader,
    decode_round_task,
    encode_round_task,
    encode_update_error,
    read_update_header,
    update_metadata,
)
from edgefl.transport.sealed import SealError, seal, unseal
from edgefl.transport.update_frame import encode_compact, read_compact, task_ref

VECTORS = Path(__file__).parent / "vectors"
CASES = sorted(path.stem for path in VECTORS.glob("*.json"))


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    """Return a vector's published bytes and its expected decoding."""
    return (VECTORS / f"{name}.bin").read_bytes(), json.loads(
        (VECTORS / f"{name}.json").read_text()
    )


def tensors(listed: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Return the vectors' [{"name", "shape", "values"}] form as float32 arrays, in order."""
    return {
        item["name"]: np.array(item["values"], np.float32).reshape(item["shape"]) for item in listed
    }


def assert_same_tensors(actual: dict[str, np.ndarray], listed: list[dict[str, Any]]) -> None:
    expected = tensors(listed)
    assert list(actual) == list(expected)  # the order too: it is given explicitly
    for name, value in expected.items():
        assert actual[name].dtype == np.float32
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def safetensors_parts(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    """Return (header length, parsed header, data section) of safetensors bytes."""
    length = int.from_bytes(data[:8], "little")
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def test_there_is_a_vector_of_every_kind() -> None:
    kinds = {load(name)[1]["kind"] for name in CASES}
    assert {"status", "result", "task", "update", "manifest", "signature", "release",
            "sealed"} <= kinds  # fmt: skip
    refused = {name for name in CASES if "refused" in load(name)[1]}
    assert len(refused) >= 5 and len(CASES) - len(refused) >= 12


def test_the_committed_vectors_are_what_the_generator_writes(tmp_path: Path) -> None:
    # The vectors must describe the committed code: a change to a message shows up here until
    # `python tests/vectors/generate.py` is run again.
    generator = load_generator()
    written = {path.relative_to(tmp_path) for path in generator.write_vectors(tmp_path)}
    committed = {
        path.relative_to(VECTORS)
        for path in VECTORS.rglob("*")
        if path.is_file() and path.suffix in (".bin", ".json", ".key", ".pub")
    }
    assert written == committed
    for relative in sorted(written):
        assert (tmp_path / relative).read_bytes() == (VECTORS / relative).read_bytes(), relative


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vectors_generate", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CASES)
def test_vector_decodes_as_expected(name: str) -> None:
    data, expected = load(name)
    if expected["kind"] in ("status", "task", "update", "result", "compact-update"):
        parsed = topics.parse(expected["topic"])
        assert parsed is not None and parsed.kind == expected["kind"].removeprefix("compact-")
    if expected["kind"] == "sealed":
        check_sealed(data, expected)
        return
    if "refused" in expected and expected["kind"] == "release":
        public = signing.load_public_key(VECTORS / expected["public_key_file"])
        with pytest.raises((MessageError, SignatureError)) as refused:
            open_release(data, public)
        assert f"{type(refused.value).__name__}: {refused.value}" == expected["refused"]
        return
    if "refused" in expected:
        with pytest.raises(MessageError) as caught:
            decode(expected["kind"], data)
        assert str(caught.value) == expected["refused"]
        return
    CHECKS[expected["kind"]](data, expected)


def decode(kind: str, data: bytes) -> Any:
    """Decode a message of `kind` as a receiver does (an update: header, then its delta)."""
    if kind == "status":
        return DeviceStatus.decode(data)
    if kind == "result":
        return RoundResult.decode(data)
    if kind == "task":
        return decode_round_task(data)
    if kind == "compact-update":
        return read_compact(data)
    header = read_update_header(data)
    return header, decode_delta(data) if header.status == "ok" else None


def check_json_message(data: bytes, expected: dict[str, Any]) -> None:
    message = decode(expected["kind"], data)
    assert asdict(message) == expected["message"]
    cls = DeviceStatus if expected["kind"] == "status" else RoundResult
    again = cls(**expected["message"]).encode()
    assert message.encode() == again
    if expected["canonical"]:
        assert again == data


def check_task(data: bytes, expected: dict[str, Any]) -> None:
    task, heads = decode_round_task(data)
    assert asdict(task) == expected["message"]
    assert RoundSettings.from_wire(task.config).to_wire() == expected["settings"]
    assert set(heads) == set(expected["heads"])
    for name, listed in expected["heads"].items():
        assert_same_tensors(dict(sorted(heads[name].items())), listed)
    assert head_digest(heads) == expected["head_digest"] == task.head_digest
    preimage = (VECTORS / f"{expected['head_digest_preimage']}.bin").read_bytes()
    assert hashlib.sha256(preimage).hexdigest() == task.head_digest
    # One metadata key and tensors sorted by name: the encoding is deterministic.
    rebuilt = {name: tensors(listed) for name, listed in expected["heads"].items()}
    assert encode_round_task(RoundTask(**expected["message"]), rebuilt) == data


def check_update(data: bytes, expected: dict[str, Any]) -> None:
    header, body = decode("update", data)
    assert asdict(header) == expected["message"]
    if expected["delta"] is None:
        assert body is None and header.status == "error"
        assert encode_update_error(UpdateHeader(**expected["message"])) == data
        return
    delta, metadata = body
    assert metadata["codec"] == expected["codec"]
    assert_same_tensors(delta, expected["delta"])
    assert [[name, list(value.shape)] for name, value in delta.items()] == expected["shapes"]
    if not expected["canonical"]:
        return
    assert json.loads(metadata["shapes"]) == expected["shapes"]
    # safetensors writes `__metadata__` from a hash map: its key order varies between
    # encodings, so the header is compared as JSON and the rest byte for byte.
    source = expected["encode"]
    again = encode_delta(
        tensors(source["delta"]),
        source["codec"],
        topk_fraction=source["topk_fraction"],
        metadata=update_metadata(UpdateHeader(**expected["message"])),
    )
    length, header_json, body_bytes = safetensors_parts(data)
    assert safetensors_parts(again) == (length, header_json, body_bytes)
    blob = body_bytes[header_json["d"]["data_offsets"][0] :] if "d" in header_json else b""
    if expected["codec"] == "int8":
        count = len(expected["shapes"])
        scales = np.frombuffer(blob[: 4 * count], "<f4")
        np.testing.assert_array_equal(scales, np.array(expected["int8"]["scales"], np.float32))
        q = np.frombuffer(blob[4 * count :], np.int8)
        np.testing.assert_array_equal(q, np.concatenate(expected["int8"]["q"]))
    if expected["codec"] == "topk":
        count = len(expected["topk"]["indices"])
        assert count == sum(expected["topk"]["counts"])
        np.testing.assert_array_equal(
            np.frombuffer(blob[: 4 * count], "<i4"), expected["topk"]["indices"]
        )
        np.testing.assert_array_equal(
            np.frombuffer(blob[4 * count :], "<f2").astype(np.float32),
            np.array(expected["topk"]["values"], np.float32),
        )


def check_manifest(data: bytes, expected: dict[str, Any]) -> None:
    manifest = Manifest.from_json(data)
    assert manifest.to_dict() == expected["manifest"]
    assert manifest.to_json().encode() == data
    assert manifest_digest(data) == expected["bundle_digest"]
    forward = expected["head_forward"]
    head_file = (VECTORS / f"{forward['weights_vector']}.bin").read_bytes()
    head_artifact = next(a for a in manifest.artifacts if a.role == "head")
    assert hashlib.sha256(head_file).hexdigest() == head_artifact.sha256
    logits = head_forward(
        manifest.heads[forward["task"]].layers,
        decode_head(head_file),
        np.array(forward["features"], np.float32),
    )
    np.testing.assert_allclose(logits, forward["logits"], rtol=1e-5, atol=1e-6)


def check_head_file(data: bytes, expected: dict[str, Any]) -> None:
    weights = decode_head(data)
    assert_same_tensors(dict(sorted(weights.items())), expected["tensors"])
    assert bytes(encode_head(tensors(expected["tensors"]))) == data


def check_digest_preimage(data: bytes, expected: dict[str, Any]) -> None:
    assert hashlib.sha256(data).hexdigest() == expected["sha256"]


def check_signature(data: bytes, expected: dict[str, Any]) -> None:
    public = signing.load_public_key(VECTORS / expected["public_key_file"])
    private = signing.load_private_key(VECTORS / "keys" / "operator.key")
    assert signing.key_id(public) == expected["key_id"]
    signing.verify(public, data, expected["signature"])
    # Ed25519 signatures are deterministic: the same key and bytes give the same signature.
    assert signing.sign(private, data) == expected["signature"]


def check_sealed(data: bytes, expected: dict[str, Any]) -> None:
    public = signing.load_public_key(VECTORS / expected["public_key_file"])
    sealed = unseal(data)
    assert data[:4] == b"EFS1" and sealed.public_key.hex() == expected["public_key_raw_hex"]
    if "refused" in expected:
        with pytest.raises(SealError) as refused:
            sealed.verify(expected["topic"], public)
        assert str(refused.value) == expected["refused"]
        return
    assert sealed.verify(expected["topic"], public) == expected["payload"].encode()
    # The signature is Ed25519 over the preimage the protocol describes, byte for byte.
    public.verify(sealed.signature, bytes.fromhex(expected["signed_preimage_hex"]))
    private = signing.load_private_key(VECTORS / "keys" / "operator.key")
    assert seal(private, expected["topic"], sealed.payload) == data  # deterministic


def check_release(data: bytes, expected: dict[str, Any]) -> None:
    public = signing.load_public_key(VECTORS / expected["public_key_file"])
    release = open_release(data, public)
    assert json.loads(release.envelope.signed) == expected["signed"]
    actual = {
        "manifest_json": release.manifest_json,
        "targets": asdict(release.targets),
        "chunk_size": release.chunk_size,
        "chunks": release.chunks,
        "published": release.published,
        "schema_version": release.schema_version,
    }
    assert actual == expected["release"]
    assert release.key_id == expected["key_id"] == signing.key_id(public)
    assert release.bundle_digest == expected["bundle_digest"]
    assert manifest_digest(release.manifest_json) == load("bundle-manifest")[1]["bundle_digest"]
    for file, vector in expected["artifact_vectors"].items():
        content = (VECTORS / f"{vector}.bin").read_bytes()
        size = release.chunk_size
        pieces = [content[i : i + size] for i in range(0, len(content), size)]
        assert [hashlib.sha256(p).hexdigest() for p in pieces] == release.chunks[file]
    if expected["canonical"]:
        assert release.release_id == expected["release_id"]
        assert release.to_bytes() == data


def check_artifact(data: bytes, expected: dict[str, Any]) -> None:
    assert hashlib.sha256(data).hexdigest() == expected["sha256"]


def check_compact_update(data: bytes, expected: dict[str, Any]) -> None:
    header = read_compact(data)
    assert header.codec == expected["codec"] and header.samples == expected["samples"]
    assert header.metrics == expected["metrics"]
    assert (header.clip_norm, header.noise_multiplier) == (
        expected["clip_norm"], expected["noise_multiplier"])  # fmt: skip
    preimage = expected["ref_preimage"].replace("\\0", "\0").encode()
    assert hashlib.sha256(preimage).digest()[:8].hex() == expected["ref"] == header.ref.hex()
    task, heads = decode_round_task(load(expected["answers"])[0])
    assert task.update_frame >= 1
    assert task_ref(task.run_id, task.round, "default", task.head_digest, task.head_version,
                    task.bundle_digest) == header.ref  # fmt: skip
    # The tensors are shaped as the head the task sent, in byte-wise order of their names.
    head = heads["default"]
    assert [[key, list(head[key].shape)] for key in sorted(head)] == expected["shapes"]
    delta = decode_payload(header.codec, data[header.body_offset :],
                           [(key, head[key].shape) for key in sorted(head)])  # fmt: skip
    assert_same_tensors(delta, expected["delta"])
    assert header.body_offset == expected["header_bytes"]
    again = encode_compact(header.codec, header.ref, header.samples,
                           encode_payload(delta, header.codec), header.metrics,
                           header.clip_norm, header.noise_multiplier)  # fmt: skip
    assert again == data


CHECKS = {
    "compact-update": check_compact_update,
    "release": check_release,
    "artifact": check_artifact,
    "status": check_json_message,
    "result": check_json_message,
    "task": check_task,
    "update": check_update,
    "manifest": check_manifest,
    "head-file": check_head_file,
    "digest-preimage": check_digest_preimage,
    "signature": check_signature,
}
