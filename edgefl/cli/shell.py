"""What every command shares: library errors mapped to messages and exit codes, logging, SIGTERM."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from edgefl.errors import EdgeflError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn an EdgeflError into a one-line message on stderr and its exit code (1: the world
    failed, 2: the command was called wrong; see `edgefl.errors`). Any other exception is a bug
    and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeflError as exc:
            click.echo(f"error: {with_flags(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def with_flags(message: str) -> str:
    """Name the current command's options where a library message names a setting.

    Library messages name a setting as Python does, in backquotes (`num_classes`); where the
    running command has a parameter of that name, the user sees its option (--num-classes).
    """
    context = click.get_current_context(silent=True)
    if context is None:
        return message
    flags = {
        param.name: max(param.opts, key=len)
        for param in context.command.params
        if isinstance(param, click.Option) and param.name
    }
    return re.sub(r"`(\w+)`", lambda m: flags.get(m[1], m[0]), message)


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
