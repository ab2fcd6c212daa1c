"""The `edgefl` command line: parses, builds library objects, calls them, maps errors to exits.

Nothing here holds logic a user could not reach from Python; every command calls the library.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgefl import __version__
from edgefl.errors import EdgeflError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn an EdgeflError into a one-line message on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeflError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(__version__, prog_name="edgefl")
def main() -> None:
    """edgefl: compress a PyTorch model, ship it to boards over MQTT, federate what they learn."""


# --- compression: compress, recipes ---


@main.command()
@click.option("--model", required=True, help="Built-in name (digits-cnn, digits-mlp, mobilenet-v2, "
              "resnet18) or package.module:factory.")  # fmt: skip
@click.option("--weights", type=click.Path(path_type=Path), help=".safetensors or state-dict .pt.")
@click.option("--head", default=None, help="Module path of the head (default: the last Linear).")
@click.option("--num-classes", type=int, default=None, help="Replace the head with a fresh one "
              "for K classes and train it on the data (backbone frozen).")  # fmt: skip
@click.option(
    "--finetune", default=None, help="Also train the backbone: 'all' or the last N blocks."
)
@click.option("--recipe", required=True, help="Recipe name (see `edgefl recipes`) or a .toml file.")
@click.option("--data", required=True, help="'digits', an ImageFolder directory or a .npz (X, y).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--resize", default=None, help="Resize images to HxW (or N for NxN); recorded "
              "in the bundle (built-ins: 224x224).")  # fmt: skip
@click.option("--mean", default=None, help="Per-channel mean after scaling to [0, 1], e.g. "
              "0.485,0.456,0.406 (built-ins: ImageNet's).")  # fmt: skip
@click.option("--std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--grayscale", is_flag=True, help="Decode images as one gray channel (default RGB).")
@click.option("--name", default=None, help="Bundle name (default: the model's name).")
@click.option("--version", "bundle_version", type=click.IntRange(min=1), default=None,
              help="Bundle version (default 1, or the replaced bundle's version + 1).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be pruned and exported; write nothing."
)
@user_errors
def compress(
    model: str,
    weights: Path | None,
    head: str | None,
    num_classes: int | None,
    finetune: str | None,
    recipe: str,
    data: str,
    out: Path,
    resize: str | None,
    mean: str | None,
    std: str | None,
    grayscale: bool,
    name: str | None,
    bundle_version: int | None,
    force: bool,
    dry_run: bool,
) -> None:
    """Prune, distill, quantize and export a model into a verified bundle."""
    from rich.console import Console

    from edgefl.compression.pipeline import CompressRequest
    from edgefl.compression.pipeline import compress as run_compress
    from edgefl.compression.preprocess import PreprocessOverrides, parse_channels, parse_resize

    overrides = PreprocessOverrides(
        resize=parse_resize(resize) if resize is not None else None,
        mean=parse_channels(mean, "--mean") if mean is not None else None,
        std=parse_channels(std, "--std") if std is not None else None,
        grayscale=grayscale,
    )
    request = CompressRequest(
        model=model, recipe=recipe, data=data, out=out, weights=weights, head=head,
        num_classes=num_classes, finetune=finetune, force=force, dry_run=dry_run,
        version=bundle_version, name=name, preprocess=overrides,
    )  # fmt: skip
    run_compress(request, Console())


@main.command()
@user_errors
def recipes() -> None:
    """List the shipped compression recipes."""
    from edgefl.compression.recipe import available_recipes, load_recipe

    for recipe_name in available_recipes():
        click.echo(f"{recipe_name:<14} {load_recipe(recipe_name).description}")


# --- federation: broker, agent, aggregate ---


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _stop_on_sigterm(stop: Callable[[], None]) -> None:
    """Make SIGTERM (systemd, test harnesses) stop cleanly instead of killing mid-write."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop())


@main.command()
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
    _stop_on_sigterm(done.set)
    try:
        while not done.wait(0.5):
            pass
    finally:
        embedded.stop()


@main.command()
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

    _setup_logging(log_level)
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
    _stop_on_sigterm(device.stop)
    click.echo(f"agent {device_id} joining fleet {fleet} at {broker_url}", err=True)
    device.run_forever()


def _parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    import json

    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--param {item!r} must look like NAME=VALUE")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


@main.command()
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

    _setup_logging(log_level)
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
            strategy=strategy, strategy_params=_parse_params(params), fraction=fraction,
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
    _stop_on_sigterm(server.stop)
    console.print(f"aggregating fleet {fleet} at {broker_url}: {rounds} rounds of {strategy}")
    summary = server.run()
    final = f"accuracy {summary.accuracy:.4f}, " if summary.accuracy is not None else ""
    console.print(
        f"done: {len(summary.rounds)} rounds, head v{summary.head_version}, {final}"
        f"{summary.seconds:.1f}s; state in {summary.state_path}"
    )


# --- delivery: keys, deploy, fleet, flash ---


@main.group()
def keys() -> None:
    """Ed25519 signing keys: deploys are signed, boards trust the public key."""


@keys.command("init")
@click.option("--dir", "key_dir", type=click.Path(path_type=Path), default=None,
              help="Where to write signing.key/.pub [~/.config/edgefl/keys].")  # fmt: skip
@user_errors
def keys_init(key_dir: Path | None) -> None:
    """Create a signing key pair (never overwrites an existing one)."""
    from edgefl import signing

    paths = signing.init_keys(key_dir or signing.DEFAULT_KEY_DIR)
    public = signing.load_public_key(paths.public)
    click.echo(f"private key: {paths.private} (mode 0600; keep it off the boards)")
    click.echo(f"public key:  {paths.public} (key id {signing.key_id(public)})")
    click.echo("give the public key to each agent: edgefl agent ... --trust-key signing.pub")


def _default_key_file() -> Path:
    from edgefl import signing

    return (signing.DEFAULT_KEY_DIR / signing.PRIVATE_KEY_FILE).expanduser()


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--group", default=None, help="Deploy to the boards of this group only.")
@click.option("--devices", default=None, help="Deploy to these device IDs only (a,b,c).")
@click.option("--key", "key_file", type=click.Path(path_type=Path), default=None,
              help="Signing key [~/.config/edgefl/keys/signing.key].")  # fmt: skip
@click.option("--chunk-size", default=1024 * 1024, show_default=True, type=int, help="Bytes.")
@click.option("--timeout", default=120.0, show_default=True, type=float,
              help="Seconds to wait for the online boards to report.")  # fmt: skip
@user_errors
def deploy(
    bundle: Path,
    broker_url: str,
    fleet: str,
    group: str | None,
    devices: str | None,
    key_file: Path | None,
    chunk_size: int,
    timeout: float,
) -> None:
    """Sign BUNDLE and ship it to a fleet; boards install it and report (retained for late ones).

    Exits 1 when a targeted online board did not end up running the bundle.
    """
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
    from rich.table import Table

    from edgefl import signing
    from edgefl.delivery.deploy import FAILED, OFFLINE, UPDATED
    from edgefl.delivery.deploy import deploy as run_deploy
    from edgefl.delivery.release import DeployReport

    device_list = None
    if devices is not None:
        device_list = [d.strip() for d in devices.split(",") if d.strip()]
    key = signing.load_private_key(key_file or _default_key_file())
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description:<16}"), BarColumn(), DownloadColumn(),
        TextColumn("{task.fields[state]}"), console=console, transient=True,
    )  # fmt: skip
    rows: dict[str, TaskID] = {}
    lock = threading.Lock()

    def on_targets(online: set[str], offline: set[str]) -> None:
        console.print(
            f"deploying {bundle} to {len(online)} online board(s)"
            + (f", {len(offline)} offline (retained for them)" if offline else "")
        )

    def on_report(report: DeployReport) -> None:
        with lock:
            if report.device_id not in rows:
                rows[report.device_id] = progress.add_task(
                    report.device_id, total=report.total_bytes or None, state=""
                )
            task = rows[report.device_id]
        if report.total_bytes:
            progress.update(task, total=report.total_bytes, completed=report.received_bytes)
        if report.terminal:
            progress.update(task, completed=progress.tasks[task].total or 0)
        progress.update(task, state=report.state)

    with progress:
        result = run_deploy(
            bundle, broker_url, fleet, key, group=group, devices=device_list,
            chunk_size=chunk_size, timeout=timeout, on_report=on_report, on_targets=on_targets,
        )  # fmt: skip
    table = Table(title=f"{result.name} v{result.version} -> {result.targets.describe()}")
    for column in ("device", "outcome", "state", "running", "reason"):
        table.add_column(column)
    style = {UPDATED: "green", FAILED: "red", OFFLINE: "yellow"}
    for outcome in result.devices.values():
        running = "" if outcome.running_version is None else f"v{outcome.running_version}"
        table.add_row(
            outcome.device_id, f"[{style[outcome.outcome]}]{outcome.outcome}[/]",
            outcome.state, running, outcome.reason,
        )  # fmt: skip
    Console().print(table)
    for outcome in result.failed:  # in full, one per line: the table may have cut the reason
        click.echo(f"{outcome.device_id}: {outcome.state}: {outcome.reason}")
    click.echo(
        f"{result.count(UPDATED)} updated, {result.count(FAILED)} failed, "
        f"{result.count(OFFLINE)} offline; {result.bytes_published} bytes published "
        f"in {result.seconds:.1f} s (release {result.release_id})"
    )
    if not result.devices:
        click.echo("no targeted board is known yet; the release stays retained for new boards")
    if result.failed:
        sys.exit(1)


@main.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def fleet(broker_url: str, fleet: str, as_json: bool) -> None:
    """Show the fleet's boards: online or not, profile, model version, last seen, last round."""
    import json
    import time
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from edgefl.delivery.fleet_view import read_fleet

    rows = read_fleet(broker_url, fleet)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no devices have announced themselves in fleet {fleet!r}")
        return
    online = sum(r.state == "online" for r in rows)
    table = Table(title=f"fleet {fleet}: {online}/{len(rows)} online")
    for column in ("device", "state", "profile", "group", "model", "last seen", "last round",
                   "last deploy"):  # fmt: skip
        table.add_column(column)
    now = time.time()
    for r in rows:
        seen = "-" if not r.last_seen else f"{max(0, now - r.last_seen):.0f} s ago"
        deploy_text = r.last_deploy + (f" ({r.deploy_reason})" if r.deploy_reason else "")
        table.add_row(
            r.device_id, r.state, r.profile or "-", r.group or "-",
            f"v{r.model_version}" if r.model_version else "-", seen,
            str(r.last_round) if r.last_round else "-", deploy_text or "-",
        )  # fmt: skip
    Console(width=160).print(table)


@main.command()
@click.option("--profile", "profile_name", required=True, help="raspberry-pi, jetson, or a folder.")
@click.option("--host", default=None, help="USER@HOST to install on over ssh.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Write an offline bundle (.tar.gz) instead of using ssh.")  # fmt: skip
@click.option("--broker", "broker_url", default="mqtt://broker.local:1883", show_default=True,
              help="Broker the agent connects to.")  # fmt: skip
@click.option("--fleet", default="lab", show_default=True, help="Fleet name.")
@click.option("--device-id", default=None, help="Device ID [the host name, or the profile's].")
@click.option("--group", default="", help="Group of the device (for deploy --group).")
@click.option("--trust-key", type=click.Path(path_type=Path), default=None,
              help="Public key to trust [~/.config/edgefl/keys/signing.pub].")  # fmt: skip
@click.option("--port", type=int, default=None, help="ssh port.")
@click.option("--identity", type=click.Path(path_type=Path), default=None, help="ssh key file.")
@click.option("--no-wheel", is_flag=True, help="Install edgefl from the index, not a built wheel.")
@user_errors
def flash(
    profile_name: str,
    host: str | None,
    output: Path | None,
    broker_url: str,
    fleet: str,
    device_id: str | None,
    group: str,
    trust_key: Path | None,
    port: int | None,
    identity: Path | None,
    no_wheel: bool,
) -> None:
    """Install the agent on a board over ssh, or write the same as an offline tarball."""
    import tempfile

    from edgefl import signing
    from edgefl.delivery import flash as flashing
    from edgefl.profiles import load_profile
    from edgefl.transport.broker import parse_broker_url

    if (host is None) == (output is None):
        raise click.UsageError("give either --host USER@HOST or --output FILE.tar.gz")
    parse_broker_url(broker_url)
    profile = load_profile(profile_name)
    if device_id is None:
        device_id = flashing.default_device_id(profile, host)
    key = trust_key or signing.DEFAULT_KEY_DIR / signing.PUBLIC_KEY_FILE
    settings = flashing.BoardSettings(broker_url, fleet, device_id, group)
    with tempfile.TemporaryDirectory(prefix="edgefl-wheel-") as tmp:
        wheel = None if no_wheel else flashing.build_wheel(Path(tmp))
        files = flashing.build_install_files(profile, settings, key, wheel)
        if output is not None:
            flashing.write_offline_bundle(files, output)
            click.echo(f"wrote {output} ({len(files)} files for {device_id}); see INSTALL.md in it")
            return
        assert host is not None
        flashing.flash_over_ssh(host, files, port, identity, on_step=click.echo)
    click.echo(f"{host}: edgefl agent installed as {device_id} (systemd unit edgefl-agent)")


# --- simulation: simulate, demo ---


def _quiet_simulation_logs() -> None:
    """Warnings only, and amqtt's per-message chatter off: the live progress is the output."""
    import logging

    _setup_logging("warning")
    logging.getLogger("amqtt").setLevel(logging.ERROR)


@main.command()
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
        strategy_params=_parse_params(params), codec=codec, fraction=fraction,
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


@main.command()
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
