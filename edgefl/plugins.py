"""Objects a user names as `package.module:attribute`: model factories, strategies, importances.

One loader for every plug-in, so a spec that does not import, names nothing, or builds the wrong
kind of object fails the same way: one line naming the spec, never a traceback of the import.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from edgefl.errors import EdgeflError, PluginError, first_line

T = TypeVar("T")


def is_plugin_spec(text: str) -> bool:
    """Return whether `text` looks like `package.module:attribute` (rather than a name)."""
    module, sep, attr = text.rpartition(":")
    return bool(sep and module and attr)


def load_attribute(spec: str, what: str = "plug-in", error: type[EdgeflError] = PluginError) -> Any:
    """Import the module of `spec` and return its attribute.

    Args:
        spec: `package.module:attribute` (the module must be importable from `sys.path`).
        what: what the spec is for ("model", "strategy"), for messages.
        error: the EdgeflError subclass to raise.

    Returns:
        The attribute, as it is (a class, a function, an instance).

    Raises:
        error: `spec` is malformed, its module fails to import (whatever it raises), or it has
            no such attribute.
    """
    module_name, _, attr = spec.rpartition(":")
    if not is_plugin_spec(spec):
        raise error(f"{what} {spec!r} must look like package.module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import module {module_name!r} of {what} {spec!r}: {exc}") from exc
    except Exception as exc:  # user code runs on import: any failure is the spec's problem
        raise error(
            f"importing module {module_name!r} of {what} {spec!r} failed: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise error(f"module {module_name!r} has no {attr!r} ({what} {spec!r})") from None


def build_plugin(
    spec: str,
    expected: type[T],
    what: str = "plug-in",
    error: type[EdgeflError] = PluginError,
    kind: str | None = None,
    **kwargs: Any,
) -> T:
    """Load `spec` and return an instance of `expected`: the attribute itself if it is one,
    else what calling it (a class or a factory) with `kwargs` returns.

    `kind` names `expected` in messages (default: its class name).

    Raises:
        error: as `load_attribute`; the attribute is neither an instance nor callable; the call
            fails (any exception, reported in one line); or it returns something else.
    """
    target = load_attribute(spec, what, error)
    if isinstance(target, expected) and not kwargs:
        return target
    if not callable(target):
        raise error(f"{what} {spec!r} is a {type(target).__name__}, not a factory")
    try:
        built = target(**kwargs)
    except Exception as exc:  # user code: any failure is the factory's, reported in one line
        raise error(
            f"{what} factory {spec} failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    if not isinstance(built, expected):
        wanted = kind or expected.__name__
        raise error(f"{what} factory {spec} returned {type(built).__name__}, not a {wanted}")
    return built
