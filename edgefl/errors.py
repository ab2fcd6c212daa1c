"""User-facing errors: each carries a one-line message that the CLI prints as it is."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (its type name when empty), capped.

    Third-party errors (exporters, runtimes) often carry pages of trace; a user-facing message
    quotes only this.
    """
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class EdgeflError(Exception):
    """Base of every error a user can cause; the CLI prints its message and exits non-zero."""

    exit_code = 2


class BundleError(EdgeflError):
    """A bundle directory is missing, malformed, or does not match its manifest."""


class ModelLoadError(EdgeflError):
    """A model factory, built-in name or weights file cannot be loaded."""


class DataError(EdgeflError):
    """A dataset path or array is unusable (empty, wrong shape, unreadable)."""


class RecipeError(EdgeflError):
    """A compression recipe is unknown or invalid."""


class ExportError(EdgeflError):
    """An artifact cannot be exported or converted."""


class VerificationError(EdgeflError):
    """An exported artifact disagrees with the PyTorch model beyond tolerance."""


class TransportError(EdgeflError):
    """The MQTT broker cannot be reached or a broker URL is invalid."""


class MessageError(EdgeflError):
    """A message on the wire cannot be decoded or fails validation."""


class SignatureError(EdgeflError):
    """A bundle signature is missing, wrong, or the bundle is older than the one running."""


class SimulationError(EdgeflError):
    """A simulation option (partition spec, churn schedule, fleet size) is invalid."""


class KeyFileError(EdgeflError):
    """A signing key file is missing, unreadable, not an Ed25519 key, or would be overwritten."""


class DeliveryError(EdgeflError):
    """A deploy or board install cannot proceed (no targets, bad profile, ssh/scp failed)."""


class RuntimeLoadError(BundleError):
    """A backbone artifact cannot be loaded by its runtime (missing, corrupt, unknown format)."""


class AccuracyDropError(EdgeflError):
    """Compression lost more accuracy than the recipe's max_accuracy_drop, even after back-off."""


class FederationError(EdgeflError):
    """A federation cannot proceed: too few devices online, a stored state that does not fit."""
