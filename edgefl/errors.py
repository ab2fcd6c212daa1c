"""User-facing errors: each carries a one-line message that the CLI prints as it is.

Each class says, in `exit_code`, whose fault it is, so that a script can tell the two apart:
2 when the caller asked for something invalid (a setting, a name, a spec, a file it gave), the
same code click uses for a bad option; 1 when the world failed (a broker unreachable, an export
or verification that failed, a bundle refused, a round that could not run). Anything else that
escapes a command is a bug and is reported with its traceback.
"""

from __future__ import annotations

# Exit codes of the `edgefl` command (see the README).
EXIT_FAILURE = 1
EXIT_USAGE = 2


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (its type name when empty), capped.

    Third-party errors (exporters, runtimes) often carry pages of trace; a user-facing message
    quotes only this.
    """
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class EdgeflError(Exception):
    """Base of every error edgefl reports to a user; the CLI prints its message and exits with
    `exit_code` (operational failure unless a subclass says it is the caller's input)."""

    exit_code = EXIT_FAILURE


class InputError(EdgeflError):
    """The caller asked for something invalid: a setting out of range, options that conflict."""

    exit_code = EXIT_USAGE


class BundleError(InputError):
    """A bundle directory is missing, malformed, or does not match its manifest."""


class ModelLoadError(InputError):
    """A model factory, built-in name or weights file cannot be loaded."""


class DataError(InputError):
    """A dataset path or array is unusable (empty, wrong shape, unreadable)."""


class RecipeError(InputError):
    """A compression recipe is unknown or invalid."""


class ExportError(EdgeflError):
    """An artifact cannot be exported or converted."""


class VerificationError(EdgeflError):
    """An exported artifact disagrees with the PyTorch model beyond tolerance."""


class TransportError(EdgeflError):
    """The MQTT broker cannot be reached, or refused or dropped the connection."""


class BrokerUrlError(TransportError):
    """A broker URL is malformed (scheme, host or port)."""

    exit_code = EXIT_USAGE


class MessageError(EdgeflError):
    """A message on the wire cannot be decoded or fails validation."""


class SignatureError(EdgeflError):
    """A bundle signature is missing, wrong, or the bundle is older than the one running."""


class SimulationError(InputError):
    """A simulation option (partition spec, churn schedule, fleet size) is invalid."""


class KeyFileError(InputError):
    """A signing key file is missing, unreadable, not an Ed25519 key, or would be overwritten."""


class DeliveryError(EdgeflError):
    """A deploy or board install cannot proceed (no targets, bad profile, ssh/scp failed)."""


class ProfileError(DeliveryError):
    """A board profile is unknown, unreadable or invalid."""

    exit_code = EXIT_USAGE


class RuntimeLoadError(BundleError):
    """A backbone artifact cannot be loaded by its runtime (missing, corrupt, unknown format)."""


class AccuracyDropError(EdgeflError):
    """Compression lost more accuracy than the recipe's max_accuracy_drop, even after back-off."""


class ChanceAccuracyError(EdgeflError):
    """A compression stage scored no better than guessing, and the user did not allow it."""


class FederationError(EdgeflError):
    """A federation cannot proceed: too few devices online, a stored state that does not fit."""


class PluginError(InputError):
    """A `package.module:attribute` plug-in cannot be imported, called, or is the wrong kind."""
