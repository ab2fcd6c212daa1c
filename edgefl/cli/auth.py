"""Who signs and whom to believe, from the command line: the options of every role that
connects, built into `edgefl.security.identity` objects; and `edgefl devices enroll|list|revoke`.

Sealing and checking are on by default, with keys in their default place (the `edgefl keys`
pair in ~/.config/edgefl/keys, a board's own key in its state directory). `--insecure` turns them
off, and the command says so on every start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edgefl.cli.shell import user_errors

F = TypeVar("F", bound=Callable[..., Any])

INSECURE_HELP = "Seal nothing and check no signature (a lab only; every start says so)."


def _default_key(name: str) -> Path:
    from edgefl import signing

    return (signing.DEFAULT_KEY_DIR / name).expanduser()


def _say_insecure(role: str) -> None:
    click.echo(f"WARNING: {role} runs --insecure: messages are neither signed nor checked, so "
               "anyone on the broker can forge them", err=True)  # fmt: skip


def aggregator_auth_options(command: F) -> F:
    """Add `--signing-key`, `--enrollment` and `--insecure` (see `aggregator_auth`)."""
    command = click.option("--insecure", is_flag=True, help=INSECURE_HELP)(command)
    command = click.option(
        "--enrollment", type=click.Choice(["strict", "tofu"]), default="strict",
        show_default=True,
        help="strict: only devices enrolled with `edgefl devices enroll`; tofu: a device's key "
        "is pinned at first contact (a lab).",
    )(command)  # fmt: skip
    return click.option(
        "--signing-key", type=click.Path(path_type=Path),
        help="Key that seals tasks and results [~/.config/edgefl/keys/signing.key].",
    )(command)  # fmt: skip


def aggregator_auth(options: dict[str, Any], state_path: Path | None) -> Any:
    """Take the `aggregator_auth_options` out of `options`; return an `AggregatorAuth` or None.

    Raises:
        click.UsageError: no signing key, or strict enrollment without a state file.
    """
    from edgefl import signing
    from edgefl.security.device_registry import DeviceRegistry
    from edgefl.security.identity import AggregatorAuth
    from edgefl.security.verifiers import DeviceVerifier

    key_file, mode = options.pop("signing_key"), options.pop("enrollment")
    if options.pop("insecure"):
        _say_insecure("the aggregator")
        return None
    path = key_file or _default_key(signing.PRIVATE_KEY_FILE)
    if not Path(path).expanduser().exists():
        raise click.UsageError(
            f"no signing key at {path}: create one with `edgefl keys init`, give --signing-key, "
            "or run --insecure"
        )
    if mode == "strict" and state_path is None:
        raise click.UsageError(
            "strict enrollment needs --state FILE (or --out) holding the enrolled devices "
            "(`edgefl devices enroll`); or use --enrollment tofu"
        )
    registry = DeviceRegistry(state_path or ":memory:")
    return AggregatorAuth(signing.load_private_key(path), DeviceVerifier(registry, mode))


def agent_auth_options(command: F) -> F:
    """Add `--device-key` and `--insecure` (the trusted key is the agent's `--trust-key`)."""
    command = click.option("--insecure", is_flag=True, help=INSECURE_HELP)(command)
    return click.option(
        "--device-key", type=click.Path(path_type=Path),
        help="This board's Ed25519 key [STATE_DIR/device.key, created on first start].",
    )(command)  # fmt: skip


def agent_auth(options: dict[str, Any], trust_key: Path | None, state_dir: Path | None) -> Any:
    """Take the `agent_auth_options` out of `options`; return an `AgentAuth` or None.

    The board believes tasks and results sealed by `trust_key` (default: the `edgefl keys`
    public key in its default place), the key that also signs its releases.

    Raises:
        click.UsageError: no trusted key, or nowhere to keep the board's key.
    """
    from edgefl import signing
    from edgefl.security.identity import AgentAuth, device_key
    from edgefl.security.verifiers import TrustedSigners

    key_file = options.pop("device_key")
    if options.pop("insecure"):
        _say_insecure("the agent")
        return None
    trusted = trust_key or _default_key(signing.PUBLIC_KEY_FILE)
    if not Path(trusted).expanduser().exists():
        raise click.UsageError(
            f"no trusted key at {trusted}: give --trust-key (the aggregator's signing.pub from "
            "`edgefl keys init`), or run --insecure"
        )
    if key_file is None and state_dir is None:
        raise click.UsageError(
            "give --state-dir (the board keeps its key there) or --device-key, or run --insecure"
        )
    trusted_key = signing.load_public_key(trusted)
    return AgentAuth(device_key(state_dir, key_file), TrustedSigners([trusted_key]))


def reader_auth_options(command: F) -> F:
    """Add `--state` (the enrolled device keys) and `--insecure`, for `fleet` and `deploy`."""
    command = click.option("--insecure", is_flag=True, help=INSECURE_HELP)(command)
    return click.option(
        "--state", "state_path", type=click.Path(path_type=Path, dir_okay=False),
        help="The aggregator's state file: boards' messages are checked against its device keys.",
    )(command)  # fmt: skip


def device_verifier(options: dict[str, Any], role: str) -> Any:
    """Take the `reader_auth_options` out of `options`; return a `DeviceVerifier` or None.

    Raises:
        click.UsageError: neither --state nor --insecure.
    """
    from edgefl.security.device_registry import DeviceRegistry
    from edgefl.security.verifiers import STRICT, DeviceVerifier

    state_path = options.pop("state_path")
    if options.pop("insecure"):
        _say_insecure(role)
        return None
    if state_path is None:
        raise click.UsageError(
            "give --state FILE (the aggregator's state, holding the enrolled device keys) so "
            "the boards' signatures are checked, or run --insecure"
        )
    if not Path(state_path).exists():
        raise click.UsageError(f"state file {state_path} does not exist")
    # Read-only: `fleet` and `deploy` run beside the aggregator that owns the file.
    return DeviceVerifier(DeviceRegistry(state_path, read_only=True), STRICT)


@click.group()
def devices() -> None:
    """The device keys an aggregator believes (kept in its state file)."""


_STATE = click.option(
    "--state", "state_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
    help="The aggregator's state file (created if missing).",
)  # fmt: skip


@devices.command("enroll")
@click.argument("device_id")
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path),
              help="The board's public key (device.pub; `edgefl flash` prints where).")  # fmt: skip
@_STATE
@user_errors
def devices_enroll(device_id: str, key_file: Path, state_path: Path) -> None:
    """Enroll DEVICE_ID with its public key (replaces a pin or a revocation)."""
    from edgefl import signing
    from edgefl.security.device_registry import DeviceRegistry
    from edgefl.transport import topics
    from edgefl.transport.sealed import raw_public_key

    try:
        topics.check_name(device_id, "device ID")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'DEVICE_ID'") from None
    entry = DeviceRegistry(state_path).enroll(
        device_id, raw_public_key(signing.load_public_key(key_file))
    )
    click.echo(f"enrolled {device_id} with key {entry.key_id} in {state_path}")


@devices.command("list")
@_STATE
@user_errors
def devices_list(state_path: Path) -> None:
    """List the devices and how their keys are known (enrolled, pinned, revoked)."""
    from edgefl.security.device_registry import DeviceRegistry

    entries = DeviceRegistry(state_path).all()
    if not entries:
        click.echo(f"no device keys in {state_path}")
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.since))
        click.echo(f"{entry.device_id}\t{entry.state}\t{entry.key_id}\tsince {when}")


@devices.command("revoke")
@click.argument("device_id")
@_STATE
@user_errors
def devices_revoke(device_id: str, state_path: Path) -> None:
    """Revoke DEVICE_ID: its messages are refused (a running aggregator from its next round)."""
    from edgefl.security.device_registry import DeviceRegistry

    try:
        entry = DeviceRegistry(state_path).revoke(device_id)
    except KeyError:
        raise click.BadParameter(f"{device_id} is not in {state_path}",
                                 param_hint="'DEVICE_ID'") from None  # fmt: skip
    click.echo(f"revoked {device_id} (key {entry.key_id})")
