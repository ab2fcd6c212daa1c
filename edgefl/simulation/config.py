"""How a simulation runs: the federation's settings and what the simulated fleet is like."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefl.core.accounting import check_budget_settings
from edgefl.core.settings import AcceptancePolicy, AsyncPolicy, RoundPolicy, RoundSettings
from edgefl.core.strategies import StrategySpec
from edgefl.errors import SimulationError
from edgefl.simulation.shard import ShardSpec
from edgefl.transport.memory import memory_broker_name
from edgefl.transport.tls import TlsSettings


@dataclass
class SimulationConfig:
    """How a simulation runs; the defaults are the FL-digits workload of DESIGN.md.

    The federation's parts are the aggregator's own (`edgefl.core.settings`); the rest says what
    the simulated fleet is like.

    Attributes:
        devices: how many simulated devices.
        policy: how rounds run (rounds, fraction, deadline_s, quorum, ...); `min_devices` is
            replaced by the number of devices online in round 1.
        settings: what tasks ask of the devices: training (its seed seeds selection and the
            devices' minibatch order), privacy, codec.
        acceptance: what the aggregator accepts (norm bound, influence bounds, size); its
            allow-list is replaced by the simulated devices.
        strategy: a strategy name (edgefl.core.strategies), a `Strategy`, or a factory;
            `strategy_params` its arguments (see `AggregatorConfig`).
        partition: "iid", "dirichlet:ALPHA" or "shards:K" (see edgefl.simulation.plan).
        speed_spread: slowest/fastest device ratio; 1 makes all devices equally fast.
        speed_unit_s: what one unit of slowness costs: a device of speed s delays its update by
            (s - 1) * speed_unit_s seconds.
        dropout: probability that a selected device skips a round.
        churn: join/leave schedule, e.g. "join:0.2@3,leave:0.1@5".
        personalize: devices keep a personal head fine-tuned from the global one.
        seed: seeds the partition and the heterogeneity (speeds, dropouts, churn).
        fleet: the fleet name on the wire.
        broker_url: use this broker; None starts the embedded one for the run, "memory" a fresh
            in-process one, "memory://NAME" the in-process one of that name (started if none
            runs; see `edgefl.simulation.run_broker`).
        preinstalled: devices start with the bundle installed; False starts them empty, to
            receive it by a deploy (see `Simulation`'s `before_rounds`).
        tls: the CA file and client certificate every client uses with an `mqtts://`
            `broker_url` (one shared certificate: not for brokers with per-device ACLs).
        insecure: nothing sealed or checked; by default every message is sealed with keys made
            for the run and every device is enrolled (`edgefl.simulation.fleet_keys`).
        asynchronous: sync rounds, or async (FedBuff) with its buffer and staleness; in async
            mode a device is busy for its delay after each task and then takes the newest one
            (`edgefl.simulation.async_agent`), and dropout skips a head version.
        shard: run only this slice of the fleet (`edgefl.simulation.shard`): shard 1 of N also
            runs the aggregator; every shard needs the same plan and a broker they share, and
            keys are derived from the seed and fleet so that the shards trust each other.
    """

    devices: int = 10
    policy: RoundPolicy = field(default_factory=lambda: RoundPolicy(rounds=5, deadline_s=10.0))
    settings: RoundSettings = field(default_factory=RoundSettings)
    acceptance: AcceptancePolicy = field(default_factory=AcceptancePolicy)
    strategy: StrategySpec = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    partition: str = "dirichlet:0.5"
    speed_spread: float = 1.0
    speed_unit_s: float = 0.1
    dropout: float = 0.0
    churn: str = ""
    personalize: bool = True
    seed: int = 0
    fleet: str = "sim"
    broker_url: str | None = None
    preinstalled: bool = True
    tls: TlsSettings = field(default_factory=TlsSettings)
    insecure: bool = False
    asynchronous: AsyncPolicy = field(default_factory=AsyncPolicy)
    shard: ShardSpec | None = None

    def check(self) -> None:
        """Raise SimulationError naming the first invalid setting."""
        if self.devices < 1:
            raise SimulationError("`devices` must be at least 1")
        if self.policy.rounds < 1:
            raise SimulationError("`rounds` must be at least 1")
        if self.policy.deadline_s <= 0:
            raise SimulationError("`deadline_s` must be positive")
        if self.speed_unit_s < 0:
            raise SimulationError("the speed unit must not be negative")
        if self.shard is not None:
            self._check_shard()
        try:
            self.asynchronous.check()
            check_budget_settings(self.policy, self.settings.privacy)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None

    def _check_shard(self) -> None:
        name = memory_broker_name(self.broker_url) if self.broker_url else None
        if self.broker_url is None or name == "":
            raise SimulationError("--shard needs --broker: the broker every shard shares")
        if self.churn:
            raise SimulationError("--shard runs no churn: a shard cannot start another's devices")
        if self.asynchronous.is_async:
            raise SimulationError("--shard runs synchronous rounds only")
