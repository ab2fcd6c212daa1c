"""Click options built from the settings dataclasses, and their values built back into them.

A field `batch_size` becomes `--batch-size`, `deadline_s` becomes `--deadline` (its help says
seconds), an optional field has no default, a `tuple[str, ...]` is a comma-separated list and a
field's `metadata["choices"]` its choices. The option's parameter keeps the field's name, so a
command's keyword arguments build the dataclass back (`build_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from edgefl.core.strategies import STRATEGY_NAMES, Strategy, make_strategy
from edgefl.errors import PluginError
from edgefl.plugins import build_plugin, is_plugin_spec, load_attribute
from edgefl.transport.tls import TlsSettings

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

SECONDS_SUFFIX = "_s"


def flag_name(field_name: str) -> str:
    """Return the option of a settings field: `batch_size` -> `--batch-size`, `deadline_s` ->
    `--deadline` (a unit suffix is not part of what a user types)."""
    return "--" + field_name.removesuffix(SECONDS_SUFFIX).replace("_", "-")


class CommaList(click.ParamType):
    """A comma-separated list of strings (`a,b,c`), as a tuple; empty items are dropped."""

    name = "LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        return tuple(item.strip() for item in str(value).split(",") if item.strip())


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), True
    return hint, False


def _click_type(field: dataclasses.Field[Any], hint: Any) -> Any:
    choices = field.metadata.get("choices")
    if choices is not None:
        return click.Choice(list(choices))
    if typing.get_origin(hint) is tuple:
        return CommaList()
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no command-line type for setting {field.name} ({hint})")


def settings_options(
    cls: type[Any], *, defaults: Mapping[str, Any] | None = None, exclude: tuple[str, ...] = ()
) -> Callable[[F], F]:
    """Return a decorator adding one click option per field of the settings dataclass `cls`.

    Args:
        cls: a dataclass of `edgefl.core.settings` (fields with `metadata["help"]`).
        defaults: per-command defaults that replace the dataclass's (e.g. rounds=5).
        exclude: fields the command sets itself (it must then pass them to `build_settings`).

    Returns:
        A decorator for a click command; the command receives each field by its own name.
    """
    overrides = dict(defaults or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        hint, optional = _unwrap_optional(hints[field.name])
        help_text = field.metadata.get("help", "")
        if field.name.endswith(SECONDS_SUFFIX) and "second" not in help_text.lower():
            help_text = f"{help_text.rstrip('.')}; in seconds."
        if field.name in overrides:
            default = overrides[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()  # type: ignore[operator]
        is_flag = hint is bool
        options.append(
            click.option(
                flag_name(field.name),
                field.name,
                type=None if is_flag else _click_type(field, hint),
                is_flag=is_flag,
                default=default,
                show_default=default is not None and not optional,
                help=help_text,
            )
        )

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def build_settings(cls: type[T], values: dict[str, Any], *, check: bool = True, **given: Any) -> T:
    """Build the settings dataclass `cls` from a command's keyword arguments and check it.

    The fields of `cls` are taken out of `values` (so that what remains is the command's own);
    `given` sets fields the command excluded from its options; `check=False` skips `check()`.

    Raises:
        click.BadParameter: the settings' `check()` refused a value; the message names the flag.
        click.UsageError: `check()` refused the settings as a whole.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {name: values.pop(name) for name in names if name in values}
    kwargs.update(given)
    settings = cls(**kwargs)
    if check:
        check_settings(settings, names)
    return settings


def check_settings(settings: Any, names: list[str]) -> None:
    """Run `settings.check()` before anything starts; a refusal is a usage error (exit 2).

    Args:
        settings: an object with a `check()` that raises ValueError naming the setting.
        names: the field names whose flag a message may start with.

    Raises:
        click.UsageError: the settings were refused (click.BadParameter naming the flag where
            the message starts with one of `names`).
    """
    try:
        settings.check()
    except ValueError as exc:
        raise usage_error(str(exc), names) from None


def usage_error(message: str, names: list[str]) -> click.UsageError:
    """Return the usage error for a settings message, naming the flag of the field it starts
    with (`deadline_s must be positive` -> `Invalid value for '--deadline': ...`)."""
    first = message.split(" ", 1)[0]
    if first in names:
        return click.BadParameter(message, param_hint=f"'{flag_name(first)}'")
    return click.UsageError(message)


# --- strategies: --strategy NAME|pkg.mod:factory and --param NAME=VALUE ---


def strategy_options(command: F) -> F:
    """Add `--strategy` (a built-in name or `package.module:factory`) and `--param`."""
    command = click.option(
        "--param", "params", multiple=True,
        help="Strategy parameter NAME=VALUE (VALUE read as JSON where it parses; repeat).",
    )(command)  # fmt: skip
    return click.option(
        "--strategy", default="fedavg", show_default=True,
        help=f"{', '.join(STRATEGY_NAMES)}, or package.module:factory returning a Strategy.",
    )(command)  # fmt: skip


def parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    """Parse repeated NAME=VALUE strategy parameters; VALUE is JSON where it parses as JSON."""
    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} must look like NAME=VALUE", param_hint="'--param'")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def resolve_strategy(strategy: str, params: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """Turn `--strategy` and `--param` into `AggregatorConfig.strategy` and `strategy_params`.

    A built-in name stays a name; `package.module:factory` becomes what the module holds (a
    Strategy instance, a Strategy subclass or a factory), which the library calls with the
    parameters once per task. It is built once here, so a module that does not import, or a
    factory that fails or returns something else, is refused before anything starts.

    Raises:
        click.BadParameter: an unknown name, or parameters the strategy does not take.
        PluginError: see `edgefl.plugins.build_plugin`.
    """
    parsed = parse_params(params)
    if is_plugin_spec(strategy):
        target = load_attribute(strategy, "strategy", PluginError)
        if isinstance(target, Strategy) and parsed:
            raise click.BadParameter(
                f"{strategy} is a Strategy instance, which takes no parameters",
                param_hint="'--param'",
            )
        build_plugin(strategy, Strategy, "strategy", PluginError, **parsed)  # type: ignore[type-abstract]
        return target, parsed
    if strategy not in STRATEGY_NAMES:
        raise click.BadParameter(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_NAMES)} "
            "or give package.module:factory",
            param_hint="'--strategy'",
        )
    try:
        make_strategy(strategy, **parsed)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--param'") from None
    return strategy, parsed


# --- TLS: --cafile, --cert, --key, as mosquitto_pub names them ---


def tls_options(key_flag: str = "--key") -> Callable[[F], F]:
    """Return a decorator adding `--cafile`, `--cert` and `--key` (an `mqtts://` broker's CA and
    this client's certificate); `tls_settings` builds them back into a `TlsSettings`.

    Args:
        key_flag: the certificate key's flag where `--key` already means something else
            (`deploy --key` is the signing key, so there it is `--tls-key`).
    """
    path = click.Path(exists=True, dir_okay=False)

    def decorate(command: F) -> F:
        command = click.option(
            key_flag, "keyfile", type=path, help="Private key of --cert (PEM).",
        )(command)  # fmt: skip
        command = click.option(
            "--cert", "certfile", type=path,
            help="Client certificate (PEM) for brokers that require one (edgefl certs issue).",
        )(command)  # fmt: skip
        return click.option(
            "--cafile", type=path, help="CA certificate of an mqtts:// broker [the system CAs].",
        )(command)  # fmt: skip

    return decorate


def tls_settings(values: dict[str, Any]) -> TlsSettings:
    """Take `--cafile`, `--cert` and `--key` out of a command's keyword arguments.

    Raises:
        click.UsageError: a certificate without its key or the reverse.
    """
    settings = TlsSettings(values.pop("cafile"), values.pop("certfile"), values.pop("keyfile"))
    if bool(settings.certfile) != bool(settings.keyfile):
        raise click.UsageError("--cert and its key must be given together")
    return settings
