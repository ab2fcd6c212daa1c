"""Watching a fleet from the CLI: `edgefl dashboard`, the page `simulate` and `demo` offer with
`--dashboard`, and the Prometheus endpoint `aggregate` and `simulate` serve with `--metrics-port`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefl.cli.options import tls_options, tls_settings
from edgefl.cli.shell import setup_logging, stop_on_sigterm, user_errors

if TYPE_CHECKING:
    from edgefl.dashboard.service import Dashboard, DashboardSettings
    from edgefl.roles.metrics_exporter import AggregatorMetrics


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--state", "state_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The aggregator's SQLite record, opened read-only: its rounds, and the "
                   "device keys every status and deploy report is checked against.")  # fmt: skip
@click.option("--insecure", is_flag=True,
              help="Check no seal, even with --state (a fleet running --insecure; every start "
                   "says so).")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; any but loopback needs --token.")  # fmt: skip
@click.option("--port", default=8050, show_default=True, type=int)
@click.option("--token", envvar="EDGEFL_DASHBOARD_TOKEN",
              help="Required on every request (?token= or Authorization: Bearer); "
                   "also from $EDGEFL_DASHBOARD_TOKEN.")  # fmt: skip
@click.option("--log-level", default="warning", show_default=True)
@tls_options()
@user_errors
def dashboard(**options: Any) -> None:
    """Serve a live, read-only web page of a fleet: devices, rounds, deploys, privacy spent.

    With --state, a device's status or deploy report is shown only when sealed by the key the
    device is enrolled (or pinned) with there; refused ones are counted per device on the page.
    """
    from edgefl.dashboard.service import Dashboard, DashboardSettings
    from edgefl.errors import EdgeflError

    settings = DashboardSettings(
        broker_url=options["broker_url"], fleet=options["fleet"],
        state_path=options["state_path"], host=options["host"], port=options["port"],
        token=options["token"], tls=tls_settings(options), insecure=options["insecure"],
    )  # fmt: skip
    try:
        page = Dashboard(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(options["log_level"])
    say_what_is_checked(settings)
    try:
        url = page.start()
    except OSError as exc:
        raise EdgeflError(f"{exc}; choose another with --port") from None
    click.echo(f"dashboard of fleet {settings.fleet} at {url} (Ctrl-C to stop)", err=True)
    stop_on_sigterm(page.stop)
    try:
        page.wait()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        page.stop()


def say_what_is_checked(settings: DashboardSettings) -> None:
    """Warn at start when the devices' seals go unchecked, as every `--insecure` start does,
    and when the state file holding their keys is not there (yet)."""
    forgeable = "so anyone on the broker can forge the statuses and deploy reports it shows"
    if settings.insecure:
        click.echo(f"WARNING: the dashboard runs --insecure: it checks no seal, {forgeable}",
                   err=True)  # fmt: skip
    elif settings.state_path is None:
        click.echo(f"WARNING: no --state: the dashboard checks no seal, {forgeable}; give the "
                   "aggregator's state file to check them against its device keys",
                   err=True)  # fmt: skip
    elif not settings.state_path.exists():
        click.echo(f"{settings.state_path} does not exist yet: every board's message is refused "
                   "until the aggregator creates it with the device keys", err=True)  # fmt: skip


def dashboard_options(command: Any) -> Any:
    """Add `--dashboard` and `--dashboard-port` to a command that runs a fleet on this machine."""
    port = click.option("--dashboard-port", default=8050, show_default=True, type=int,
                        help="Port of --dashboard (0: any free one).")  # fmt: skip
    flag = click.option("--dashboard", "with_dashboard", is_flag=True,
                        help="Serve the live fleet page on 127.0.0.1 while it runs.")  # fmt: skip
    return flag(port(command))


def start_local_dashboard(
    broker_url: str, fleet: str, port: int, say: Callable[[str], None] | None = None
) -> Dashboard:
    """Serve a fleet's dashboard on 127.0.0.1 beside a simulation, say where, and return it.

    Raises:
        EdgeflError: the port cannot be bound.
    """
    from edgefl.dashboard.service import Dashboard, DashboardSettings
    from edgefl.errors import EdgeflError

    page = Dashboard(DashboardSettings(broker_url, fleet, port=port))
    try:
        url = page.start()
    except OSError as exc:
        raise EdgeflError(f"{exc}; choose another with --dashboard-port") from None
    # The simulation's device keys live in its own memory, out of the page's reach.
    (say or (lambda line: click.echo(line, err=True)))(
        f"dashboard: {url} (seals not checked: the simulation keeps its device keys in memory)"
    )
    return page


def keep_dashboard_open(page: Dashboard | None) -> None:
    """After a run: in a terminal, keep the page served until a key is pressed; then stop it."""
    if page is None:
        return
    click.pause(f"the dashboard stays at {page.url}; press any key to stop it", err=True)
    page.stop()


def start_metrics(listen: str | None, fleet: str) -> AggregatorMetrics | None:
    """Serve an aggregator's Prometheus metrics as `--metrics-port` says (None: not asked).

    Raises:
        click.UsageError: the value is not PORT or HOST:PORT.
        EdgeflError: the port cannot be bound.
    """
    if listen is None:
        return None
    from edgefl.errors import EdgeflError
    from edgefl.roles.metrics_exporter import AggregatorMetrics, parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    metrics = AggregatorMetrics(fleet)
    try:
        port = metrics.serve(port, host)
    except OSError as exc:
        raise EdgeflError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    click.echo(f"metrics: http://{host}:{port}/metrics", err=True)
    return metrics
