"""Updates authenticated by a MAC: a key each board shares with the aggregator alone.

Updates are the one high-rate message: checking an Ed25519 seal on each costs the aggregator
~70 µs (docs/protocol.md, "Sealed messages"); an HMAC-SHA256 costs a few. So a board and the
aggregator agree on a key once, from two X25519 keys each derives from its Ed25519 key and
announces under its Ed25519 seal: the board in its status (`mac_key`), the aggregator in its task
(`mac_key`). Both sides compute X25519(own, peer) and derive the key with HKDF-SHA256, bound to
the device ID. A MAC'd update is

    magic "EFM1" (4 bytes) | HMAC-SHA256(key, "edgefl-mac-v1" NUL topic NUL payload) (32) | payload

or, around a compact update frame (`edgefl.transport.update_frame`), whose whole point is to be
small, the same HMAC cut to its first 16 bytes (HMAC-SHA256-128, as IPsec's RFC 4868 uses):

    magic "EFM2" (4 bytes) | first 16 bytes of HMAC-SHA256(key, "edgefl-mac-v2" NUL topic NUL
    payload) | payload

Only the board and the aggregator hold the key, so only they can make or check such an update
(others with the registry, `fleet` or `deploy`, never read updates). Like a seal, the MAC covers
the topic, so an update replayed in another round fails. Pure: bytes and keys in, bytes out.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefl.transport.sealed import BAD_SIGNATURE, SealError
from edgefl.transport.update_frame import is_compact

MAC_MAGIC = b"EFM1"
MAC_DOMAIN = b"edgefl-mac-v1\0"
MAC_BYTES = 32
MAC_PREFIX_BYTES = len(MAC_MAGIC) + MAC_BYTES  # 36
SHORT_MAC_MAGIC = b"EFM2"
SHORT_MAC_DOMAIN = b"edgefl-mac-v2\0"
SHORT_MAC_BYTES = 16
# magic -> (domain, tag bytes)
_FORMS = {MAC_MAGIC: (MAC_DOMAIN, MAC_BYTES), SHORT_MAC_MAGIC: (SHORT_MAC_DOMAIN, SHORT_MAC_BYTES)}


def exchange_key(key: Ed25519PrivateKey) -> X25519PrivateKey:
    """Return the X25519 key a role derives from its Ed25519 key (HKDF of its private bytes)."""
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    derived = HKDF(hashes.SHA256(), 32, salt=None, info=b"edgefl x25519 v1").derive(raw)
    return X25519PrivateKey.from_private_bytes(derived)


def exchange_public_hex(key: X25519PrivateKey) -> str:
    """Return an X25519 key's public half as hex (the `mac_key` of statuses and tasks)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()  # fmt: skip


def shared_mac_key(own: X25519PrivateKey, peer_hex: str, device_id: str) -> bytes:
    """Return the MAC key of `device_id` with the peer whose `mac_key` is `peer_hex`.

    Raises:
        SealError: `bad-signature`, the peer's key is not a valid X25519 public key.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(peer_hex))
        shared = own.exchange(peer)
    except ValueError as exc:
        raise SealError(BAD_SIGNATURE, f"mac_key is not an X25519 public key: {exc}") from None
    info = b"edgefl update mac v1\0" + device_id.encode("utf-8")
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def mac_seal(key: bytes, topic: str, payload: bytes) -> bytes:
    """Return `payload` with its MAC for `topic` (an empty payload stays empty): the 16-byte
    form around a compact update frame, the 32-byte one around anything else."""
    if not payload:
        return payload
    magic = SHORT_MAC_MAGIC if is_compact(payload) else MAC_MAGIC
    domain, size = _FORMS[magic]
    return magic + _mac(key, domain, topic, payload)[:size] + payload


def is_mac_sealed(data: bytes) -> bool:
    """Whether `data` starts like a MAC'd update (either form)."""
    return bytes(data[: len(MAC_MAGIC)]) in _FORMS


def mac_open(key: bytes, topic: str, data: bytes) -> bytes:
    """Return the payload of a MAC'd update once its MAC verifies for `topic`.

    Raises:
        SealError: `bad-signature`, not MAC'd, truncated, or the MAC does not match.
    """
    form = _FORMS.get(bytes(data[: len(MAC_MAGIC)]))
    if form is None or len(data) <= len(MAC_MAGIC) + form[1]:
        raise SealError(BAD_SIGNATURE, "the update carries no MAC")
    domain, size = form
    start = len(MAC_MAGIC) + size
    payload = data[start:]
    if not hmac.compare_digest(
        data[len(MAC_MAGIC) : start], _mac(key, domain, topic, payload)[:size]
    ):
        raise SealError(
            BAD_SIGNATURE,
            f"the MAC does not match the update on {topic} (forged, altered, moved from another "
            "topic, or made with another key)",
        )
    return payload


def _mac(key: bytes, domain: bytes, topic: str, payload: bytes) -> bytes:
    mac = hmac.new(key, domain, hashlib.sha256)
    mac.update(topic.encode("utf-8"))
    mac.update(b"\0")
    mac.update(payload)
    return mac.digest()
