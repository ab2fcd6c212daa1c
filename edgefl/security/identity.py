"""A role's identity on the wire: the key it seals with and whom it believes.

- A board's key (`device.key`, Ed25519, mode 0600) lives in its state directory and is created
  on first start unless one is given (`edgefl flash` can create it on the host and print the
  public key to enroll). `AgentAuth` holds it with the keys the board trusts.
- The aggregator seals tasks and results with the fleet's signing key (by default the
  `edgefl keys` pair that signs releases) and checks devices through a `DeviceVerifier`:
  `AggregatorAuth`.

A role given no auth runs insecure: nothing is sealed or checked, and its log says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl import signing
from edgefl.security.update_mac import (
    exchange_key,
    exchange_public_hex,
    is_mac_sealed,
    mac_open,
    mac_seal,
    shared_mac_key,
)
from edgefl.security.verifiers import INSECURE, DeviceVerifier, TrustedSigners
from edgefl.transport import topics
from edgefl.transport.sealed import (
    BAD_SIGNATURE,
    SealError,
    fingerprint,
    raw_public_key,
    seal,
)

log = logging.getLogger(__name__)

DEVICE_KEY_FILE = "device.key"
DEVICE_PUBLIC_KEY_FILE = "device.pub"


def device_key(state_dir: Path | None, key_file: Path | None = None) -> Ed25519PrivateKey:
    """Return a board's key: `key_file`, else `state_dir/device.key` (created on first start).

    Raises:
        KeyFileError: the key file cannot be read or written.
        ValueError: neither a key file nor a state directory (the key would not survive).
    """
    if key_file is not None:
        return signing.load_private_key(key_file)
    if state_dir is None:
        raise ValueError("a board keeps its key in `state_dir` (or give `device_key` a file)")
    path = Path(state_dir).expanduser() / DEVICE_KEY_FILE
    if not path.exists():
        paths = signing.init_keys(path.parent, DEVICE_KEY_FILE, DEVICE_PUBLIC_KEY_FILE)
        log.warning("created this board's key %s (key id %s): enroll %s on the aggregator",
                    paths.private, key_fingerprint(signing.load_private_key(paths.private)),
                    paths.public)  # fmt: skip
    return signing.load_private_key(path)


def key_fingerprint(key: Ed25519PrivateKey) -> str:
    """Return the fingerprint of a private key's public half."""
    return fingerprint(raw_public_key(key))


class Sealer:
    """Seals messages with one key; without a key (insecure) messages go out as they are.

    `mac_public` is the X25519 key derived from it that the role announces (statuses, tasks) so
    that updates can carry a MAC under a key shared by one board and the aggregator.
    """

    def __init__(self, key: Ed25519PrivateKey | None) -> None:
        self.key = key
        self.raw = raw_public_key(key) if key is not None else b""
        self.exchange = exchange_key(key) if key is not None else None
        self.mac_public = exchange_public_hex(self.exchange) if self.exchange is not None else ""
        self._mac_keys: dict[str, tuple[str, bytes]] = {}  # device -> (peer's mac_key, key)

    def _mac_key(self, device_id: str, peer_hex: str) -> bytes:
        """The key shared with the peer announcing `peer_hex`, for `device_id` (cached)."""
        assert self.exchange is not None
        known = self._mac_keys.get(device_id)
        if known is None or known[0] != peer_hex:
            known = (peer_hex, shared_mac_key(self.exchange, peer_hex, device_id))
            self._mac_keys[device_id] = known
        return known[1]

    def seal(self, topic: str, payload: bytes) -> bytes:
        """Return `payload` sealed for `topic` (unchanged when insecure or empty)."""
        if self.key is None:
            return payload
        return seal(self.key, topic, payload, self.raw)


class AgentAuth(Sealer):
    """A board's key (seals its statuses, updates and reports) and the keys it trusts."""

    def __init__(self, key: Ed25519PrivateKey | None, trusted: TrustedSigners) -> None:
        """Args:
        key: the board's key (None: insecure, nothing sealed).
        trusted: whose tasks and results it acts on.
        """
        super().__init__(key)
        self.trusted = trusted
        self.refused: Counter[str] = Counter()  # refused tasks and results, by code

    @classmethod
    def insecure(cls) -> AgentAuth:
        """Seal nothing and believe every task and result (logged by the agent)."""
        return cls(None, TrustedSigners((), insecure=True))

    @property
    def is_insecure(self) -> bool:
        """Whether nothing is sealed or checked."""
        return self.key is None and self.trusted.insecure

    def seal_update(self, topic: str, payload: bytes, aggregator_mac_key: str) -> bytes:
        """Return an update for `topic`: MAC'd under the key shared with the aggregator when its
        task announced one (`RoundTask.mac_key`), else sealed (unchanged when insecure)."""
        parsed = topics.parse(topic)
        if self.key is None or not aggregator_mac_key or parsed is None or not parsed.device_id:
            return self.seal(topic, payload)
        try:
            return mac_seal(self._mac_key(parsed.device_id, aggregator_mac_key), topic, payload)
        except SealError:  # not a key: the task is sealed by a trusted key, so never here
            return self.seal(topic, payload)

    def open(self, topic: str, data: bytes) -> bytes:
        """Return a task's or result's payload once its seal verifies (`TrustedSigners`).

        Raises:
            SealError: refused (counted in `refused`).
        """
        try:
            return self.trusted.open(topic, data)
        except SealError as exc:
            self.refused[exc.code] += 1
            raise


class AggregatorAuth(Sealer):
    """The aggregator's key (seals tasks and results) and its check of devices."""

    def __init__(self, key: Ed25519PrivateKey | None, devices: DeviceVerifier) -> None:
        """Args:
        key: the aggregator's key (None: insecure, nothing sealed).
        devices: whose statuses and updates it believes.
        """
        super().__init__(key)
        self.devices = devices
        # Its own seal, checked as a board checks it (retained tasks and results of other runs).
        self._own = TrustedSigners([key.public_key()]) if key is not None else None
        self.refused: Counter[str] = Counter()  # refused statuses and updates, by code

    @classmethod
    def insecure(cls) -> AggregatorAuth:
        """Seal nothing and believe every device (logged by the aggregator)."""
        return cls(None, DeviceVerifier(None, INSECURE))

    @property
    def is_insecure(self) -> bool:
        """Whether nothing is sealed or checked."""
        return self.key is None and self.devices.insecure

    def learn_mac_key(self, device_id: str, peer_hex: str) -> None:
        """Agree the update MAC key with a device whose verified status announced `peer_hex`."""
        if self.exchange is None or not peer_hex:
            self._mac_keys.pop(device_id, None)
            return
        try:
            self._mac_key(device_id, peer_hex)
        except SealError:
            self._mac_keys.pop(device_id, None)

    def open(self, topic: str, device_id: str, data: bytes) -> bytes:
        """Return a device's message payload once its seal (or, for an update, its MAC under the
        key agreed with the device) verifies (`DeviceVerifier`).

        Raises:
            SealError: refused (counted in `refused`).
        """
        try:
            if self.exchange is not None and is_mac_sealed(data):
                self.devices.check_known(device_id)  # revoked: its key is no longer believed
                known = self._mac_keys.get(device_id)
                if known is None:
                    why = f"no MAC key agreed with {device_id} (no status announced one)"
                    raise SealError(BAD_SIGNATURE, why)
                return mac_open(known[1], topic, data)
            return self.devices.open(topic, device_id, data)
        except SealError as exc:
            self.refused[exc.code] += 1
            raise

    def sealed_by_me(self, topic: str, data: bytes) -> bool:
        """Whether `data` carries this aggregator's valid seal (insecure: always)."""
        if self._own is None:
            return True
        try:
            self._own.open(topic, data)
        except SealError:
            return False
        return True
