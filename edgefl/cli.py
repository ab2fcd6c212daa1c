"""The `edgefl` command line: parses, builds library objects, calls them, maps errors to exits.

Nothing here holds logic a user could not reach from Python; every command calls the library.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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

# --- federation: broker, agent, aggregate ---

# --- delivery: keys, deploy, fleet, flash ---

# --- simulation: simulate, demo ---
