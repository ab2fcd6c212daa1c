"""Boards of a signed fleet for the tests: the fleet's key, every board enrolled with its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundles import digits_devices
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.roles.agent import Agent, AgentConfig
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AgentAuth, AggregatorAuth
from edgefl.security.verifiers import STRICT, DeviceVerifier, TrustedSigners
from edgefl.transport.sealed import raw_public_key
from edgefl.transport.tls import TlsSettings


@dataclass
class SignedFleet:
    """The fleet's key, the registry (in `state`) and the agents, not started."""

    key: Ed25519PrivateKey
    state: Path
    registry: DeviceRegistry
    agents: list[Agent]

    def aggregator_auth(self) -> AggregatorAuth:
        """The aggregator's auth: the fleet key, strict enrollment against the registry."""
        return AggregatorAuth(self.key, DeviceVerifier(self.registry, STRICT))


def signed_fleet(
    url: str, fleet: str, bundle_dir: Path, state: Path, names: tuple[str, ...],
    tls: dict[str, TlsSettings] | None = None,
) -> SignedFleet:  # fmt: skip
    """Make the fleet key and one enrolled agent per name, each on its share of digits."""
    key = Ed25519PrivateKey.generate()
    registry = DeviceRegistry(state)
    trusted = TrustedSigners([key.public_key()])
    datasets, _ = digits_devices(len(names))
    agents = []
    for name, dataset in zip(names, datasets, strict=True):
        device_key = Ed25519PrivateKey.generate()
        registry.enroll(name, raw_public_key(device_key))
        config = AgentConfig(url, fleet, name, bundle_dir=bundle_dir,
                             tls=(tls or {}).get(name, TlsSettings()),
                             auth=AgentAuth(device_key, trusted))  # fmt: skip
        agents.append(Agent(config, dataset))
    return SignedFleet(key, state, registry, agents)
