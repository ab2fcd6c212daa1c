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
    from edgefl.dashboard.service import Dashboard
    from edgefl.roles.metrics_exporter import AggregatorMetrics


@click.command()
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--state", "state_path", type=click.Path(path_type=Path),
              help="The aggregator's SQLite record, opened read-only.")  # fmt: skip
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
    """Serve a live, read-only web page of a fleet: devices, rounds, deploys, privacy spent."""
    from edgefl.dashboard.service import Dashboard, DashboardSettings
    from edgefl.errors import EdgeflError

    settings = DashboardSettings(
        broker_url=options["broker_url"], fleet=options["fleet"],
        state_path=options["state_path"], host=options["host"], port=options["port"],
        token=options["token"], tls=tls_settings(options),
    )  # fmt: skip
    try:
        page = Dashboard(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(options["log_level"])
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
    (say or (lambda line: click.echo(line, err=True)))(f"dashboard: {url}")
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
