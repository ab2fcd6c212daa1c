"""Options shared by commands, and their parsing into library values."""

from __future__ import annotations

from typing import Any

import click


def parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    """Parse repeated NAME=VALUE strategy parameters; VALUE is JSON where it parses as JSON."""
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
