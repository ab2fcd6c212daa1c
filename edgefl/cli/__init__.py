"""The `edgefl` command line: parses, builds library objects, calls them, maps errors to exits.

Nothing here holds logic a user could not reach from Python; every command calls the library.
One module per group of commands; `shell` maps errors to exit codes, `options` builds options.
"""

from __future__ import annotations

import click

from edgefl import __version__
from edgefl.cli.auth import devices
from edgefl.cli.compress import compress, recipes
from edgefl.cli.dashboard import dashboard
from edgefl.cli.delivery import deploy, flash, fleet, keys
from edgefl.cli.federation import agent, aggregate, aggregate_worker, broker
from edgefl.cli.security import broker_config, certs
from edgefl.cli.simulation import demo, simulate
from edgefl.cli.tune import tune


@click.group()
@click.version_option(__version__, prog_name="edgefl")
def main() -> None:
    """edgefl: compress a PyTorch model, ship it to boards over MQTT, federate what they learn."""


for _command in (compress, recipes, broker, agent, aggregate, aggregate_worker, keys, deploy,
                 fleet, flash, simulate, demo, certs, broker_config, dashboard, devices,
                 tune):  # fmt: skip
    main.add_command(_command)

__all__ = ["main"]
