"""Run a simulated fleet: a broker, N real agents and the real aggregator, in one process.

Nothing here re-implements federation. Every device is an `edgefl.roles.agent.Agent` with its own
client (MQTT, or the in-process broker of `edgefl.transport.memory`), and the rounds are run by
`edgefl.roles.aggregator.Aggregator`; what makes thousands of them fit in one process is the
transport's `NetworkLoop` (one thread drives every client), the process-wide backbone session
and one opened copy of each task (`edgefl.simulation.shared_tasks`). The simulation only adds
what real boards would bring: their share of the data, speed differences, dropouts, and devices
joining and leaving. A fleet too large for one process runs as shards (`edgefl.simulation.shard`).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from edgefl.bundle import ModelBundle
from edgefl.core.round_state import Verdict
from edgefl.core.strategies import strategy_label
from edgefl.errors import SimulationError
from edgefl.head import Weights
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig, RoundSummary
from edgefl.roles.async_aggregator import AsyncAggregator
from edgefl.simulation.async_agent import AsyncSimulatedAgent
from edgefl.simulation.config import SimulationConfig
from edgefl.simulation.fleet_keys import SimulatedFleetKeys
from edgefl.simulation.metrics import RoundRecord, SimulationMetrics, write_metrics
from edgefl.simulation.plan import FleetPlan, SimulatedDevice, plan_fleet
from edgefl.simulation.run_broker import SimulationBroker
from edgefl.simulation.shard import SHARD_WAIT_S, RunFollower
from edgefl.simulation.simulated_agent import SimulatedAgent
from edgefl.simulation.task_observer import TaskObserver
from edgefl.simulation.workload import FederatedData
from edgefl.transport import topics
from edgefl.transport.client import NetworkLoop
from edgefl.transport.connect import is_memory_url
from edgefl.transport.messages import RoundResult
from edgefl.transport.tls import TlsSettings

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]
RoundRecordCallback = Callable[[RoundRecord], None]


class _DeviceBehaviour:
    """When one simulated device answers (`SimulatedAgent`): dropouts and delays, per round."""

    def __init__(self, device: SimulatedDevice, index: int, seed: int, unit_s: float) -> None:
        self.device = device
        self.index = index
        self.seed = seed
        self.delay_s = (device.speed - 1.0) * unit_s
        self.dropped: set[int] = set()

    def __call__(self, round_number: int) -> float | None:
        if self.device.drops(round_number, self.seed, self.index):
            self.dropped.add(round_number)
            return None
        return self.delay_s


class Simulation:
    """One simulated federation: `run()` starts everything, runs the rounds and tears down."""

    def __init__(
        self,
        config: SimulationConfig,
        bundle: ModelBundle,
        data: FederatedData,
        on_round: RoundRecordCallback | None = None,
        on_status: StatusCallback | None = None,
        prepare_agent: Callable[[Agent], None] | None = None,
        before_rounds: Callable[[str], None] | None = None,
        on_verdict: Callable[[Verdict], None] | None = None,
        on_summary: Callable[[RoundSummary], None] | None = None,
    ) -> None:
        """Plan the fleet; nothing starts until run().

        Args:
            config: the settings.
            bundle: the bundle every device runs and whose head is federated.
            data: the devices' pool and the server's test set.
            on_round: called with each round's record as it closes (live progress).
            on_status: called with a short line for each start-up and tear-down phase.
            prepare_agent: called with each agent before it starts (the demo attaches the
                delivery updater here).
            before_rounds: called with the broker URL once the devices are up, before the
                aggregator starts (the demo deploys the bundle here).
            on_verdict, on_summary: passed to the aggregator as its `on_verdict` and (before
                the simulation's own) `on_round` callbacks (metrics).

        Raises:
            SimulationError: an invalid setting or a partition that cannot be made.
        """
        config.check()
        self.config = config
        self.bundle = bundle
        self.data = data
        self.on_round = on_round
        self.on_status = on_status
        self.prepare_agent = prepare_agent
        self.before_rounds = before_rounds
        self.on_verdict, self.on_summary = on_verdict, on_summary
        self.plan: FleetPlan = plan_fleet(
            data.pool.y,
            config.devices,
            config.partition,
            speed_spread=config.speed_spread,
            dropout=config.dropout,
            churn=config.churn,
            seed=config.seed,
        )
        self.behaviours = [
            _DeviceBehaviour(device, i, config.seed, config.speed_unit_s)
            for i, device in enumerate(self.plan.devices)
        ]
        self.records: list[RoundRecord] = []
        shard = config.shard
        # Shards derive the same keys from what they share, so they trust one another.
        phrase = f"{config.fleet}:{config.seed}" if shard is not None else None
        self.keys = SimulatedFleetKeys(config.insecure, derive_from=phrase)
        # The devices this process runs: its shard's slice, or the whole fleet.
        self.own = {
            d.device_id for d in (shard.take(self.plan.devices) if shard else self.plan.devices)
        }
        self.agents: dict[str, Agent] = {}
        self._network: NetworkLoop | None = None
        self._aggregator: Aggregator | None = None
        self._stopped = ""  # why the aggregator ended the run early (the privacy budget)
        self._observer: TaskObserver | None = None
        self._follower: RunFollower | None = None
        self._tls = TlsSettings()
        self._started = 0.0
        self._round_started = 0.0

    def _say(self, line: str) -> None:
        log.info("%s", line)
        if self.on_status is not None:
            self.on_status(line)

    def run(self) -> SimulationMetrics:
        """Start the broker (unless one is given), the agents and the aggregator; run the rounds.

        A shard other than 1 starts no aggregator: it follows the run of shard 1's to its end.

        Returns:
            The metrics: one record per round, and a summary with the wall time of the federated
            part (from the aggregator starting, with broker and devices up, to the last round's
            result), the start-up time and the peak resident memory of the process.

        Raises:
            TransportError: the broker cannot be started or reached.
            FederationError: the devices did not come online.
            SimulationError: a round failed to run.
        """
        config = self.config
        setup_started = time.perf_counter()
        broker = SimulationBroker(config.broker_url, config.tls)
        self._say(broker.describe())
        # Every device, the aggregator, the task observer and a shard's follower connect.
        broker.make_room(len(self.own) + 3)
        url = broker.start()
        tls = self._tls = broker.tls
        network = self._network = NetworkLoop(name="edgefl-simulation")
        network.start()
        try:
            name = f"observer-{config.shard.index}" if config.shard else "observer"
            self._observer = TaskObserver(url, config.fleet, network, tls, name)
            self._observer.client.connect(timeout=30.0)
            fleet_first = self.plan.online_in(1)
            first = [d for d in fleet_first if d.device_id in self.own]
            shard = f" (shard {config.shard})" if config.shard else ""
            self._say(f"starting {len(first)} of {len(self.plan.devices)} devices on {url}{shard}")
            if config.shard is not None and not config.shard.runs_aggregator:
                follower = self._follower = RunFollower(
                    url, config.fleet, network, self.keys.trusted, config.policy.rounds,
                    self._on_result, tls, name=f"shard-{config.shard.index}",
                )  # fmt: skip
                follower.start()
                self._start_agents(url, first)
                startup_s = time.perf_counter() - setup_started
                self._say(f"devices up in {startup_s:.1f} s; shard 1 runs the aggregator")
                self._started = self._round_started = time.perf_counter()
                follower.wait(idle_s=SHARD_WAIT_S + config.policy.deadline_s)
                return self._metrics(startup_s)
            self._start_agents(url, first)
            self.keys.enroll(d.device_id for d in self.plan.devices if d.device_id not in self.own)
            if self.before_rounds is not None:
                self.before_rounds(url)
            aggregator = (
                partial(AsyncAggregator, asynchronous=config.asynchronous)
                if config.asynchronous.is_async
                else Aggregator
            )
            self._aggregator = aggregator(
                AggregatorConfig(
                    broker_url=url,
                    fleet=config.fleet,
                    bundle_dir=self.bundle.path,
                    # Every planned device must be online before round 1, so the online set
                    # has nothing left to settle.
                    policy=replace(
                        config.policy,
                        min_devices=max(1, len(fleet_first)),
                        wait_devices_s=SHARD_WAIT_S if config.shard else 60.0,
                        settle_s=0.0,
                    ),
                    settings=config.settings,
                    acceptance=replace(
                        config.acceptance, allow=tuple(d.device_id for d in self.plan.devices)
                    ),
                    strategy=config.strategy,
                    strategy_params=dict(config.strategy_params),
                    tls=tls,
                    auth=self.keys.aggregator(),
                ),
                network=network,
                eval_dataset=self.data.test,
                on_round=self._on_round,
                on_verdict=self.on_verdict,
            )
            startup_s = time.perf_counter() - setup_started
            self._say(f"devices up in {startup_s:.1f} s; running {config.policy.rounds} rounds")
            self._started = self._round_started = time.perf_counter()
            self._stopped = self._aggregator.run().stopped
            return self._metrics(startup_s)
        finally:
            self._say("stopping devices")
            if self._follower is not None:
                self._follower.close()
            self._teardown(clear_retained=not broker.owned)
            network.stop()
            broker.stop()

    def _metrics(self, startup_s: float) -> SimulationMetrics:
        wall_s = self.records[-1].elapsed if self.records else 0.0
        return SimulationMetrics(
            config=self._config_record(),
            rounds=self.records,
            summary=self._summary(wall_s, startup_s),
        )

    @property
    def heads(self) -> dict[str, Weights]:
        """The aggregator's global heads: the final ones after run() (empty before it starts)."""
        return dict(self._aggregator.heads) if self._aggregator is not None else {}

    def device_presence(self) -> dict[str, str]:
        """Return the aggregator's `device_presence()` (empty before it starts)."""
        return self._aggregator.device_presence() if self._aggregator is not None else {}

    # -- devices --

    def _start_agents(self, url: str, devices: list[SimulatedDevice]) -> None:
        """Start agents without waiting on each connection, then wait for all of them."""
        assert self._network is not None
        started: list[Agent] = []
        index = {p.device_id: i for i, p in enumerate(self.plan.devices)}
        for device in devices:
            kind = AsyncSimulatedAgent if self.config.asynchronous.is_async else SimulatedAgent
            agent: Agent = kind(
                AgentConfig(
                    broker_url=url,
                    fleet=self.config.fleet,
                    device_id=device.device_id,
                    bundle_dir=None,  # installed below: one bundle object for every device
                    personalize=self.config.personalize,
                    connect_timeout_s=None,
                    # Heartbeats only refresh the status; in a short run they are noise.
                    heartbeat_s=300.0,
                    tls=self._tls,
                    auth=self.keys.agent(device.device_id),
                ),
                self.behaviours[index[device.device_id]],
                dataset=self.data.pool.subset(device.indices),
                network=self._network,
            )
            if self.config.preinstalled:
                # Loaded once for the fleet, not once per device (it reads and parses the
                # manifest): the agents share the object and never change it.
                agent.install_bundle(self.bundle)
            if self.prepare_agent is not None:
                self.prepare_agent(agent)
            agent.start()
            self.agents[device.device_id] = agent
            started.append(agent)
        deadline = time.monotonic() + 60.0
        for agent in started:
            if not agent.client.wait_connected(max(0.0, deadline - time.monotonic())):
                raise SimulationError(f"device {agent.device_id} could not connect to {url}")

    def _stop_agents(self, devices: list[SimulatedDevice]) -> None:
        for device in devices:
            agent = self.agents.pop(device.device_id, None)
            if agent is not None:
                agent.stop()

    def _apply_churn(self, next_round: int) -> None:
        """Start devices that join and stop devices that leave before `next_round`.

        Waits (up to 10 s) until the aggregator sees the change, so the next round's selection
        is the one the schedule says.
        """
        if self._aggregator is None:
            return  # a shard without the aggregator: sharded runs have no churn
        joining = [d for d in self.plan.devices if d.joins_at == next_round]
        leaving = [d for d in self.plan.devices if d.leaves_at == next_round]
        if not joining and not leaving:
            return
        assert self._observer is not None
        self._start_agents(self._observer.url, joining)
        self._stop_agents(leaving)
        expected = {d.device_id for d in self.plan.online_in(next_round)}
        deadline = time.monotonic() + 10.0
        while set(self._aggregator.online_devices()) != expected and time.monotonic() < deadline:
            time.sleep(0.01)

    def _teardown(self, clear_retained: bool) -> None:
        """Stop every agent; with `clear_retained` (a broker we do not own, which keeps retained
        messages), clear the statuses our devices left on it."""
        agents = list(self.agents.values())
        self.agents.clear()
        # Agent.stop() waits for its "offline" status to be acknowledged before disconnecting
        # (amqtt leaves a connection open when a client disconnects with a QoS 1 publish in
        # flight); stopping from a few threads overlaps those round trips. In-process there are
        # none: the threads would only contend for the executor's queue.
        in_process = self._observer is not None and is_memory_url(self._observer.url)
        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="edgefl-sim-stop") as pool:
            errors = map(_stop_agent, agents) if in_process else pool.map(_stop_agent, agents)
            for agent, error in zip(agents, errors, strict=True):
                if error is not None:
                    log.warning("stopping %s: %s", agent.device_id, error)
        observer = self._observer
        if observer is not None:
            if clear_retained:
                handles = [
                    observer.client.publish(
                        topics.device_status(self.config.fleet, d.device_id), b"", 1, retain=True
                    )
                    for d in self.plan.devices
                    if d.device_id in self.own
                ]
                if handles:
                    handles[-1].wait(10.0)
            observer.client.close()

    # -- rounds --

    def _on_result(self, result: RoundResult) -> None:
        """A shard without the aggregator: record the round from its result (network thread)."""
        summary = RoundSummary(
            round=result.round, status=result.status, head_version=result.head_version,
            selected=result.selected, accepted=result.accepted, rejected=result.rejected,
            late=result.late, seconds=0.0, metrics=result.metrics, online=result.online,
        )  # fmt: skip
        # On the network thread, which delivers the observer's tasks too: never wait for one.
        self._on_round(summary, task_wait_s=0.0)

    def _dropped(self, number: int) -> int:
        if self.config.shard is None:
            return sum(1 for b in self.behaviours if number in b.dropped)
        # The other shards' devices drop out too: the plan says which, the same in every shard.
        online = {d.device_id for d in self.plan.online_in(number)}
        return sum(
            1
            for b in self.behaviours
            if b.device.device_id in online and b.device.drops(number, b.seed, b.index)
        )

    def _on_round(self, summary: RoundSummary, task_wait_s: float | None = None) -> None:
        """Turn the aggregator's round summary into a record; apply churn for the next round."""
        if self.on_summary is not None:
            self.on_summary(summary)
        now = time.perf_counter()
        number = summary.round
        metrics = summary.metrics
        wait_s = 0.0 if self.config.asynchronous.is_async else 2.0
        if task_wait_s is not None:
            wait_s = task_wait_s
        task_bytes = self._observer.task_size(number, wait_s) if self._observer else 0
        record = RoundRecord(
            round=number,
            online=len(self.plan.online_in(number)),
            selected=summary.selected,
            reported=summary.accepted,
            dropped=self._dropped(number),
            accuracy=float(metrics.get("accuracy", float("nan"))),
            personal_accuracy=float(metrics.get("device_personal_accuracy", float("nan"))),
            device_accuracy=float(metrics.get("device_global_accuracy", float("nan"))),
            bytes_up=round(metrics.get("bytes_per_update", 0.0) * summary.accepted),
            bytes_down=task_bytes * summary.selected,
            seconds=now - self._round_started,
            elapsed=now - self._started,
            epsilon=float(metrics.get("epsilon", float("nan"))),
            delta=float(metrics.get("delta", float("nan"))),
        )
        self.records.append(record)
        if summary.status != "closed":
            log.warning("round %d failed: %d of %d updates", number, summary.accepted,
                        summary.selected)  # fmt: skip
        if self.on_round is not None:
            self.on_round(record)
        if number < self.config.policy.rounds:
            self._apply_churn(number + 1)
        self._round_started = time.perf_counter()

    # -- results --

    def _config_record(self) -> dict[str, Any]:
        record = asdict(replace(self.config, strategy=strategy_label(self.config.strategy)))
        record.update(
            bundle=str(self.bundle.path),
            bundle_name=self.bundle.manifest.name,
            dataset=self.data.source,
            pool_samples=len(self.data.pool),
            test_samples=len(self.data.test),
            samples_per_device=self.plan.sample_counts(),
        )
        return record

    def _summary(self, wall_s: float, startup_s: float) -> dict[str, Any]:
        reported = sum(r.reported for r in self.records)
        return {
            "wall_s": wall_s,
            "startup_s": startup_s,
            "final_accuracy": self.records[-1].accuracy if self.records else None,
            "bytes_per_device_per_round": (
                sum(r.bytes_up for r in self.records) / reported if reported else 0.0
            ),
            "peak_rss_mb": peak_rss_mb(),
            "stopped": self._stopped,
        }


def _stop_agent(agent: Agent) -> Exception | None:
    """Stop one agent; return the error instead of raising, so one failure strands no other."""
    try:
        agent.stop()
    except Exception as exc:
        return exc
    return None


def peak_rss_mb() -> float:
    """Return this process's peak resident memory in MiB (resource.getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_simulation(
    config: SimulationConfig,
    bundle: ModelBundle,
    data: FederatedData,
    on_round: RoundRecordCallback | None = None,
    on_status: StatusCallback | None = None,
) -> SimulationMetrics:
    """Run one simulated federation and return its metrics (see `Simulation` for the arguments
    and the errors)."""
    return Simulation(config, bundle, data, on_round, on_status).run()


def save_results(metrics: SimulationMetrics, out: str | Path) -> list[Path]:
    """Write metrics.json, metrics.csv and the PNG plot into `out`; return the paths written."""
    from edgefl.simulation.plot import PLOT_FILE, plot_metrics

    json_path, csv_path = write_metrics(metrics, out)
    return [json_path, csv_path, plot_metrics(metrics, Path(out) / PLOT_FILE)]
