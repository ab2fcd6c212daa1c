"""The keys of a simulated fleet: the aggregator's and one per device, every device enrolled.

A simulation runs the authenticated protocol of a real fleet (sealed tasks, results, statuses
and updates, strict enrollment) with keys made for the run and kept in memory; `insecure` runs
it without, as `--insecure` does for the real roles. A sharded simulation (several processes,
`edgefl.simulation.shard`) derives every key from a phrase all its shards share instead, so the
aggregator in one process trusts the devices of the others and they trust it. Derived keys are
as secret as the phrase (the seed and fleet): they make the protocol run, they protect nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AgentAuth, AggregatorAuth
from edgefl.security.verifiers import STRICT, DeviceVerifier, TrustedSigners
from edgefl.transport.sealed import raw_public_key


class SimulatedFleetKeys:
    """Makes the aggregator's key, and each device's key enrolled as the device is made."""

    def __init__(self, insecure: bool = False, derive_from: str | None = None) -> None:
        """Args:
        insecure: seal and check nothing (every `agent`/`aggregator` call returns None).
        derive_from: derive every key from this phrase (the same keys in every process that
            passes it) instead of making fresh random ones.
        """
        self.insecure = insecure
        self._phrase = derive_from
        self._key = self._make("aggregator")
        self._registry = DeviceRegistry(":memory:")
        self._trusted = TrustedSigners([self._key.public_key()])
        self._aggregator: AggregatorAuth | None = None

    def _make(self, role: str) -> Ed25519PrivateKey:
        if self._phrase is None:
            return Ed25519PrivateKey.generate()
        seed = hashlib.sha256(f"edgefl-simulation\0{self._phrase}\0{role}".encode()).digest()
        return Ed25519PrivateKey.from_private_bytes(seed)

    @property
    def trusted(self) -> TrustedSigners:
        """What the devices trust: the aggregator's key (accepting anything when insecure)."""
        return TrustedSigners((), insecure=True) if self.insecure else self._trusted

    def aggregator(self) -> AggregatorAuth | None:
        """The aggregator's auth (one object: its verifier sees every device enrolled later)."""
        if self.insecure:
            return None
        if self._aggregator is None:
            self._aggregator = AggregatorAuth(self._key, DeviceVerifier(self._registry, STRICT))
        return self._aggregator

    def enroll(self, device_ids: Iterable[str]) -> None:
        """Enroll devices another process runs (their keys derived as it derives them)."""
        if self.insecure:
            return
        for device_id in device_ids:
            self._registry.enroll(device_id, raw_public_key(self._make(f"device\0{device_id}")))
        if self._aggregator is not None:
            self._aggregator.devices.refresh()

    def agent(self, device_id: str) -> AgentAuth | None:
        """A new key for `device_id`, enrolled; the auth its agent runs with."""
        if self.insecure:
            return None
        key = self._make(f"device\0{device_id}")
        self._registry.enroll(device_id, raw_public_key(key))
        if self._aggregator is not None:
            self._aggregator.devices.refresh()
        return AgentAuth(key, self._trusted)
