"""How an aggregator runs a federation: `AggregatorConfig`, composed of `edgefl.core.settings`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefl.core.accounting import check_budget_settings
from edgefl.core.settings import AcceptancePolicy, RoundPolicy, RoundSettings
from edgefl.core.strategies import StrategySpec, check_strategy_spec
from edgefl.security.identity import AggregatorAuth
from edgefl.transport import topics
from edgefl.transport.tls import TlsSettings


@dataclass
class AggregatorConfig:
    """How the aggregator runs a federation, composed of the parts in `edgefl.core.settings`.

    Attributes:
        broker_url: `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet name.
        bundle_dir: the bundle whose heads are federated.
        policy: how rounds run (rounds, fraction, min_devices, deadline_s, quorum,
            wait_devices_s, settle_s, stale_after_s, target_epsilon, target_delta).
        settings: what a task asks of boards (training, privacy, codec); `settings.train.seed`
            also seeds device selection.
        acceptance: what updates are accepted and how far one may pull (max_update_bytes,
            max_norm, allow, influence_factor, max_samples).
        strategy: a name from `STRATEGY_NAMES`, a `Strategy` instance, or a factory (a
            `Strategy` subclass or function) called with `strategy_params` once per task;
            see `edgefl.core.strategies.build_strategies`.
        strategy_params: the strategy's arguments (with a name or a factory).
        eval_task: the task whose head is evaluated on `eval_dataset`.
        state_path: the SQLite file (None: in memory).
        out_dir: where metrics.csv/json and the final heads are written (None: nowhere).
        tls: the CA file and client certificate for an `mqtts://` broker.
        auth: the key that seals tasks and results and the check of devices' seals
            (`edgefl.security.identity.AggregatorAuth`); None runs insecure (logged).
    """

    broker_url: str
    fleet: str
    bundle_dir: Path
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    settings: RoundSettings = field(default_factory=RoundSettings)
    acceptance: AcceptancePolicy = field(default_factory=AcceptancePolicy)
    strategy: StrategySpec = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    eval_task: str = "default"
    state_path: Path | None = None
    out_dir: Path | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AggregatorAuth | None = None

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        topics.check_name(self.fleet, "fleet")
        self.policy.check()
        self.settings.train.check()
        self.settings.privacy.check()
        self.settings.codec.check()
        self.acceptance.check()
        check_budget_settings(self.policy, self.settings.privacy)
        check_strategy_spec(self.strategy, self.strategy_params)
