"""`edgefl simulate` and `edgefl demo`: a whole fleet on this machine."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefl.cli.dashboard import (
    dashboard_options,
    keep_dashboard_open,
    start_local_dashboard,
    start_metrics,
)
from edgefl.cli.options import (
    build_settings,
    check_settings,
    resolve_strategy,
    settings_options,
    strategy_options,
    tls_options,
    tls_settings,
)
from edgefl.cli.shell import setup_logging, user_errors
from edgefl.core.settings import (
    AcceptancePolicy,
    AsyncPolicy,
    CodecSettings,
    PrivacySettings,
    RoundPolicy,
    RoundSettings,
    TrainConfig,
)

if TYPE_CHECKING:
    from edgefl.dashboard.service import Dashboard


def _quiet_simulation_logs() -> None:
    """Warnings only, and amqtt's per-message chatter off: the live progress is the output."""
    import logging

    setup_logging("warning")
    logging.getLogger("amqtt").setLevel(logging.ERROR)


@click.command()
@click.option("--devices", default=10, show_default=True, type=int, help="Simulated devices.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              help="Bundle to federate (default: FL-digits, built once and cached).")  # fmt: skip
@click.option("--dataset", default="digits", show_default=True,
              help="'digits' (the FL-digits split), a .npz (X, y) or an image folder.")  # fmt: skip
@click.option("--partition", default="dirichlet:0.5", show_default=True,
              help="iid, dirichlet:ALPHA or shards:K.")  # fmt: skip
@click.option("--broker", "broker_url", default=None,
              help="mqtt://HOST[:PORT] to use, or 'memory' for an in-process broker (no "
                   "sockets; the fastest); default: start the embedded MQTT broker.")  # fmt: skip
@click.option("--shard", default=None, metavar="I/N",
              help="Run slice I of N of the fleet's devices (same options in every shard, one "
                   "shared --broker); shard 1 also runs the aggregator.")  # fmt: skip
@click.option("--fleet", default="sim", show_default=True,
              help="The fleet name on the wire (shards of one run share it).")  # fmt: skip
@tls_options()
@strategy_options
@settings_options(RoundPolicy, defaults={"rounds": 5, "deadline_s": 10.0})
@settings_options(TrainConfig, exclude=("seed",))
@settings_options(CodecSettings)
@settings_options(PrivacySettings)
@settings_options(AcceptancePolicy, exclude=("allow",))
@settings_options(AsyncPolicy)
@click.option("--speed-spread", default=1.0, show_default=True, type=float,
              help="Slowest/fastest device ratio (1: all equally fast).")  # fmt: skip
@click.option("--speed-unit", default=0.1, show_default=True, type=float,
              help="Seconds per unit of slowness: speed s answers (s-1) x this late.")  # fmt: skip
@click.option("--dropout", default=0.0, show_default=True, type=float,
              help="Probability that a selected device skips a round.")  # fmt: skip
@click.option("--churn", default="", help="Devices joining/leaving, e.g. join:0.2@3,leave:0.1@5.")
@click.option("--oversample", default=0, type=int,
              help="Repeat the data until devices hold this many samples on average.")  # fmt: skip
@click.option("--no-personalize", is_flag=True, help="Devices keep no personal head.")
@click.option("--out", default="build/simulate", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the partition, speeds, drops, selection and training.")  # fmt: skip
@dashboard_options
@click.option("--metrics-port", help="Serve the aggregator's Prometheus /metrics on [HOST:]PORT.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Seal nothing (by default every message is sealed with keys made for the run).",
)
@user_errors
def simulate(**options: Any) -> None:
    """Simulate a fleet on this machine: real agents and aggregator over a real broker."""
    from rich.console import Console

    from edgefl.bundle import load_bundle
    from edgefl.simulation.display import LiveProgress, round_table, summary_line
    from edgefl.simulation.plan import parse_churn, parse_partition
    from edgefl.simulation.runner import Simulation, SimulationConfig, save_results
    from edgefl.simulation.shard import ShardSpec
    from edgefl.simulation.workload import fl_digits_bundle, load_federated_data, repeat_pool
    from edgefl.transport.connect import is_memory_url

    # Every setting is checked before a bundle is built or a broker started: a refusal is a
    # usage error (exit 2); what fails later is the run's, and a bug keeps its traceback.
    strategy, strategy_params = resolve_strategy(options.pop("strategy"), options.pop("params"))
    tls = tls_settings(options)
    in_process = is_memory_url(options["broker_url"] or "")
    if tls.given and (options["broker_url"] is None or in_process):
        raise click.UsageError("--cafile, --cert and --key need --broker mqtts://...")
    if in_process and options["with_dashboard"]:
        raise click.UsageError("--dashboard needs a network broker, not --broker memory")
    seed: int = options["seed"]
    policy = build_settings(RoundPolicy, options)
    settings = RoundSettings(
        train=build_settings(TrainConfig, options, seed=seed),
        privacy=build_settings(PrivacySettings, options),
        codec=build_settings(CodecSettings, options),
    )
    devices: int = options["devices"]
    partition: str = options["partition"]
    config = SimulationConfig(
        devices=devices, partition=partition, speed_spread=options["speed_spread"],
        speed_unit_s=options["speed_unit"],
        dropout=options["dropout"], churn=options["churn"],
        personalize=not options["no_personalize"], seed=seed, broker_url=options["broker_url"],
        policy=policy, settings=settings, strategy=strategy, strategy_params=strategy_params,
        acceptance=build_settings(AcceptancePolicy, options), tls=tls,
        insecure=options["insecure"], asynchronous=build_settings(AsyncPolicy, options),
        fleet=options["fleet"],
        shard=ShardSpec.parse(options["shard"]) if options["shard"] else None,
    )  # fmt: skip
    check_settings(config, [f.name for f in fields(SimulationConfig)])
    parse_partition(partition)
    parse_churn(config.churn)
    _quiet_simulation_logs()
    console = Console()
    bundle_dir: Path | None = options["bundle_dir"]
    if bundle_dir is not None:
        bundle = load_bundle(bundle_dir)
    else:
        console.print("[dim]FL-digits bundle: digits-mlp backbone as fp32 ONNX, built once[/dim]")
        bundle = fl_digits_bundle()
    data = load_federated_data(options["dataset"])
    if options["oversample"] > 0:
        data = repeat_pool(data, options["oversample"], devices)
    exporter = start_metrics(options["metrics_port"], config.fleet)
    pages: list[Dashboard] = []
    with LiveProgress(console, policy.rounds) as live:

        def serve_page(url: str) -> None:
            if options["with_dashboard"]:
                port = options["dashboard_port"]
                pages.append(start_local_dashboard(url, config.fleet, port, live.on_status))

        simulation = Simulation(
            config, bundle, data, live.on_round, live.on_status, before_rounds=serve_page,
            on_verdict=exporter.on_verdict if exporter else None,
            on_summary=exporter.on_round if exporter else None,
        )  # fmt: skip
        if exporter is not None:
            exporter.watch_presence(simulation.device_presence)
        try:
            metrics = simulation.run()
        except BaseException:
            for page in pages:
                page.stop()
            raise
    rounds = policy.rounds
    out: Path = options["out"]
    console.print(round_table(metrics, f"{devices} devices, {rounds} rounds, {partition}"))
    console.print(summary_line(metrics))
    for path in save_results(metrics, out):
        console.print(f"wrote {path}")
    keep_dashboard_open(pages[0] if pages else None)


@click.command()
@click.option("--out", default="build/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--devices", default=20, show_default=True, type=int, help="Simulated devices.")
@click.option("--rounds", default=10, show_default=True, type=int)
@click.option("--recipe", default="raspberry-pi", show_default=True, help="Compression recipe.")
@click.option("--profile", default="raspberry-pi", show_default=True, help="The boards' profile.")
@click.option(
    "--pretrained-head", is_flag=True,
    help="Federate the pretrained head instead of a fresh one on the compressed backbone.",
)  # fmt: skip
@dashboard_options
@user_errors
def demo(
    out: Path,
    devices: int,
    rounds: int,
    recipe: str,
    profile: str,
    pretrained_head: bool,
    with_dashboard: bool,
    dashboard_port: int,
) -> None:
    """The whole story on this machine: compress digits-cnn, deploy it signed to a simulated
    fleet, federate with personalization, plot the rounds."""
    from rich.console import Console

    from edgefl.simulation.demo import DEMO_FLEET, DemoConfig, run_demo

    _quiet_simulation_logs()
    config = DemoConfig(
        out=out, devices=devices, rounds=rounds, recipe=recipe, profile=profile,
        fresh_head=not pretrained_head,
    )  # fmt: skip
    console = Console()
    pages: list[Dashboard] = []

    def serve_page(url: str) -> None:
        if with_dashboard:
            pages.append(start_local_dashboard(url, DEMO_FLEET, dashboard_port, console.print))

    try:
        run_demo(config, console, on_broker=serve_page)
    except BaseException:
        for page in pages:
            page.stop()
        raise
    keep_dashboard_open(pages[0] if pages else None)
