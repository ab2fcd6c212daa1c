"""Ed25519 keys and signatures: who may publish a bundle to a fleet, checked on every board.

The publisher keeps `signing.key` (PKCS#8 PEM, mode 0600); boards get `signing.pub`
(SubjectPublicKeyInfo PEM) and pass it as `--trust-key`.

Signed messages travel as an `Envelope`: the signed part is carried as bytes (base64 in JSON) and
the signature covers exactly those bytes, so a receiver in any language verifies what it received
and only then parses it; nothing is re-serialized for a check. A release's signed part holds the
manifest text, so the signature covers every artifact's SHA-256 and, through them, every byte a
board runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl.atomic import write_atomic
from edgefl.errors import KeyFileError, MessageError, SignatureError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
DEFAULT_KEY_DIR = Path("~/.config/edgefl/keys")


@dataclass(frozen=True)
class KeyPaths:
    """Where a key pair was written."""

    private: Path
    public: Path


def init_keys(
    directory: str | Path = DEFAULT_KEY_DIR,
    private_name: str = PRIVATE_KEY_FILE,
    public_name: str = PUBLIC_KEY_FILE,
) -> KeyPaths:
    """Create an Ed25519 key pair in `directory`.

    The private key is created with mode 0600 from the start (never world-readable, even
    briefly), appears whole or not at all (a power cut cannot leave half a key), and is never
    overwritten: losing a fleet's signing key locks its boards out.

    Args:
        directory: where to write the two files; created if missing.
        private_name, public_name: their names (`signing.key`/`signing.pub` by default).

    Returns:
        The paths of the two files.

    Raises:
        KeyFileError: either file already exists, or the directory cannot be written.
    """
    root = Path(directory).expanduser()
    paths = KeyPaths(root / private_name, root / public_name)
    for path in (paths.private, paths.public):
        if path.exists():
            raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # Written beside the target (created 0600) and renamed into place.
        write_atomic(paths.private, private_pem, mode=0o600)
        write_atomic(paths.public, public_pem(key.public_key()), mode=0o644)
    except OSError as exc:
        raise KeyFileError(f"cannot write keys to {root}: {exc.strerror or exc}") from exc
    return paths


def public_pem(key: Ed25519PublicKey) -> bytes:
    """Return a public key as SubjectPublicKeyInfo PEM bytes."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (unencrypted PKCS#8 PEM).

    Raises:
        KeyFileError: the file is missing, unreadable or not an Ed25519 private key.
    """
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key (found {type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (SubjectPublicKeyInfo PEM).

    Raises:
        KeyFileError: the file is missing, unreadable or not an Ed25519 public key.
    """
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 key (found {type(key).__name__})")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """Return a short fingerprint of a public key (16 hex digits of its raw bytes' SHA-256)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, payload: bytes) -> str:
    """Sign bytes; return the signature as base64 text (fits in JSON)."""
    return base64.b64encode(key.sign(payload)).decode("ascii")


def verify(key: Ed25519PublicKey, payload: bytes, signature: str) -> None:
    """Check a base64 signature over bytes.

    Raises:
        SignatureError: the signature is empty, not base64, or does not match the payload.
    """
    if not signature:
        raise SignatureError("bundle is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature is not valid base64: {exc}") from exc
    try:
        key.verify(raw, payload)
    except InvalidSignature:
        raise SignatureError(
            f"signature does not match (not signed by trusted key {key_id(key)}, or altered)"
        ) from None


@dataclass(frozen=True)
class Envelope:
    """A signed message on the wire: `{"signed": b64, "signature": b64, "key_id": hex}`.

    `signed` holds the exact bytes the Ed25519 signature covers (for releases, UTF-8 JSON). Every
    field a receiver acts on is inside them; `key_id` only names the signer for error messages,
    and other fields outside `signed` are ignored.
    """

    signed: bytes
    signature: str
    key_id: str = ""

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the signed bytes followed by the raw signature: this exact message.

        A copy with other signed bytes or another signature has another digest, so a forged copy
        can never speak for the genuine message.
        """
        raw = base64.b64decode(self.signature) if _is_base64(self.signature) else b""
        return hashlib.sha256(self.signed + raw).hexdigest()

    def to_bytes(self) -> bytes:
        """Encode for the wire (ASCII JSON)."""
        return json.dumps(
            {
                "signed": base64.b64encode(self.signed).decode("ascii"),
                "signature": self.signature,
                "key_id": self.key_id,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "message") -> Envelope:
        """Decode an envelope (without verifying it).

        Args:
            data: the message payload as received.
            what: what the message is, for error messages ("release").

        Raises:
            MessageError: not a JSON object, or `signed`, `signature` or `key_id` is missing,
                not a string or not base64 (the message names the field).
        """
        try:
            raw: Any = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MessageError(f"{what} is malformed: not JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise MessageError(f"{what} is malformed: not a JSON object")
        for name in ("signed", "signature"):
            if not isinstance(raw.get(name), str):
                raise MessageError(
                    f"{what} is malformed: field '{name}' must be a string, not"
                    f" {type(raw.get(name)).__name__}"
                )
        key = raw.get("key_id", "")
        if not isinstance(key, str):
            raise MessageError(f"{what} is malformed: field 'key_id' must be a string")
        try:
            signed = base64.b64decode(raw["signed"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MessageError(f"{what} is malformed: field 'signed' is not base64") from exc
        return cls(signed, raw["signature"], key)

    def verify(self, key: Ed25519PublicKey) -> bytes:
        """Check the signature over the signed bytes; return them.

        Raises:
            SignatureError: unsigned, not signed by `key`, or altered after signing.
        """
        try:
            verify(key, self.signed, self.signature)
        except SignatureError as exc:
            if self.key_id and self.key_id != key_id(key):
                raise SignatureError(f"{exc} (signed with key {self.key_id})") from None
            raise
        return self.signed


def seal(key: Ed25519PrivateKey, signed: bytes) -> Envelope:
    """Sign bytes and wrap them in an envelope."""
    return Envelope(signed, sign(key, signed), key_id(key.public_key()))


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _read_key_file(path: str | Path) -> bytes:
    target = Path(path).expanduser()
    try:
        return target.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {target} not found (create one with `edgefl keys init`)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {target}: {exc.strerror or exc}") from exc
