"""The signed release a deploy publishes, and the report a board sends back about it.

A release wraps a bundle's manifest (as its exact canonical JSON text), who it is for, and the
SHA-256 of every chunk of every artifact. The Ed25519 signature covers all of it, so a board can
check each chunk as it arrives, and each artifact against the manifest's SHA-256, against data
only the key holder could have written.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl import signing
from edgefl.bundle import Manifest, ModelBundle
from edgefl.delivery.chunks import check_chunk_size, file_digests
from edgefl.errors import MessageError

RELEASE_SCHEMA = 1
REPORT_SCHEMA = 1

# What a board says about a release. Terminal states end a deploy's wait for that board.
DOWNLOADING = "downloading"
INSTALLED = "installed"
CURRENT = "current"  # the board already runs this version
REFUSED = "refused"  # signature, target, version or integrity check failed; nothing changed
ROLLED_BACK = "rolled_back"  # installed, smoke inference failed, previous bundle restored
FAILED = "failed"  # could not install (disk, runtime missing); previous bundle kept
TERMINAL_STATES = frozenset({INSTALLED, CURRENT, REFUSED, ROLLED_BACK, FAILED})
SUCCESS_STATES = frozenset({INSTALLED, CURRENT})


@dataclass
class Targets:
    """Who a release is for: the whole fleet, one group, or a list of devices."""

    group: str | None = None
    devices: list[str] | None = None

    def includes(self, device_id: str, group: str | None) -> bool:
        """Return whether a board with this ID and group is targeted."""
        if self.devices is not None:
            return device_id in self.devices
        if self.group is not None:
            return group == self.group
        return True

    def describe(self) -> str:
        """Return a short human description ("fleet", "group lab", "devices a, b")."""
        if self.devices is not None:
            return "devices " + ", ".join(self.devices)
        if self.group is not None:
            return f"group {self.group}"
        return "fleet"


@dataclass
class Release:
    """A signed, chunked bundle release as it travels on the wire (JSON)."""

    manifest_json: str
    targets: Targets
    chunk_size: int
    chunks: dict[str, list[str]]
    key_id: str
    published: float = field(default_factory=time.time)
    signature: str = ""
    schema_version: int = RELEASE_SCHEMA

    @property
    def release_id(self) -> str:
        """A short ID of this release (each deploy gets its own, even of the same bundle)."""
        return hashlib.sha256(self.signature.encode()).hexdigest()[:12]

    @property
    def manifest(self) -> Manifest:
        """The parsed manifest (parsed from the signed text, never re-serialized for checks)."""
        return Manifest.from_json(self.manifest_json)

    def signed_payload(self) -> bytes:
        """Return the canonical bytes the signature covers: every field but the signature."""
        data = asdict(self)
        del data["signature"]
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Release:
        """Decode from the wire.

        Raises:
            MessageError: not JSON, a field is missing or has the wrong type, or the schema
                version is unsupported.
        """
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise TypeError("not a JSON object")
            schema = int(raw.get("schema_version", 0))
            if schema != RELEASE_SCHEMA:
                raise MessageError(
                    f"release schema version {schema} is not supported (expected {RELEASE_SCHEMA})"
                )
            targets = raw["targets"]
            release = cls(
                manifest_json=str(raw["manifest_json"]),
                targets=Targets(
                    group=targets.get("group"),
                    devices=None if targets.get("devices") is None else list(targets["devices"]),
                ),
                chunk_size=int(raw["chunk_size"]),
                chunks={str(k): [str(d) for d in v] for k, v in raw["chunks"].items()},
                key_id=str(raw["key_id"]),
                published=float(raw["published"]),
                signature=str(raw.get("signature") or ""),
                schema_version=schema,
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"release message is malformed: {exc!r}") from exc
        return release

    def verify(self, key: Ed25519PublicKey) -> None:
        """Check the signature against a trusted public key.

        Raises:
            SignatureError: unsigned, or not signed by `key`, or altered after signing.
        """
        signing.verify(key, self.signed_payload(), self.signature)


def build_release(
    bundle: ModelBundle,
    key: Ed25519PrivateKey,
    targets: Targets,
    chunk_size: int,
) -> Release:
    """Chunk a bundle's artifacts and sign the release.

    Args:
        bundle: a verified bundle on disk.
        key: the fleet's signing key.
        targets: who the release is for.
        chunk_size: bytes per chunk.

    Returns:
        The signed release; its `chunks` maps every artifact file to its chunk digests.

    Raises:
        ChunkError: the chunk size is out of range.
    """
    check_chunk_size(chunk_size)
    chunks = {a.file: file_digests(bundle.file(a), chunk_size) for a in bundle.manifest.artifacts}
    release = Release(
        manifest_json=bundle.manifest.to_json(),
        targets=targets,
        chunk_size=chunk_size,
        chunks=chunks,
        key_id=signing.key_id(key.public_key()),
    )
    release.signature = signing.sign(key, release.signed_payload())
    return release


@dataclass
class DeployReport:
    """A board's report on a release: progress while downloading, then the outcome and why."""

    device_id: str
    version: int
    state: str
    release_id: str = ""
    running_version: int | None = None
    reason: str = ""
    received_bytes: int = 0
    total_bytes: int = 0
    time: float = field(default_factory=time.time)
    schema_version: int = REPORT_SCHEMA

    @property
    def terminal(self) -> bool:
        """Whether the board is done with this release (success or not)."""
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        """Whether the board now runs this release's version."""
        return self.state in SUCCESS_STATES

    def to_bytes(self) -> bytes:
        """Encode for the wire."""
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> DeployReport:
        """Decode from the wire.

        Raises:
            MessageError: not JSON or a required field is missing.
        """
        try:
            raw: dict[str, Any] = json.loads(data)
            if int(raw.get("schema_version", 0)) != REPORT_SCHEMA:
                raise MessageError(f"deploy report schema {raw.get('schema_version')} unsupported")
            running = raw.get("running_version")
            return cls(
                device_id=str(raw["device_id"]),
                version=int(raw["version"]),
                state=str(raw["state"]),
                release_id=str(raw.get("release_id", "")),
                running_version=None if running is None else int(running),
                reason=str(raw.get("reason", "")),
                received_bytes=int(raw.get("received_bytes", 0)),
                total_bytes=int(raw.get("total_bytes", 0)),
                time=float(raw.get("time", 0.0)),
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"deploy report is malformed: {exc!r}") from exc
        except AttributeError as exc:
            raise MessageError("deploy report is not a JSON object") from exc
