"""The signed release a deploy publishes, and the report a board sends back about it.

A release is a `signing.Envelope` whose signed bytes are UTF-8 JSON (release schema 2):

    {"type": "release", "schema_version": 2,
     "manifest_json": "<the bundle manifest's canonical JSON text>",
     "targets": {"group": str | null, "devices": [str, ...] | null},
     "chunk_size": int, "chunks": {"<artifact file>": ["<hex SHA-256 of chunk i>", ...]},
     "published": number}

A board verifies the signature over the exact bytes it received, then parses them; every field
it acts on is inside. Unknown fields (inside or outside the signed part) are ignored; only a newer
major schema version is refused. The SHA-256 of `manifest_json` is the bundle's digest. The
chunk digests let a board check each chunk as it arrives, and each artifact against the
manifest's SHA-256, against data only the key holder could have written.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl import signing
from edgefl.bundle import Manifest, ModelBundle, manifest_digest
from edgefl.delivery.chunks import check_chunk_size, file_digests
from edgefl.errors import EdgeflError, MessageError

RELEASE_SCHEMA = 2
RELEASE_TYPE = "release"
REPORT_SCHEMA = 1

# What a board says about a release. Terminal states end a deploy's wait for that board.
DOWNLOADING = "downloading"
INSTALLED = "installed"
CURRENT = "current"  # the board already runs this version
REFUSED = "refused"  # signature, target, version or integrity check failed; nothing changed
ROLLED_BACK = "rolled_back"  # installed, smoke inference failed, previous bundle restored
FAILED = "failed"  # could not install now (disk, a chunk never arrived intact); retried later
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
    """A release's signed content, and the envelope it travels in.

    Build one with `build_release` (publisher) or `open_release` (board: verify, then parse).
    """

    manifest_json: str
    targets: Targets
    chunk_size: int
    chunks: dict[str, list[str]]
    envelope: signing.Envelope
    published: float = 0.0
    schema_version: int = RELEASE_SCHEMA

    @property
    def release_id(self) -> str:
        """A short ID of this release (each deploy gets its own, even of the same bundle)."""
        return release_id(self.envelope)

    @property
    def key_id(self) -> str:
        """The fingerprint of the key that signed it."""
        return self.envelope.key_id

    @property
    def manifest(self) -> Manifest:
        """The parsed manifest (parsed from the signed text, never re-serialized for checks)."""
        return Manifest.from_json(self.manifest_json)

    @property
    def bundle_digest(self) -> str:
        """The digest of the full bundle this release carries (`manifest_digest`)."""
        return manifest_digest(self.manifest_json)

    def to_bytes(self) -> bytes:
        """Encode for the wire: the envelope exactly as signed."""
        return self.envelope.to_bytes()

    @classmethod
    def from_signed(cls, envelope: signing.Envelope) -> Release:
        """Parse a release from its envelope's signed bytes; call only after verifying them.

        Raises:
            MessageError: the signed part is not a release, a field is missing or has the wrong
                type (the message names it), or the schema's major version is newer.
        """
        try:
            raw = json.loads(envelope.signed)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MessageError(f"release is malformed: signed part is not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise MessageError("release is malformed: signed part is not a JSON object")
        if raw.get("type") != RELEASE_TYPE:
            raise MessageError(f"signed message is not a release (type {raw.get('type')!r})")
        schema = _field(raw, "schema_version", int)
        if schema > RELEASE_SCHEMA:
            raise MessageError(
                f"release schema version {schema} is newer than this board reads ({RELEASE_SCHEMA})"
            )
        targets = _field(raw, "targets", dict)
        group = _field(targets, "targets.group", str, optional=True, key="group")
        devices = _field(targets, "targets.devices", list, optional=True, key="devices")
        if devices is not None and not all(isinstance(d, str) for d in devices):
            raise MessageError("release field 'targets.devices' must be a list of strings")
        chunks = _field(raw, "chunks", dict)
        for file, digests in chunks.items():
            if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
                raise MessageError(f"release field 'chunks.{file}' must be a list of strings")
        release = cls(
            manifest_json=_field(raw, "manifest_json", str),
            targets=Targets(group=group, devices=devices),
            chunk_size=_field(raw, "chunk_size", int),
            chunks=chunks,
            envelope=envelope,
            published=float(_field(raw, "published", float)),
            schema_version=schema,
        )
        try:
            check_manifest_types(release.manifest)
        except EdgeflError as exc:
            raise MessageError(f"release field 'manifest_json': {exc}") from exc
        return release


def open_release(data: bytes, key: Ed25519PublicKey) -> Release:
    """Verify a release message's signature over its exact signed bytes, then parse them.

    Raises:
        MessageError: not an envelope, or the signed part is not a valid release.
        SignatureError: not signed by `key`, or altered.
    """
    envelope = signing.Envelope.from_bytes(data, "release")
    envelope.verify(key)
    return Release.from_signed(envelope)


def release_id(envelope: signing.Envelope) -> str:
    """Return the short ID of the release an envelope carries (12 hex digits of its digest)."""
    return envelope.digest[:12]


def check_manifest_types(manifest: Manifest) -> None:
    """Check the manifest fields a board acts on have the right types.

    Raises:
        MessageError: the version or an artifact's file, role, size or SHA-256 has the wrong
            type (the message names it).
    """
    if isinstance(manifest.version, bool) or not isinstance(manifest.version, int):
        raise MessageError("manifest field 'version' must be an integer")
    for index, artifact in enumerate(manifest.artifacts):
        for name, kind in (("file", str), ("role", str), ("size", int), ("sha256", str)):
            value = getattr(artifact, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise MessageError(
                    f"manifest field 'artifacts[{index}].{name}' must be"
                    f" {_TYPE_NAMES[kind]}, not {type(value).__name__}"
                )


_TYPE_NAMES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def _field(
    raw: dict[str, Any], name: str, kind: type, *, optional: bool = False, key: str | None = None
) -> Any:
    """Return `raw[key or name]` when it has type `kind` (int for float is fine; bool never is).

    Raises:
        MessageError: missing (unless optional) or of another type; the message names the field.
    """
    value = raw.get(key or name)
    if value is None:
        if optional:
            return None
        raise MessageError(f"release field '{name}' is missing")
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise MessageError(
            f"release field '{name}' must be {_TYPE_NAMES[kind]}, not {type(value).__name__}"
        )
    return value


def build_release(
    bundle: ModelBundle,
    key: Ed25519PrivateKey,
    targets: Targets,
    chunk_size: int,
    published: float | None = None,
) -> Release:
    """Chunk a bundle's artifacts and sign the release.

    Args:
        bundle: a verified bundle on disk.
        key: the fleet's signing key.
        targets: who the release is for.
        chunk_size: bytes per chunk.
        published: the Unix time it is published (default: now).

    Returns:
        The signed release; its `chunks` maps every artifact file to its chunk digests.

    Raises:
        ChunkError: the chunk size is out of range.
    """
    check_chunk_size(chunk_size)
    chunks = {a.file: file_digests(bundle.file(a), chunk_size) for a in bundle.manifest.artifacts}
    content = {
        "type": RELEASE_TYPE,
        "schema_version": RELEASE_SCHEMA,
        "manifest_json": bundle.manifest.to_json(),
        "targets": asdict(targets),
        "chunk_size": chunk_size,
        "chunks": chunks,
        "published": time.time() if published is None else published,
    }
    signed = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Release.from_signed(signing.seal(key, signed.encode("utf-8")))


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
            # Tolerant: fields of a newer board are ignored; only a newer schema is refused.
            if not 1 <= int(raw.get("schema_version", 0)) <= REPORT_SCHEMA:
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
