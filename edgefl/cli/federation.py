"""`edgefl broker`, `agent` and `aggregate`: the two roles of a federation, and a test broker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import click

from edgefl.cli.auth import (
    agent_auth,
    agent_auth_options,
    aggregator_auth,
    aggregator_auth_options,
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
from edgefl.cli.shell import setup_logging, stop_on_sigterm, user_errors
from edgefl.cli.workers import aggregate_worker, take_worker_options, worker_options
from edgefl.core.board_limits import BoardLimits
from edgefl.core.codecs import CODEC_NAMES
from edgefl.core.settings import (
    AcceptancePolicy,
    AsyncPolicy,
    CodecSettings,
    PrivacySettings,
    RoundPolicy,
    RoundSettings,
    TrainConfig,
)
from edgefl.core.strategies import strategy_label

__all__ = ["agent", "aggregate", "aggregate_worker", "broker"]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=1883, show_default=True, type=int, help="TCP port (0: any free).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="user:argon2-hash lines (edgefl.transport.broker.password_line); "
                   "clients must log in.")  # fmt: skip
@click.option("--cert", "certfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The broker's certificate (edgefl certs issue --role broker): TLS.")  # fmt: skip
@click.option("--key", "keyfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The key of --cert.")  # fmt: skip
@user_errors
def broker(
    host: str, port: int, password_file: Path | None, certfile: Path | None, keyfile: Path | None
) -> None:
    """Run the embedded MQTT broker (amqtt) until Ctrl-C; use Mosquitto in production."""
    import threading

    from edgefl.transport.broker import EmbeddedBroker

    embedded = EmbeddedBroker(
        host, port, password_file=password_file, certfile=certfile, keyfile=keyfile
    )
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
@click.option("--data", required=True,
              help="Local data: 'digits', a .npz or an image folder (empty: online with 0 "
              "samples, not selected, until images appear).")  # fmt: skip
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Feature cache, personal head.")
@click.option("--task", default="default", show_default=True, help="Which head to train.")
@click.option(
    "--runtime", type=click.Choice(["auto", "onnx", "tflite"]), default="auto", show_default=True
)
@click.option("--threads", type=int, help="Runtime threads (default: the profile's, else 1).")
@click.option("--heartbeat", "heartbeat_s", default=30.0, show_default=True, type=float,
              help="Seconds between status messages.")  # fmt: skip
@click.option("--codec", type=click.Choice(CODEC_NAMES), help="Override the task's codec.")
@click.option("--no-personalize", is_flag=True, help="Do not keep a personal head.")
@settings_options(PrivacySettings)
# A board's limits: each flag given replaces that one of the profile's [limits] (or the default).
@settings_options(BoardLimits, defaults={f.name: None for f in fields(BoardLimits)})
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
@agent_auth_options
@tls_options()
@user_errors
def agent(**options: Any) -> None:
    """Run a device agent: train the head on local data when a round selects this device."""
    from edgefl.roles.agent import Agent, AgentConfig

    # A board's own bound needs no clip of its own for noise: the round's clip may apply.
    privacy = build_settings(PrivacySettings, options, check=False)
    given = {f.name: options.pop(f.name) for f in fields(BoardLimits)}
    limits = None
    if any(value is not None for value in given.values()):
        from edgefl.profiles import load_profile

        profile = options["device_profile"]
        base = load_profile(profile).limits if profile else BoardLimits()
        limits = replace(base, **{k: v for k, v in given.items() if v is not None})
    models_dir, trust_key = options.pop("models_dir"), options.pop("trust_key")
    tls = tls_settings(options)
    setup_logging(options["log_level"])
    auth = agent_auth(options, trust_key, options["state_dir"])
    config = AgentConfig(
        broker_url=options["broker_url"], fleet=options["fleet"], device_id=options["device_id"],
        data=options["data"], bundle_dir=options["bundle_dir"], state_dir=options["state_dir"],
        task=options["task"], runtime=options["runtime"], threads=options["threads"],
        heartbeat_s=options["heartbeat_s"], codec=options["codec"],
        personalize=not options["no_personalize"],
        connect_timeout_s=options["connect_timeout"], privacy=privacy,
        group=options["group"], profile=options["device_profile"], limits=limits, tls=tls,
        auth=auth,
    )  # fmt: skip
    check_settings(
        config,
        [f.name for f in fields(AgentConfig)]
        + ["clip_norm", "noise_multiplier"]
        + [f.name for f in fields(BoardLimits)],
    )
    device = Agent(config)
    # Over-the-air updates go into --models-dir, checked against --trust-key.
    if models_dir is not None or trust_key is not None:
        from edgefl.delivery.updater_binding import enable_updates

        enable_updates(device, models_dir, trust_key)
    stop_on_sigterm(device.stop)
    click.echo(f"agent {config.device_id} joining fleet {config.fleet} at {config.broker_url}",
               err=True)  # fmt: skip
    device.run_forever()


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path))
@strategy_options
@settings_options(RoundPolicy)
@settings_options(TrainConfig)
@settings_options(CodecSettings)
@settings_options(PrivacySettings)
@settings_options(AcceptancePolicy)
@settings_options(AsyncPolicy)
@click.option("--eval", "eval_source", help="Server-side eval set: 'digits' or a .npz/folder.")
@click.option("--state", "state_path", type=click.Path(path_type=Path),
              help="SQLite state file [OUT/state.sqlite with --out, else in memory].")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Metrics and final heads.")
@click.option("--log-level", default="warning", show_default=True)
@click.option("--metrics-port", help="Serve Prometheus /metrics on PORT (127.0.0.1) or HOST:PORT.")
@worker_options
@aggregator_auth_options
@tls_options()
@user_errors
def aggregate(**options: Any) -> None:
    """Run federated rounds over the fleet's devices and keep the record in SQLite."""
    from rich.console import Console

    from edgefl.cli.dashboard import start_metrics
    from edgefl.data import DIGITS, Dataset, fl_digits_split, load_dataset
    from edgefl.roles.aggregator import Aggregator, AggregatorConfig, RoundSummary
    from edgefl.roles.metrics_exporter import chain_rounds

    strategy, strategy_params = resolve_strategy(options.pop("strategy"), options.pop("params"))
    policy = build_settings(RoundPolicy, options)
    settings = RoundSettings(
        train=build_settings(TrainConfig, options),
        privacy=build_settings(PrivacySettings, options),
        codec=build_settings(CodecSettings, options),
    )
    acceptance = build_settings(AcceptancePolicy, options)
    asynchronous = build_settings(AsyncPolicy, options)
    scale_out = take_worker_options(options, asynchronous.is_async)
    out_dir: Path | None = options["out_dir"]
    state_path = options["state_path"] or (out_dir / "state.sqlite" if out_dir else None)
    auth = aggregator_auth(options, state_path)
    config = AggregatorConfig(
        broker_url=options["broker_url"], fleet=options["fleet"],
        bundle_dir=options["bundle_dir"], policy=policy, settings=settings,
        acceptance=acceptance, strategy=strategy, strategy_params=strategy_params,
        state_path=state_path, out_dir=out_dir, tls=tls_settings(options), auth=auth,
    )  # fmt: skip
    check_settings(config, ["fleet"])
    setup_logging(options["log_level"])
    console = Console(stderr=False)
    eval_dataset = None
    eval_source = options["eval_source"]
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

    metrics = start_metrics(options["metrics_port"], config.fleet)
    make: Callable[..., Aggregator] = Aggregator
    if scale_out.expected:
        from edgefl.roles.coordinator import Coordinator

        make = partial(Coordinator, workers=scale_out.expected,
                       collect_timeout_s=scale_out.collect_timeout_s)  # fmt: skip
    if asynchronous.is_async:
        from edgefl.roles.async_aggregator import AsyncAggregator

        make = partial(AsyncAggregator, asynchronous=asynchronous)
    server = make(
        config, eval_dataset=eval_dataset,
        on_round=chain_rounds(metrics.on_round if metrics else None, progress),
        on_verdict=metrics.on_verdict if metrics else None,
    )  # fmt: skip
    if metrics is not None:
        metrics.watch_presence(server.device_presence)
    stop_on_sigterm(server.stop)
    label = strategy_label(strategy)
    if asynchronous.is_async:
        label += (f", async: a head version every {asynchronous.buffer} updates, staleness "
                  f"<= {asynchronous.max_staleness} weighted {asynchronous.staleness}")  # fmt: skip
    if scale_out.expected:
        label += f", {scale_out.expected} ingest workers ({scale_out.local} here)"
    console.print(f"aggregating fleet {config.fleet} at {config.broker_url}: "
                  f"{policy.rounds} rounds of {label}")  # fmt: skip
    with scale_out.start_local(config.broker_url, config.fleet, server.stop):
        summary = server.run()
    final = f"accuracy {summary.accuracy:.4f}, " if summary.accuracy is not None else ""
    console.print(
        f"done: {len(summary.rounds)} rounds, head v{summary.head_version}, {final}"
        f"{summary.seconds:.1f}s; state in {summary.state_path}"
    )
