"""`edgefl certs` and `edgefl broker-config`: a fleet CA, its certificates, the broker set-up."""

from __future__ import annotations

from pathlib import Path

import click

from edgefl.cli.shell import user_errors


@click.group()
def certs() -> None:
    """A fleet CA and the certificates it issues (mTLS with `edgefl broker-config`)."""


@certs.command("init")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for ca.crt and ca.key.")  # fmt: skip
@click.option("--name", default="edgefl fleet CA", show_default=True, help="The CA's CN.")
@user_errors
def certs_init(out_dir: Path, name: str) -> None:
    """Create a fleet CA (EC P-256; never overwrites one)."""
    from edgefl.security.certs import init_ca

    cert = init_ca(out_dir, name)
    click.echo(f"CA certificate: {cert} (give it to every client as --cafile)")
    click.echo(f"CA key:         {cert.with_suffix('.key')} (mode 0600; keep it offline)")


@certs.command("issue")
@click.argument("name")
@click.option("--role", required=True,
              type=click.Choice(["device", "aggregator", "operator", "broker"]),
              help="device (CN: its ID), aggregator, operator (operator-...), broker.")  # fmt: skip
@click.option("--ca", "ca_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of the CA (certs init).")  # fmt: skip
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Where to write [--ca].")
@click.option("--host", "hosts", multiple=True,
              help="The broker's host name or IP address (--role broker; repeat).")  # fmt: skip
@click.option("--days", default=825, show_default=True, type=int, help="Validity.")
@user_errors
def certs_issue(
    name: str, role: str, ca_dir: Path, out_dir: Path | None, hosts: tuple[str, ...], days: int
) -> None:
    """Issue NAME.crt and NAME.key (0600): a client certificate whose CN is NAME, or the
    broker's server certificate."""
    from edgefl.security.certs import issue

    issued = issue(name, role, ca_dir, out_dir or ca_dir, hosts=hosts, days=days)
    click.echo(f"{role} certificate: {issued.cert_path}")
    click.echo(f"{role} key:         {issued.key_path} (mode 0600)")


@click.command("broker-config")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--certs", "certs_dir", required=True, type=click.Path(path_type=Path),
              help="Holds ca.crt, broker.crt/.key and the clients' certificates "
                   "(aggregators, operators, a site's bridge).")  # fmt: skip
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Where mosquitto.conf, acl and the persistence file go.")  # fmt: skip
@click.option("--port", default=8883, show_default=True, type=int, help="TLS port.")
@click.option("--bind", default="", help="Address to listen on [every interface].")
@click.option("--broker-name", default="broker", show_default=True,
              help="The name the broker's certificate was issued under.")  # fmt: skip
@click.option("--user", default=None,
              help="Account Mosquitto switches to when started as root [mosquitto].")  # fmt: skip
@click.option("--bridge-to", metavar="HOST:PORT",
              help="Make a site broker bridging the fleet's topics to this centre.")  # fmt: skip
@click.option("--bridge-cert", metavar="NAME",
              help="With --bridge-to: the certificate (in --certs, CN NAME) the bridge presents "
                   "to the centre.")  # fmt: skip
@click.option("--site-bridge", "site_bridges", metavar="NAME", multiple=True,
              help="On the centre: a site bridge's certificate name allowed to forward its "
                   "boards' topics here (repeat).")  # fmt: skip
@user_errors
def broker_config(
    fleet: str,
    certs_dir: Path,
    out_dir: Path,
    port: int,
    bind: str,
    broker_name: str,
    user: str | None,
    bridge_to: str | None,
    bridge_cert: str | None,
    site_bridges: tuple[str, ...],
) -> None:
    """Write a Mosquitto configuration (mTLS listener, identities from certificates,
    persistence) and the fleet's ACL; run it with `mosquitto -c OUT/mosquitto.conf`.

    With --bridge-to, a site broker: its boards connect to it, and its bridge sends their
    statuses, updates and deploy reports to the centre and brings tasks, results, releases and
    chunks back."""
    from edgefl.security.broker_config import write_broker_config

    if (bridge_to is None) != (bridge_cert is None):
        raise click.UsageError("--bridge-to and --bridge-cert go together")
    files = write_broker_config(
        fleet, certs_dir, out_dir, port=port, bind=bind, broker_name=broker_name, user=user,
        bridge_to=bridge_to, bridge_name=bridge_cert, site_bridges=site_bridges,
    )  # fmt: skip
    click.echo(f"wrote {files.config} and {files.acl}")
    if bridge_to:
        click.echo(f"bridge: {bridge_cert} to {bridge_to}; on the centre, run broker-config "
                   f"with --site-bridge {bridge_cert}")  # fmt: skip
    click.echo(f"run: mosquitto -c {files.config}")
