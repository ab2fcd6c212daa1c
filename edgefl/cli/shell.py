"""What every command shares: library errors mapped to messages and exit codes, logging, SIGTERM."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

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


def setup_logging(level: str) -> None:
    """Log to stderr at `level` (debug, info, warning, error)."""
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def stop_on_sigterm(stop: Callable[[], None]) -> None:
    """Make SIGTERM (systemd, test harnesses) stop cleanly instead of killing mid-write."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop())
