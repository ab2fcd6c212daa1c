"""Who is believed: the checks every sealed message passes before anything acts on it.

- `DeviceVerifier` (aggregator, `fleet`, `deploy`): a device's status, update, error update or
  deploy report must be sealed by the key its device ID is enrolled (or pinned) with. Modes:
  `strict` (only enrolled or pinned devices), `tofu` (trust on first use: an unknown device's
  first correctly signed message pins its key, and the log says so) and `insecure` (nothing is
  checked; the seal, if any, is only removed).
- `TrustedSigners` (boards): a task or result must be sealed by one of the keys the board trusts
  (the aggregator's; by default the `edgefl keys` pair that also signs releases).

A refusal raises `SealError` with the code (`bad-signature` or `unknown-device`) and a reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefl.security.device_registry import REVOKED, DeviceKey, DeviceRegistry
from edgefl.transport.sealed import (
    BAD_SIGNATURE,
    UNKNOWN_DEVICE,
    SealError,
    fingerprint,
    raw_public_key,
    strip_seal,
    unseal,
)

log = logging.getLogger(__name__)

STRICT = "strict"
TOFU = "tofu"
INSECURE = "insecure"
MODES = (STRICT, TOFU, INSECURE)

# An unknown device makes the verifier read the registry again (it may just have been enrolled),
# at most this often: a stranger flooding unknown IDs must not turn into a query per message.
REFRESH_S = 1.0


class DeviceVerifier:
    """Checks that a device's message is sealed by the key the registry holds for it."""

    def __init__(self, registry: DeviceRegistry | None, mode: str = STRICT) -> None:
        """Args:
        registry: the device keys (None only with mode `insecure`).
        mode: `strict`, `tofu` or `insecure`.
        """
        if mode not in MODES:
            raise ValueError(f"enrollment must be one of {', '.join(MODES)}, not {mode!r}")
        if registry is None and mode != INSECURE:
            raise ValueError(f"enrollment {mode!r} needs a device registry")
        self.registry = registry
        self.mode = mode
        self._lock = threading.Lock()
        self._known: dict[str, DeviceKey] = {}
        self._refreshed = float("-inf")
        self.refresh()

    @property
    def insecure(self) -> bool:
        """Whether nothing is checked."""
        return self.mode == INSECURE

    def refresh(self) -> None:
        """Read the registry again (enrollments and revocations made by another process)."""
        if self.registry is None:
            return
        entries = {entry.device_id: entry for entry in self.registry.all()}
        with self._lock:
            self._known = entries
            self._refreshed = time.monotonic()

    def state(self, device_id: str) -> str:
        """Return how a device is known: enrolled, pinned, revoked or unknown (fleet view)."""
        with self._lock:
            entry = self._known.get(device_id)
        return "unknown" if entry is None else entry.state

    def open(self, topic: str, device_id: str, data: bytes) -> bytes:
        """Return the payload of `device_id`'s sealed message on `topic` once it verifies.

        Raises:
            SealError: `bad-signature` (unsigned, forged, altered, moved from another topic, or
                signed by another key than the device's) or `unknown-device` (not enrolled, or
                revoked).
        """
        if self.mode == INSECURE:
            return strip_seal(data)
        sealed = unseal(data)
        entry = self._lookup(device_id)
        if entry is None and self.mode == TOFU:
            sealed.verify(topic, sealed.public_key)
            assert self.registry is not None
            if self.registry.pin(device_id, sealed.public_key):
                log.warning("trust on first use: pinned key %s for device %s",
                            fingerprint(sealed.public_key), device_id)  # fmt: skip
            self.refresh()
            entry = self._lookup(device_id)
        entry = self.check_known(device_id, entry)
        if sealed.public_key != entry.public_key:
            raise SealError(
                BAD_SIGNATURE,
                f"signed with key {fingerprint(sealed.public_key)}, but device {device_id} is "
                f"{entry.state} with key {entry.key_id}",
            )
        return sealed.verify(topic, entry.public_key)

    def check_known(self, device_id: str, entry: DeviceKey | None = None) -> DeviceKey:
        """Return a device's registry entry (looked up unless given) if it may speak.

        Raises:
            SealError: `unknown-device`, not enrolled (or pinned), or revoked.
        """
        entry = entry or self._lookup(device_id)
        if entry is None:
            raise SealError(UNKNOWN_DEVICE, f"device {device_id} is not enrolled")
        if entry.state == REVOKED:
            raise SealError(UNKNOWN_DEVICE, f"device {device_id} was revoked")
        return entry

    def _lookup(self, device_id: str) -> DeviceKey | None:
        with self._lock:
            entry = self._known.get(device_id)
            stale = time.monotonic() - self._refreshed >= REFRESH_S
        if entry is None and stale:
            self.refresh()
            with self._lock:
                entry = self._known.get(device_id)
        return entry


class TrustedSigners:
    """The keys a board believes for tasks and results."""

    def __init__(self, keys: Iterable[Ed25519PublicKey], insecure: bool = False) -> None:
        """Args:
        keys: the trusted public keys (the aggregator's).
        insecure: accept unsigned messages and do not check seals.
        """
        self._keys = {raw_public_key(key): key for key in keys}
        self.insecure = insecure
        if not self._keys and not insecure:
            raise ValueError("no trusted key: give the aggregator's public key, or run insecure")

    def open(self, topic: str, data: bytes) -> bytes:
        """Return the payload of a sealed message on `topic` once it verifies.

        Raises:
            SealError: `bad-signature`: unsigned, not signed by a trusted key, or altered.
        """
        if self.insecure:
            return strip_seal(data)
        sealed = unseal(data)
        key = self._keys.get(sealed.public_key)
        if key is None:
            raise SealError(
                BAD_SIGNATURE,
                f"signed with key {fingerprint(sealed.public_key)}, which this board does not "
                "trust",
            )
        return sealed.verify(topic, key)
