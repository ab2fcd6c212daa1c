"""`edgefl broker`, `agent` and `aggregate`: the two roles of a federation, and a test broker."""

from __future__ import annotations

from pathlib import Path

import click

from edgefl.cli.options import parse_params
from edgefl.cli.shell import setup_logging, stop_on_sigterm, user_errors


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=1883, show_default=True, type=int, help="TCP port (0: any free).")
@user_errors
def broker(host: str, port: int) -> None:
    """Run the embedded MQTT broker (amqtt) until Ctrl-C; use Mosquitto in production."""
    import threading

    from edgefl.transport.broker import EmbeddedBroker

    embedded = EmbeddedBroker(host, port)
    embedded.start()
    click.echo(f"broker listening on {embedded.url} (Ctrl-C stops)")
    done = threading.Event()
    stop_on_sigterm(done.set)
    try:
        while not done.wait(0.5):
            pass
    finally:
        embedded.stop()


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--device-id", required=True, help="This device's ID, unique in the fleet.")
@click.option("--data", required=True, help="Local data: 'digits', a .npz or an image folder.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Feature cache, personal head.")
@click.option("--task", default="default", show_default=True, help="Which head to train.")
@click.option(
    "--runtime", type=click.Choice(["auto", "onnx", "tflite"]), default="auto", show_default=True
)
@click.option("--threads", type=int, help="Runtime threads (default: the profile's, else 1).")
@click.option("--heartbeat", default=30.0, show_default=True, type=float, help="Seconds.")
@click.option(
    "--codec", type=click.Choice(["float32", "int8", "topk"]), help="Override the task's."
)
@click.option("--no-personalize", is_flag=True, help="Do not keep a personal head.")
@click.option("--clip-norm", type=float, help="Clip every update to this L2 norm (own bound).")
@click.option(
    "--noise-multiplier", default=0.0, show_default=True, type=float,
    help="Add Gaussian noise of std MULTIPLIER x clip norm to every update.",
)  # fmt: skip
@click.option("--connect-timeout", default=30.0, show_default=True, type=float, help="Seconds.")
@click.option("--log-level", default="info", show_default=True)
# Over-the-air updates and the board's identity in the fleet.
@click.option("--models-dir", type=click.Path(path_type=Path),
              help="Where deployed bundles go; enables over-the-air updates.")  # fmt: skip
@click.option("--trust-key", type=click.Path(path_type=Path),
              help="Public key (signing.pub) deploys must be signed with.")  # fmt: skip
@click.option("--profile", "device_profile", default="",
              help="Board profile (raspberry-pi, jetson, a profile.toml).")  # fmt: skip
@click.option("--group", default="", help="Group of this device, for `deploy --group`.")
@user_errors
def agent(
    broker_url: str,
    fleet: str,
    device_id: str,
    data: str,
    bundle_dir: Path | None,
    state_dir: Path | None,
    task: str,
    runtime: str,
    threads: int | None,
    heartbeat: float,
    codec: str | None,
    no_personalize: bool,
    clip_norm: float | None,
    noise_multiplier: float,
    connect_timeout: float,
    log_level: str,
    models_dir: Path | None,
    trust_key: Path | None,
    device_profile: str,
    group: str,
) -> None:
    """Run a device agent: train the head on local data when a round selects this device."""
    from edgefl.roles.agent import Agent, AgentConfig

    setup_logging(log_level)
    try:
        device = Agent(
            AgentConfig(
                broker_url=broker_url, fleet=fleet, device_id=device_id, data=data,
                bundle_dir=bundle_dir, state_dir=state_dir, task=task, runtime=runtime,
                threads=threads, heartbeat_s=heartbeat, codec=codec,
                personalize=not no_personalize, connect_timeout_s=connect_timeout,
                clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                group=group, profile=device_profile,
            )
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    # Over-the-air updates go into --models-dir, checked against --trust-key.
    if models_dir is not None or trust_key is not None:
        from edgefl.delivery.updater import enable_updates

        enable_updates(device, models_dir, trust_key)
    stop_on_sigterm(device.stop)
    click.echo(f"agent {device_id} joining fleet {fleet} at {broker_url}", err=True)
    device.run_forever()


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path))
@click.option("--rounds", default=10, show_default=True, type=int)
@click.option("--strategy", default="fedavg", show_default=True, help="fedavg, fedprox, fedadam...")
@click.option("--param", "params", multiple=True, help="Strategy parameter NAME=VALUE (repeat).")
@click.option("--fraction", default=1.0, show_default=True, type=float, help="Share selected.")
@click.option("--min-devices", default=1, show_default=True, type=int)
@click.option("--deadline", default=60.0, show_default=True, type=float, help="Seconds per round.")
@click.option(
    "--quorum", default=0.5, show_default=True, type=float, help="Share that must report."
)
@click.option("--wait-devices", default=60.0, show_default=True, type=float, help="Seconds.")
@click.option(
    "--stale-after", type=float,
    help="Seconds without a status before a device counts as stale and is not selected "
    "[default: 3 x the heartbeat interval each device announces].",
)  # fmt: skip
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--lr", default=0.1, show_default=True, type=float)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option(
    "--codec", type=click.Choice(["float32", "int8", "topk"]), default="float32", show_default=True
)
@click.option("--topk-fraction", default=0.01, show_default=True, type=float)
@click.option("--max-update-bytes", default=16 * 1024 * 1024, show_default=True, type=int)
@click.option("--max-norm", type=float, help="Reject updates with a larger L2 norm.")
@click.option("--clip-norm", type=float, help="Devices clip their update to this L2 norm.")
@click.option(
    "--noise-multiplier", default=0.0, show_default=True, type=float,
    help="Devices add Gaussian noise of std MULTIPLIER x clip norm (DP-FedAvg).",
)  # fmt: skip
@click.option("--allow", help="Comma-separated device IDs allowed in the fleet.")
@click.option("--eval", "eval_source", help="Server-side eval set: 'digits' or a .npz/folder.")
@click.option("--state", "state_path", type=click.Path(path_type=Path), help="SQLite state file.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Metrics and final heads.")
@click.option("--log-level", default="warning", show_default=True)
@user_errors
def aggregate(
    broker_url: str,
    fleet: str,
    bundle_dir: Path,
    rounds: int,
    strategy: str,
    params: tuple[str, ...],
    fraction: float,
    min_devices: int,
    deadline: float,
    quorum: float,
    wait_devices: float,
    stale_after: float | None,
    epochs: int,
    lr: float,
    batch_size: int,
    codec: str,
    topk_fraction: float,
    max_update_bytes: int,
    max_norm: float | None,
    clip_norm: float | None,
    noise_multiplier: float,
    allow: str | None,
    eval_source: str | None,
    state_path: Path | None,
    out_dir: Path | None,
    log_level: str,
) -> None:
    """Run federated rounds over the fleet's devices and keep the record in SQLite."""
    from rich.console import Console

    from edgefl.data import DIGITS, Dataset, fl_digits_split, load_dataset
    from edgefl.roles.aggregator import Aggregator, AggregatorConfig, RoundSummary

    setup_logging(log_level)
    console = Console(stderr=False)
    eval_dataset = None
    if eval_source == DIGITS:
        _, _, (x_test, y_test) = fl_digits_split()
        eval_dataset = Dataset(x_test, y_test, [str(i) for i in range(10)])
    elif eval_source is not None:
        eval_dataset = load_dataset(eval_source)

    def progress(summary: RoundSummary) -> None:
        accuracy = summary.metrics.get("accuracy")
        rejected = sum(summary.rejected.values())
        stale = summary.stale_devices
        console.print(
            f"round {summary.round:>3}  {summary.status:<6}  head v{summary.head_version}  "
            f"{summary.selected}/{summary.online} online selected  {len(stale)} stale  "
            f"{summary.accepted}/{summary.selected} accepted  {rejected} rejected  "
            f"{summary.late} late  "
            + (f"accuracy {accuracy:.4f}  " if accuracy is not None else "")
            + f"{summary.seconds:.2f}s"
            + (f"  stale: {', '.join(stale)}" if stale else ""),
            markup=False,
        )

    try:
        config = AggregatorConfig(
            broker_url=broker_url, fleet=fleet, bundle_dir=bundle_dir, rounds=rounds,
            strategy=strategy, strategy_params=parse_params(params), fraction=fraction,
            min_devices=min_devices, stale_after_s=stale_after, deadline_s=deadline, quorum=quorum,
            wait_devices_s=wait_devices, epochs=epochs, lr=lr, batch_size=batch_size,
            codec=codec, topk_fraction=topk_fraction, max_update_bytes=max_update_bytes,
            max_norm=max_norm, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
            allow=[a for a in allow.split(",") if a] if allow else None,
            state_path=state_path or (out_dir / "state.sqlite" if out_dir else None),
            out_dir=out_dir,
        )  # fmt: skip
        server = Aggregator(config, eval_dataset=eval_dataset, on_round=progress)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    stop_on_sigterm(server.stop)
    console.print(f"aggregating fleet {fleet} at {broker_url}: {rounds} rounds of {strategy}")
    summary = server.run()
    final = f"accuracy {summary.accuracy:.4f}, " if summary.accuracy is not None else ""
    console.print(
        f"done: {len(summary.rounds)} rounds, head v{summary.head_version}, {final}"
        f"{summary.seconds:.1f}s; state in {summary.state_path}"
    )
