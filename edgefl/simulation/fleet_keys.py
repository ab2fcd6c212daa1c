"""The keys of a simulated fleet: the aggregator's and one per device, every device enrolled.

A simulation runs the authenticated protocol of a real fleet (sealed tasks, results, statuses
and updates, strict enrollment) with keys made for the run and kept in memory; `insecure` runs
it without, as `--insecure` does for the real roles.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AgentAuth, AggregatorAuth
from edgefl.security.verifiers import STRICT, DeviceVerifier, TrustedSigners
from edgefl.transport.sealed import raw_public_key


class SimulatedFleetKeys:
    """Makes the aggregator's key, and each device's key enrolled as the device is made."""

    def __init__(self, insecure: bool = False) -> None:
        """Args:
        insecure: seal and check nothing (every `agent`/`aggregator` call returns None).
        """
        self.insecure = insecure
        self._key = Ed25519PrivateKey.generate()
        self._registry = DeviceRegistry(":memory:")
        self._trusted = TrustedSigners([self._key.public_key()])
        self._aggregator: AggregatorAuth | None = None

    def aggregator(self) -> AggregatorAuth | None:
        """The aggregator's auth (one object: its verifier sees every device enrolled later)."""
        if self.insecure:
            return None
        if self._aggregator is None:
            self._aggregator = AggregatorAuth(self._key, DeviceVerifier(self._registry, STRICT))
        return self._aggregator

    def agent(self, device_id: str) -> AgentAuth | None:
        """A new key for `device_id`, enrolled; the auth its agent runs with."""
        if self.insecure:
            return None
        key = Ed25519PrivateKey.generate()
        self._registry.enroll(device_id, raw_public_key(key))
        if self._aggregator is not None:
            self._aggregator.devices.refresh()
        return AgentAuth(key, self._trusted)
