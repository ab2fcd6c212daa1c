"""`edgefl simulate` and `edgefl demo`: a whole fleet on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from edgefl.cli.options import parse_params
from edgefl.cli.shell import setup_logging, user_errors


def _quiet_simulation_logs() -> None:
    """Warnings only, and amqtt's per-message chatter off: the live progress is the output."""
    import logging

    setup_logging("warning")
    logging.getLogger("amqtt").setLevel(logging.ERROR)


@click.command()
@click.option("--devices", default=10, show_default=True, type=int, help="Simulated devices.")
@click.option("--rounds", default=5, show_default=True, type=int)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              help="Bundle to federate (default: FL-digits, built once and cached).")  # fmt: skip
@click.option("--dataset", default="digits", show_default=True,
              help="'digits' (the FL-digits split), a .npz (X, y) or an image folder.")  # fmt: skip
@click.option("--partition", default="dirichlet:0.5", show_default=True,
              help="iid, dirichlet:ALPHA or shards:K.")  # fmt: skip
@click.option("--broker", "broker_url", default=None,
              help="mqtt://HOST[:PORT] to use (default: start the embedded broker).")  # fmt: skip
@click.option("--strategy", default="fedavg", show_default=True, help="fedavg, fedprox, fedadam...")
@click.option("--param", "params", multiple=True, help="Strategy parameter NAME=VALUE (repeat).")
@click.option("--codec", type=click.Choice(["float32", "int8", "topk"]), default="float32",
              show_default=True, help="How devices encode their updates.")  # fmt: skip
@click.option("--fraction", default=1.0, show_default=True, type=float,
              help="Share of online devices selected per round.")  # fmt: skip
@click.option("--speed-spread", default=1.0, show_default=True, type=float,
              help="Slowest/fastest device ratio (1: all equally fast).")  # fmt: skip
@click.option("--dropout", default=0.0, show_default=True, type=float,
              help="Probability that a selected device skips a round.")  # fmt: skip
@click.option("--churn", default="", help="Devices joining/leaving, e.g. join:0.2@3,leave:0.1@5.")
@click.option("--deadline", default=10.0, show_default=True, type=float, help="Seconds per round.")
@click.option("--oversample", default=0, type=int,
              help="Repeat the data until devices hold this many samples on average.")  # fmt: skip
@click.option("--no-personalize", is_flag=True, help="Devices keep no personal head.")
@click.option("--out", default="build/simulate", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, type=int)
@user_errors
def simulate(
    devices: int,
    rounds: int,
    bundle_dir: Path | None,
    dataset: str,
    partition: str,
    broker_url: str | None,
    strategy: str,
    params: tuple[str, ...],
    codec: str,
    fraction: float,
    speed_spread: float,
    dropout: float,
    churn: str,
    deadline: float,
    oversample: int,
    no_personalize: bool,
    out: Path,
    seed: int,
) -> None:
    """Simulate a fleet on this machine: real agents and aggregator over a real broker."""
    from rich.console import Console

    from edgefl.bundle import load_bundle
    from edgefl.simulation.display import LiveProgress, round_table, summary_line
    from edgefl.simulation.plan import parse_churn, parse_partition
    from edgefl.simulation.runner import Simulation, SimulationConfig, save_results
    from edgefl.simulation.workload import fl_digits_bundle, load_federated_data, repeat_pool

    _quiet_simulation_logs()
    console = Console()
    config = SimulationConfig(
        devices=devices, rounds=rounds, partition=partition, strategy=strategy,
        strategy_params=parse_params(params), codec=codec, fraction=fraction,
        speed_spread=speed_spread, dropout=dropout, churn=churn, deadline_s=deadline,
        personalize=not no_personalize, seed=seed, broker_url=broker_url,
    )  # fmt: skip
    # Fail on a bad spec before building a bundle or starting a broker.
    parse_partition(partition)
    parse_churn(churn)
    if bundle_dir is not None:
        bundle = load_bundle(bundle_dir)
    else:
        console.print("[dim]FL-digits bundle: digits-mlp backbone as fp32 ONNX, built once[/dim]")
        bundle = fl_digits_bundle()
    data = load_federated_data(dataset)
    if oversample > 0:
        data = repeat_pool(data, oversample, devices)
    try:
        with LiveProgress(console, rounds) as live:
            simulation = Simulation(config, bundle, data, live.on_round, live.on_status)
            metrics = simulation.run()
    except ValueError as exc:  # an invalid aggregator setting (strategy, fraction, ...)
        raise click.UsageError(str(exc)) from None
    console.print(round_table(metrics, f"{devices} devices, {rounds} rounds, {partition}"))
    console.print(summary_line(metrics))
    for path in save_results(metrics, out):
        console.print(f"wrote {path}")


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
@user_errors
def demo(
    out: Path, devices: int, rounds: int, recipe: str, profile: str, pretrained_head: bool
) -> None:
    """The whole story on this machine: compress digits-cnn, deploy it signed to a simulated
    fleet, federate with personalization, plot the rounds."""
    from rich.console import Console

    from edgefl.simulation.demo import DemoConfig, run_demo

    _quiet_simulation_logs()
    config = DemoConfig(
        out=out, devices=devices, rounds=rounds, recipe=recipe, profile=profile,
        fresh_head=not pretrained_head,
    )  # fmt: skip
    run_demo(config, Console())
