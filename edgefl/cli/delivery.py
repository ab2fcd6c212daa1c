"""`edgefl keys`, `deploy`, `fleet` and `flash`: signed bundles to boards, and boards' state."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.cli.auth import device_verifier, reader_auth_options
from edgefl.cli.options import tls_options, tls_settings
from edgefl.cli.shell import user_errors


@click.group()
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


@click.command()
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
@reader_auth_options
@tls_options(key_flag="--tls-key")
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
    state_path: Path | None,
    insecure: bool,
    **tls_files: str | None,
) -> None:
    """Sign BUNDLE and ship it to a fleet; boards install it and report (retained for late ones).

    Exits 1 when a targeted online board did not end up running the bundle.
    """
    import threading

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
    from rich.table import Table

    from edgefl import signing
    from edgefl.delivery.chunks import ChunkError, check_chunk_size
    from edgefl.delivery.deploy import FAILED, OFFLINE, UPDATED
    from edgefl.delivery.deploy import deploy as run_deploy
    from edgefl.delivery.release import DeployReport

    device_list = None
    if devices is not None:
        device_list = [d.strip() for d in devices.split(",") if d.strip()]
    try:  # checked before the key is read or the broker dialled
        check_chunk_size(chunk_size)
    except ChunkError as exc:
        raise click.BadParameter(str(exc), param_hint="'--chunk-size'") from None
    key = signing.load_private_key(key_file or _default_key_file())
    device_keys = device_verifier({"state_path": state_path, "insecure": insecure}, "deploy")
    tls = tls_settings(tls_files)
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
            tls=tls, device_keys=device_keys,
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
    for device, why in sorted(result.refused.items()):
        click.echo(f"refused a message in the name of {device}: {why}")
    if not result.devices:
        click.echo("no targeted board is known yet; the release stays retained for new boards")
    if result.failed:
        sys.exit(1)


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@reader_auth_options
@tls_options()
@user_errors
def fleet(
    broker_url: str,
    fleet: str,
    as_json: bool,
    state_path: Path | None,
    insecure: bool,
    **tls_files: str | None,
) -> None:
    """Show the fleet's boards: online or not, profile, model version and bundle digest, what runs
    the backbone (artifact, runtime, provider), samples, last seen, last round."""
    import json
    import time
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from edgefl.delivery.fleet_view import privacy_line, read_fleet, running_text, short_digest
    from edgefl.transport.messages import RoundResult

    devices = device_verifier({"state_path": state_path, "insecure": insecure}, "fleet")
    results: dict[int, RoundResult] = {}
    rows = read_fleet(broker_url, fleet, tls=tls_settings(tls_files), results=results,
                      devices=devices)  # fmt: skip
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    if not rows:
        click.echo(f"no devices have announced themselves in fleet {fleet!r}")
        return
    online = sum(r.state == "online" for r in rows)
    table = Table(title=f"fleet {fleet}: {online}/{len(rows)} online")
    for column in ("device", "state", "key", "profile", "group", "model", "bundle", "runs",
                   "samples", "last seen", "last round", "last deploy"):  # fmt: skip
        table.add_column(column)
    now = time.time()
    for r in rows:
        seen = "-" if not r.last_seen else f"{max(0, now - r.last_seen):.0f} s ago"
        deploy_text = r.last_deploy + (f" ({r.deploy_reason})" if r.deploy_reason else "")
        table.add_row(
            r.device_id, r.state, r.key or "unchecked", r.profile or "-", r.group or "-",
            f"v{r.model_version}" if r.model_version else "-", short_digest(r.bundle_digest),
            running_text(r), str(r.samples), seen, str(r.last_round) if r.last_round else "-",
            deploy_text or "-",
        )  # fmt: skip
    Console(width=200).print(table)
    for r in rows:
        if r.refused:
            click.echo(f"refused a message in the name of {r.device_id}: {r.refused}")
    click.echo(privacy_line(results.values()))


@click.command()
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
@click.option("--no-wheel", is_flag=True,
              help="Ship no wheels: the board installs everything from its index.")  # fmt: skip
@click.option("--no-board-key", is_flag=True,
              help="Make no board key here: the agent makes one on first start.")  # fmt: skip
@click.option("--enroll", "enroll_state", type=click.Path(path_type=Path, dir_okay=False),
              help="Enroll the board's key in this aggregator state file.")  # fmt: skip
@tls_options()
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
    no_board_key: bool,
    enroll_state: Path | None,
    **tls_files: str | None,
) -> None:
    """Install the agent on a board over ssh, or write the same as an offline tarball.

    The board's own signing key is made here and installed in its state directory (kept if the
    board has one); its public half is recorded in ~/.config/edgefl/devices/FLEET/ID.pub, to
    enroll on the aggregator (`edgefl devices enroll`, or --enroll STATE now).

    The board needs no network to install: every wheel it needs, for the architecture and
    Python of its profile, is downloaded here and shipped (unless --no-wheel).
    --cafile, --cert and --key (the board's, from `edgefl certs issue ID --role device`) are
    installed in /etc/edgefl/tls/ and the agent connects with them (mqtts:// brokers only).
    """
    import tempfile

    from edgefl import signing
    from edgefl.delivery import flash as flashing
    from edgefl.profiles import load_profile
    from edgefl.transport.broker import parse_broker_url
    from edgefl.transport.tls import check_tls

    if (host is None) == (output is None):
        raise click.UsageError("give either --host USER@HOST or --output FILE.tar.gz")
    tls = tls_settings(tls_files)
    check_tls(parse_broker_url(broker_url), tls)  # before the slow wheel build
    profile = load_profile(profile_name)
    if device_id is None:
        device_id = flashing.default_device_id(profile, host)
    key = trust_key or signing.DEFAULT_KEY_DIR / signing.PUBLIC_KEY_FILE
    settings = flashing.BoardSettings(broker_url, fleet, device_id, group, tls)
    with tempfile.TemporaryDirectory(prefix="edgefl-wheel-") as tmp:
        wheel, wheels = (None, []) if no_wheel else flashing.board_wheels(profile, Path(tmp))
        board_key = None if no_board_key else Ed25519PrivateKey.generate()
        files = flashing.build_install_files(profile, settings, key, wheel, wheels, board_key)
        if output is not None:
            flashing.write_offline_bundle(files, output)
            click.echo(f"wrote {output} ({len(files)} files for {device_id}); see INSTALL.md in it")
        else:
            assert host is not None
            flashing.flash_over_ssh(host, files, port, identity, on_step=click.echo)
            click.echo(f"{host}: edgefl agent installed as {device_id} (systemd unit edgefl-agent)")
    if board_key is not None:
        _record_board_key(board_key, fleet, device_id, enroll_state)


def _record_board_key(
    board_key: Ed25519PrivateKey, fleet: str, device_id: str, enroll_state: Path | None
) -> None:
    """Keep the public half of a key flash made, and enroll it if asked; say which."""
    from edgefl import signing
    from edgefl.atomic import write_atomic
    from edgefl.security.device_registry import DeviceRegistry
    from edgefl.transport.sealed import raw_public_key

    public = board_key.public_key()
    record = (signing.DEFAULT_KEY_DIR.parent / "devices" / fleet / f"{device_id}.pub").expanduser()
    write_atomic(record, signing.public_pem(public), mode=0o644)
    click.echo(f"board key {signing.key_id(public)}: public half in {record}")
    if enroll_state is not None:
        DeviceRegistry(enroll_state).enroll(device_id, raw_public_key(public))
        click.echo(f"enrolled {device_id} in {enroll_state}")
    else:
        click.echo(f"enroll it: edgefl devices enroll {device_id} --key {record} --state STATE")
