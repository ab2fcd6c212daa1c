"""Sealed messages: an Ed25519 signature over a message's topic and exact bytes.

Every control-plane message of an authenticated fleet travels sealed: tasks and results by the
aggregator's key, statuses, updates (error updates too) and deploy reports by the device's own
key. A seal is a fixed binary prefix before the unchanged payload (docs/protocol.md, "Sealed
messages"):

    magic "EFS1" (4 bytes) | signer's raw public key (32) | signature (64) | payload

The signature covers `b"edgefl-seal-v1\\0" + topic + b"\\0" + payload`: a sealed message moved to
another topic (an update replayed in a later round, a status re-published under another device)
no longer verifies. The receiver checks the seal first and parses the payload only after. An
empty payload (clearing a retained topic) is never sealed. Neither JSON (`{`) nor safetensors
(an 8-byte little-endian header length, far below "EFS1" read as a number) can start with the
magic, so a reader tells sealed from plain messages by their first four bytes.

This module is pure: bytes in, bytes out; who is trusted is decided in
`edgefl.security.verifiers`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_sodium_open: Callable[[bytes, bytes], bytes] | None
try:  # libsodium, when installed (the host extra): the faster Ed25519 verification
    from nacl.bindings import crypto_sign_open as _sodium_open
    from nacl.exceptions import BadSignatureError

    _SODIUM_ERRORS: tuple[type[Exception], ...] = (BadSignatureError, ValueError)
except ImportError:  # a board: `cryptography` alone
    _sodium_open = None
    _SODIUM_ERRORS = ()

MAGIC = b"EFS1"
DOMAIN = b"edgefl-seal-v1\0"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
PREFIX_BYTES = len(MAGIC) + KEY_BYTES + SIGNATURE_BYTES  # 100


class SealError(Exception):
    """A message is not sealed, or its seal does not verify; `code` is the refusal code."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


BAD_SIGNATURE = "bad-signature"
UNKNOWN_DEVICE = "unknown-device"


@dataclass(frozen=True)
class Sealed:
    """A sealed message split into its parts (not yet verified)."""

    public_key: bytes  # the signer's raw 32-byte Ed25519 public key
    signature: bytes
    payload: bytes

    def verify(self, topic: str, key: Ed25519PublicKey | bytes) -> bytes:
        """Check the signature with the trusted `key` (an object or its raw 32 bytes); return the
        payload.

        libsodium (PyNaCl, in the `host` extra: the aggregator checks every update) verifies in
        about half the time of OpenSSL's Ed25519; without it, `cryptography` does.

        Raises:
            SealError: `bad-signature`, the signature does not match topic and payload.
        """
        signed = _signed_bytes(topic, self.payload)
        if _sodium_open is not None:
            raw = key if isinstance(key, bytes) else raw_public_key(key)
            try:
                _sodium_open(self.signature + signed, raw)
                return self.payload
            except _SODIUM_ERRORS:
                pass
        else:
            public = (
                key
                if isinstance(key, Ed25519PublicKey)
                else Ed25519PublicKey.from_public_bytes(key)
            )
            try:
                public.verify(self.signature, signed)
                return self.payload
            except InvalidSignature:
                pass
        raise SealError(
            BAD_SIGNATURE,
            f"the signature of key {fingerprint(self.public_key)} does not match the "
            f"message on {topic} (forged, altered or moved from another topic)",
        )


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """Return a key's raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw: bytes) -> str:
    """Return a short printable ID of a raw public key (the same as `signing.key_id`)."""
    return hashlib.sha256(raw).hexdigest()[:16]


def seal(key: Ed25519PrivateKey, topic: str, payload: bytes, raw_key: bytes | None = None) -> bytes:
    """Return `payload` sealed for `topic` with `key` (an empty payload stays empty).

    Args:
        key: the signer's private key.
        topic: the topic the message is published on.
        payload: the message bytes.
        raw_key: the key's raw public bytes, when the caller keeps them (saves a conversion).
    """
    if not payload:
        return payload
    public = raw_key if raw_key is not None else raw_public_key(key)
    return MAGIC + public + key.sign(_signed_bytes(topic, payload)) + payload


def is_sealed(data: bytes) -> bool:
    """Whether `data` starts like a sealed message."""
    return data[: len(MAGIC)] == MAGIC


def unseal(data: bytes) -> Sealed:
    """Split a sealed message into its parts; the signature is not checked here.

    Raises:
        SealError: `bad-signature`, the message is not sealed or too short to be.
    """
    if not is_sealed(data):
        raise SealError(BAD_SIGNATURE, "the message is not signed")
    if len(data) <= PREFIX_BYTES:
        raise SealError(BAD_SIGNATURE, f"a sealed message of {len(data)} bytes is truncated")
    start = len(MAGIC)
    return Sealed(
        public_key=data[start : start + KEY_BYTES],
        signature=data[start + KEY_BYTES : PREFIX_BYTES],
        payload=data[PREFIX_BYTES:],
    )


def strip_seal(data: bytes) -> bytes:
    """Return a message's payload without checking any seal (for readers that only display)."""
    return data[PREFIX_BYTES:] if is_sealed(data) and len(data) > PREFIX_BYTES else data


def _signed_bytes(topic: str, payload: bytes) -> bytes:
    return DOMAIN + topic.encode("utf-8") + b"\0" + payload
