"""The demo story, end to end on one machine: compress, sign and deploy, federate with
personalization. `make demo` runs it; every step is the real code a fleet would run.

1. digits-cnn is pretrained on 80% of the digits (the built-in, cached after the first run) and
   compressed with a board recipe (raspberry-pi: pruned, distilled, int8 ONNX and int8 TFLite).
2. A signing key is made for the demo, and the bundle is deployed over MQTT, signed and chunked,
   to a simulated fleet whose devices start with no model and install what they receive.
3. The devices hold non-IID (Dirichlet) shares of the 20% of the digits the model never saw and
   federate the head for some rounds, each keeping a personalized head. By default the head they
   federate is a fresh one on the compressed backbone (transfer learning across the fleet), so
   the round table shows the fleet learning; `fresh_head=False` federates the pretrained head.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from edgefl.bundle import ModelBundle, rewrite_heads
from edgefl.core.settings import RoundPolicy
from edgefl.data import DIGITS, holdout_split, load_digits
from edgefl.errors import SimulationError
from edgefl.head import init_head
from edgefl.roles.agent import Agent
from edgefl.simulation.display import LiveProgress, round_table, summary_line
from edgefl.simulation.metrics import SimulationMetrics
from edgefl.simulation.runner import Simulation, SimulationConfig, save_results
from edgefl.simulation.workload import FederatedData

DEMO_FLEET = "demo"


@dataclass
class DemoConfig:
    """What the demo runs.

    Attributes:
        out: where the bundle, keys, devices' state, metrics and plot go.
        devices: simulated devices.
        rounds: federated rounds.
        recipe: compression recipe (a name from `edgefl recipes` or a .toml file).
        profile: the device profile of the simulated boards (which artifact they download).
        partition: how the devices' data is split (see edgefl.simulation.plan).
        seed: seeds the split and the training.
        fresh_head: federate a freshly initialised head instead of the pretrained one.
    """

    out: Path = Path("build/demo")
    devices: int = 20
    rounds: int = 10
    recipe: str = "raspberry-pi"
    profile: str = "raspberry-pi"
    partition: str = "dirichlet:0.5"
    seed: int = 0
    fresh_head: bool = True


@dataclass
class DemoResult:
    """What the demo produced."""

    bundle: ModelBundle
    metrics: SimulationMetrics
    files: list[Path]
    updated: int


def demo_data(seed: int = 0) -> FederatedData:
    """Return the digits digits-cnn was not pretrained on, split into the fleet's pool (60%) and
    the server's test set (40%), stratified."""
    # digits-cnn trains on holdout_split(load_digits()) with its defaults; the rest is unseen.
    _, unseen = holdout_split(load_digits())
    pool, test = holdout_split(unseen, test_fraction=0.4, seed=seed)
    return FederatedData(pool, test, "digits (unseen by pretraining)")


def run_demo(
    config: DemoConfig, console: Console, on_broker: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the demo, printing each step, the compression report and the round table.

    Args:
        config: what to run.
        console: where the story is told.
        on_broker: called with the fleet's broker URL before the deploy (the CLI starts the
            dashboard here, so the page shows the deploy and the rounds).

    Returns:
        The bundle, the federation's metrics and the files written.

    Raises:
        EdgeflError: a step failed (compression, deploy, federation); the message says which.
    """
    # Imported here: the pipeline needs torch, and `edgefl simulate` must not pay for it.
    from edgefl import signing
    from edgefl.compression.pipeline import CompressRequest, compress
    from edgefl.delivery.deploy import UPDATED, deploy
    from edgefl.delivery.updater_binding import attach_to_agent
    from edgefl.profiles import load_profile

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]1. pretrain digits-cnn and compress it")
    built = compress(
        CompressRequest(
            model="digits-cnn", recipe=config.recipe, data=DIGITS, out=out / "bundle", force=True
        ),
        console,
    ).bundle
    assert built is not None  # not a dry run
    if config.fresh_head:
        fresh = {task: init_head(spec.layers, config.seed) for task, spec in
                 built.manifest.heads.items()}  # fmt: skip
        built = rewrite_heads(built, out / "bundle-fresh-head", fresh, force=True)
        console.print(f"the fleet federates a fresh head on this backbone: {built.path}")

    console.rule("[bold]2. sign and deploy it to a simulated fleet")
    keys_dir = out / "keys"
    shutil.rmtree(keys_dir, ignore_errors=True)  # a key made for this demo run only
    keys = signing.init_keys(keys_dir)
    private_key = signing.load_private_key(keys.private)
    trust_key = signing.load_public_key(keys.public)
    preferences = load_profile(config.profile).prefer
    devices_dir = out / "devices"
    shutil.rmtree(devices_dir, ignore_errors=True)  # every board starts with no model
    console.print(f"signing key {keys.private}; boards use profile {config.profile!r}")
    updated = [0]

    def attach_updater(agent: Agent) -> None:
        attach_to_agent(agent, devices_dir / agent.device_id, trust_key, preferences)

    def deploy_bundle(broker_url: str) -> None:
        if on_broker is not None:
            on_broker(broker_url)
        result = deploy(built.path, broker_url, DEMO_FLEET, private_key, timeout=120.0)
        updated[0] = result.count(UPDATED)
        console.print(
            f"deployed {result.name} v{result.version}: {updated[0]} boards updated, "
            f"{len(result.failed)} failed, {result.bytes_published:,} bytes published in "
            f"{result.seconds:.1f} s"
        )
        if result.failed:
            first = result.failed[0]
            raise SimulationError(
                f"deploy failed on {len(result.failed)} boards ({first.device_id}: "
                f"{first.state} {first.reason})"
            )

    console.rule(f"[bold]3. federate {config.rounds} rounds on {config.devices} devices")
    simulation_config = SimulationConfig(
        devices=config.devices, policy=RoundPolicy(rounds=config.rounds, deadline_s=30.0),
        partition=config.partition, personalize=True, seed=config.seed, fleet=DEMO_FLEET,
        preinstalled=False,
    )  # fmt: skip
    data = demo_data(config.seed)
    with LiveProgress(console, config.rounds) as live:
        simulation = Simulation(
            simulation_config, built, data, live.on_round, live.on_status,
            prepare_agent=attach_updater, before_rounds=deploy_bundle,
        )  # fmt: skip
        metrics = simulation.run()
    metrics.config["title"] = (
        f"edgefl demo: {config.devices} devices, {config.partition}, {config.recipe} bundle"
    )
    console.print(round_table(metrics, f"{config.devices} devices, {config.partition}"))
    console.print(summary_line(metrics))
    files = save_results(metrics, out)
    for path in files:
        console.print(f"wrote {path}")
    return DemoResult(built, metrics, files, updated[0])
