"""The board-side updater, driven with literal messages: verify, fetch only what the profile wants,
install atomically, smoke-infer in onnxruntime, refuse or roll back with the reason reported."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import pytest
from bundles import make_test_bundle

from edgefl import signing
from edgefl.bundle import ModelBundle
from edgefl.delivery.chunks import digest, split
from edgefl.delivery.release import DeployReport, Release, Targets, build_release
from edgefl.delivery.store import BundleStore
from edgefl.delivery.updater import MAX_REFETCHES, Updater
from edgefl.transport import topics

FLEET = "lab"


class InlineExecutor(Executor):
    """Runs installs at once, so a test sees the outcome when the last chunk is handed over."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


@dataclasses.dataclass
class Board:
    updater: Updater
    reports: list[DeployReport]
    subscribed: list[str]

    @property
    def last(self) -> DeployReport:
        return self.reports[-1]

    def send(self, release: Release, bundle: ModelBundle, tamper: str | None = None) -> None:
        """Deliver a release, then every chunk of the artifacts the board subscribed to."""
        self.updater.on_release(release.to_bytes())
        version = release.manifest.version
        for artifact in release.manifest.artifacts:
            if topics.artifact_chunks(FLEET, version, artifact.file) not in self.subscribed:
                continue
            chunks = split(bundle.file(artifact).read_bytes(), release.chunk_size)
            for index, chunk in enumerate(chunks):
                if artifact.file == tamper and index == 0:
                    chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                topic = topics.artifact_chunk(FLEET, version, artifact.file, index)
                self.updater.on_chunk(topic, chunk)


@pytest.fixture
def keys(tmp_path: Path) -> signing.KeyPaths:
    return signing.init_keys(tmp_path / "keys")


def make_board(tmp_path: Path, keys: signing.KeyPaths, **options: Any) -> Board:
    reports: list[DeployReport] = []
    subscribed: list[str] = []
    options.setdefault("trust_key", signing.load_public_key(keys.public))
    updater = Updater(
        BundleStore(tmp_path / "models"),
        FLEET,
        "pi-01",
        preferences=[("onnx", "int8"), ("onnx", "fp32")],
        report=reports.append,
        subscribe=subscribed.append,
        unsubscribe=lambda f: subscribed.remove(f) if f in subscribed else None,
        executor=InlineExecutor(),
        **options,
    )
    return Board(updater, reports, subscribed)


def release_of(bundle: ModelBundle, keys: signing.KeyPaths, **targets: Any) -> Release:
    key = signing.load_private_key(keys.private)
    return build_release(bundle, key, Targets(**targets), chunk_size=1024)


def test_installs_only_the_preferred_artifact_and_reports(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1, precisions=("fp32", "int8"))
    handed: list[ModelBundle] = []
    board = make_board(tmp_path, keys, on_installed=handed.append)
    board.send(release_of(bundle, keys), bundle)
    assert board.last.state == "installed", board.last
    assert board.last.running_version == 1
    installed = board.updater.store.current_path
    assert installed is not None
    assert sorted(p.name for p in installed.iterdir()) == [
        "backbone-int8.onnx", "full-manifest.json", "head.safetensors", "manifest.json",
        "release.json",
    ]  # fmt: skip
    # The board's manifest lists 2 of 3 artifacts; its identity is still the full bundle's, the
    # digest the aggregator federates.
    assert len(handed[0].manifest.artifacts) == 2 and handed[0].digest == bundle.digest
    current = board.updater.store.current()
    assert current is not None and current.digest == bundle.digest
    progress = [r for r in board.reports if r.state == "downloading"]
    sizes = {a.file: a.size for a in bundle.manifest.artifacts}
    assert progress[0].total_bytes == sizes["backbone-int8.onnx"] + sizes["head.safetensors"]
    assert board.subscribed == []  # chunk topics dropped after the install


def test_unsigned_and_foreign_signatures_are_refused(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    board = make_board(tmp_path, keys)
    unsigned = release_of(bundle, keys)
    board.updater.on_release(signing.Envelope(unsigned.envelope.signed, "").to_bytes())
    assert (board.last.state, board.last.reason) == ("refused", "bundle is not signed")
    other = signing.init_keys(tmp_path / "other")
    board.send(release_of(bundle, other), bundle)
    assert board.last.state == "refused"
    assert "not signed by trusted key" in board.last.reason
    assert board.updater.store.current_path is None


def test_release_altered_after_signing_is_refused(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    board = make_board(tmp_path, keys)
    release = release_of(bundle, keys)
    signed = release.envelope.signed.replace(b'"chunk_size":1024', b'"chunk_size":2048')
    assert signed != release.envelope.signed  # any byte changed after signing breaks it
    board.updater.on_release(dataclasses.replace(release.envelope, signed=signed).to_bytes())
    assert board.last.state == "refused"
    assert "signature does not match" in board.last.reason
    assert board.updater.store.state().rejected == {}  # anyone can publish that: not remembered


def test_a_bad_chunk_is_fetched_again_and_the_release_installs(tmp_path: Path, keys: Any) -> None:
    board = make_board(tmp_path, keys)
    first = make_test_bundle(tmp_path / "b1", 1)
    board.send(release_of(first, keys), first)
    second = make_test_bundle(tmp_path / "b2", 2)
    release = release_of(second, keys)
    board.send(release, second, tamper="backbone-fp32.onnx")
    chunk_0 = topics.artifact_chunk(FLEET, 2, "backbone-fp32.onnx", 0)
    assert board.last.state == "downloading" and chunk_0 in board.subscribed  # asked again
    assert board.updater.running_version == 1
    board.send(release, second)  # the broker re-sends the retained chunks: the genuine one
    assert board.last.state == "installed" and board.updater.running_version == 2
    assert board.subscribed == []


def test_a_retained_bad_chunk_waits_for_the_genuine_one_and_survives_a_restart(
    tmp_path: Path, keys: Any
) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    release = release_of(bundle, keys)
    board = make_board(tmp_path, keys)
    board.updater.on_release(release.to_bytes())
    topic = topics.artifact_chunk(FLEET, 1, "backbone-fp32.onnx", 0)
    for _ in range(MAX_REFETCHES + 3):  # the stray copy comes back on every re-subscribe
        board.updater.on_chunk(topic, b"x" * 1024)
    failed = [r for r in board.reports if r.state == "failed"]
    assert len(failed) == 1 and f"{MAX_REFETCHES + 1} times" in failed[0].reason
    assert "waiting for a genuine copy" in failed[0].reason
    assert board.updater.store.state().rejected == {}
    restarted = make_board(tmp_path, keys)  # the stray chunk was cleared, the board restarted
    restarted.send(release, bundle)
    assert restarted.last.state == "installed"
    board.send(release, bundle)  # or the genuine chunk is published again while it waits
    assert board.last.state in ("installed", "current")


def test_chunk_indexes_the_release_does_not_have_are_ignored(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    board = make_board(tmp_path, keys)
    release = release_of(bundle, keys)
    board.updater.on_release(release.to_bytes())
    board.updater.on_chunk(topics.artifact_chunk(FLEET, 1, "backbone-fp32.onnx", 999), b"zz")
    board.updater.on_chunk(topics.artifact_chunk(FLEET, 1, "backbone-fp32.onnx", -1), b"zz")
    assert [r.state for r in board.reports] == ["downloading"]
    board.send(release, bundle)
    assert board.last.state == "installed"


def test_older_version_is_refused_as_rollback_and_same_version_is_current(
    tmp_path: Path, keys: Any
) -> None:
    board = make_board(tmp_path, keys)
    v2 = make_test_bundle(tmp_path / "b2", 2)
    board.send(release_of(v2, keys), v2)
    v1 = make_test_bundle(tmp_path / "b1", 1)
    board.send(release_of(v1, keys), v1)
    assert board.last.state == "refused"
    assert "older than the running version 2 (rollback protection)" in board.last.reason
    board.send(release_of(v2, keys), v2)
    assert board.last.state == "current"
    assert board.updater.running_version == 2


def test_failing_smoke_inference_rolls_back_and_is_not_retried(tmp_path: Path, keys: Any) -> None:
    board = make_board(tmp_path, keys)
    good = make_test_bundle(tmp_path / "b1", 1)
    board.send(release_of(good, keys), good)
    # The backbone really outputs 8 features; manifest and head say 16.
    broken = make_test_bundle(tmp_path / "b2", 2, feature_size=16, backbone_features=8)
    release = release_of(broken, keys)
    board.send(release, broken)
    assert board.last.state == "rolled_back"
    assert "gives (1, 8) features, the manifest says 16" in board.last.reason
    assert "rolled back to v1" in board.last.reason
    assert board.updater.running_version == 1
    count = len(board.reports)
    board.updater.on_release(release.to_bytes())  # the retained release again (reconnect)
    assert len(board.reports) == count + 1
    assert board.last.state == "refused" and "rolled back to v1" in board.last.reason


def test_group_target_and_missing_trust_key(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    board = make_board(tmp_path, keys, group="lab-a")
    board.send(release_of(bundle, keys, group="lab-b"), bundle)
    assert board.reports == []  # not for this board: silently ignored
    board.send(release_of(bundle, keys, group="lab-a"), bundle)
    assert board.last.state == "installed"
    untrusting = make_board(tmp_path / "x", keys, trust_key=None)
    untrusting.send(release_of(bundle, keys), bundle)
    assert untrusting.last.state == "refused" and "trusted key" in untrusting.last.reason


def test_rollback_protection_survives_a_restart(tmp_path: Path, keys: Any) -> None:
    board = make_board(tmp_path, keys)
    v3 = make_test_bundle(tmp_path / "b3", 3)
    board.send(release_of(v3, keys), v3)
    restarted = make_board(tmp_path, keys)
    assert restarted.updater.running_version == 3
    v2 = make_test_bundle(tmp_path / "b2", 2)
    restarted.send(release_of(v2, keys), v2)
    assert restarted.last.state == "refused"


def test_garbage_release_is_reported_not_raised(tmp_path: Path, keys: Any) -> None:
    board = make_board(tmp_path, keys)
    board.updater.on_release(b"{not json")
    assert board.last.state == "refused" and "malformed" in board.last.reason
    assert board.last.version == 0
    board.updater.on_chunk(topics.artifact_chunk(FLEET, 1, "x.onnx", 0), b"zz")  # no download
    assert len(board.reports) == 1


def hand_written_release(bundle: ModelBundle, keys: signing.KeyPaths, group: str) -> bytes:
    """A release as another language writes it: raw UTF-8, spaces, `1700000000` for a float."""
    digests = {
        a.file: [digest(c) for c in split(bundle.file(a).read_bytes(), 1024)]
        for a in bundle.manifest.artifacts
    }
    text = (
        '{ "type": "release", "schema_version": 2, "published": 1700000000,'
        f' "targets": {{"group": "{group}", "devices": null}}, "chunk_size": 1024,'
        f' "chunks": {json.dumps(digests)},'
        f' "manifest_json": {json.dumps(bundle.manifest.to_json())},'
        ' "note from the future": {"ignored": true} }'
    )
    key = signing.load_private_key(keys.private)
    return signing.seal(key, text.encode("utf-8")).to_bytes()


def test_a_release_signed_over_other_json_formatting_installs(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    board = make_board(tmp_path, keys, group="Küche-東")
    payload = hand_written_release(bundle, keys, "Küche-東")
    assert "Küche-東".encode() in base64.b64decode(json.loads(payload)["signed"])
    board.updater.on_release(payload)
    assert board.last.state == "downloading", board.last
    board.send(Release.from_signed(signing.Envelope.from_bytes(payload)), bundle)
    assert board.last.state == "installed" and board.updater.running_version == 1


def test_fields_outside_the_signed_part_change_nothing(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    release = release_of(bundle, keys, group="lab-a")
    wire = json.loads(release.to_bytes())
    wire.update(targets={"group": "lab-b"}, chunk_size=2048, schema_version=99, key_id="0" * 16)
    board = make_board(tmp_path, keys, group="lab-b")
    board.updater.on_release(json.dumps(wire).encode())
    assert board.reports == []  # still signed for lab-a only
    board = make_board(tmp_path / "a", keys, group="lab-a")
    board.updater.on_release(json.dumps(wire).encode())
    assert board.last.release_id == release.release_id and board.last.state == "downloading"
    assert topics.artifact_chunks(FLEET, 1, "backbone-fp32.onnx") in board.subscribed
    board.send(release, bundle)
    assert board.last.state == "installed"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            (b'"chunk_size":1024', b'"chunk_size":"1024"'),
            "'chunk_size' must be an integer, not str",
        ),
        ((b'"targets":{', b'"targets":[],"x":{'), "'targets' must be an object, not list"),
        ((b'"group":null', b'"group":7'), "'targets.group' must be a string, not int"),
        ((b'"published":', b'"published":true,"x":'), "'published' must be a number, not bool"),
        ((b'"chunks":{', b'"chunks":{"x":5,'), "'chunks.x' must be a list of strings"),
        ((b'"schema_version":2', b'"schema_version":3'), "schema version 3 is newer"),
        ((b'"type":"release"', b'"type":"task"'), "not a release (type 'task')"),
        # A JSON object's last duplicate key wins: the first artifact's size becomes a string.
        (
            (b'\\"task\\":null', b'\\"task\\":null,\\"size\\":\\"1\\"'),
            "'artifacts[0].size' must be an integer",
        ),
    ],
)
def test_a_signed_release_with_a_wrong_field_is_refused_naming_it(
    tmp_path: Path, keys: Any, change: tuple[bytes, bytes], field: str
) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    signed = release_of(bundle, keys).envelope.signed
    assert change[0] in signed
    payload = signing.seal(signing.load_private_key(keys.private), signed.replace(*change, 1))
    board = make_board(tmp_path, keys)
    board.updater.on_release(payload.to_bytes())
    assert board.last.state == "refused" and field in board.last.reason, board.last.reason
    board.send(release_of(bundle, keys), bundle)  # nothing remembered: the next one installs
    assert board.last.state == "installed"


def test_a_forged_release_during_a_download_is_ignored(tmp_path: Path, keys: Any) -> None:
    bundle = make_test_bundle(tmp_path / "b1", 1)
    release = release_of(bundle, keys)
    board = make_board(tmp_path, keys)
    board.updater.on_release(release.to_bytes())
    stranger = signing.init_keys(tmp_path / "stranger")
    board.updater.on_release(release_of(bundle, stranger).to_bytes())
    board.updater.on_release(b"garbage")
    assert [r.state for r in board.reports] == ["downloading"]
    board.send(release, bundle)
    assert board.last.state == "installed"
