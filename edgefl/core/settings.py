"""The settings of a federation, each defined once: what a round asks of boards, and the rules the
aggregator runs rounds by.

Every field carries its help text (and, where it has one, its list of choices) in its metadata;
`edgefl.cli` builds the options of `aggregate` and `simulate` from these classes, so a setting
added here reaches Python, the wire and the command line at once. `RoundSettings` is what a task
carries to the boards, with a schema version of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from edgefl.core.codecs import CODEC_NAMES
from edgefl.core.staleness import parse_staleness

T = TypeVar("T")

# The version of `RoundSettings.to_wire()`; a reader refuses only a newer major version.
SETTINGS_SCHEMA_VERSION = 1


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a settings field with its help text (and choices) for the command line."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _number(name: str, value: Any, integral: bool) -> int | float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (integral and not float(value).is_integer())
    ):
        expected = "an integer" if integral else "a number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value) if integral else float(value)


@functools.cache
def _field_kinds(cls: type) -> dict[str, str]:
    # Field name -> its annotation as text; read once per class, since every task a board
    # receives is read through here.
    return {f.name: str(f.type) for f in fields(cls)}


def from_mapping(
    cls: type[T], data: Mapping[str, Any], *, strict: bool = True, what: str = ""
) -> T:
    """Build the settings dataclass `cls` from JSON-like data, checking types and ranges.

    Args:
        cls: a dataclass of this module (or `TrainConfig`-like: int, float, str, optional fields).
        data: any subset of the fields; numbers may be given as int or float.
        strict: refuse unknown fields (a user's file or code); False ignores them (a message
            from a newer peer, see docs/protocol.md).
        what: names the settings in messages ("training": "unknown training settings ...").

    Returns:
        The settings, with defaults for fields not given, checked with their `check()`.

    Raises:
        ValueError: an unknown field (strict), a value of the wrong type, or out of range.
    """
    known = _field_kinds(cls)  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known) - {"schema_version"})
    if unknown and strict:
        label = f"{what} settings" if what else "settings"
        raise ValueError(f"unknown {label} {unknown}; valid: {', '.join(known)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            continue
        kind = known[name]
        optional = "None" in kind
        if value is None and optional:
            values[name] = None
        elif kind.startswith(("int", "float")):
            values[name] = _number(name, value, kind.startswith("int"))
        elif kind.startswith("str"):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            values[name] = value
        else:
            values[name] = value
    result = cls(**values)
    check = getattr(result, "check", None)
    if check is not None:
        check()
    return result


@dataclass(frozen=True)
class TrainConfig:
    """What a round asks each board to do with its head; FedProx is on when proximal_mu > 0."""

    epochs: int = setting(1, "Local epochs per round.")
    lr: float = setting(0.1, "Local SGD learning rate.")
    batch_size: int = setting(16, "Local minibatch size.")
    proximal_mu: float = setting(0.0, "FedProx proximal coefficient (0: plain SGD).")
    seed: int = setting(0, "Seeds device selection and the boards' minibatch order.")
    weight_decay: float = setting(0.0, "L2 weight decay in local training.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from JSON settings, checked (see `from_mapping`, strict).

        Raises:
            ValueError: an unknown field, a value of the wrong type, or a value out of range.
        """
        return from_mapping(cls, data, what="training")

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class PrivacySettings:
    """DP-FedAvg on the boards: clip each delta, then add Gaussian noise scaled to the clip."""

    clip_norm: float | None = setting(None, "Boards clip their update to this L2 norm.")
    noise_multiplier: float = setting(
        0.0, "Boards add Gaussian noise of std MULTIPLIER x clip norm (needs a clip norm)."
    )

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if not self.noise_multiplier >= 0:
            raise ValueError("noise_multiplier must not be negative")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise_multiplier needs clip_norm: the noise is scaled to the clip")


@dataclass(frozen=True)
class CodecSettings:
    """How boards encode their update on the wire."""

    codec: str = setting("float32", "Update codec boards use.", choices=CODEC_NAMES)
    topk_fraction: float = setting(0.01, "Share of values a top-k update keeps.")

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.codec not in CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}, not {self.codec!r}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError("topk_fraction must be in (0, 1]")


@dataclass(frozen=True)
class RoundSettings:
    """Everything a round's task asks of a board, as it travels in the task (`to_wire`)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    codec: CodecSettings = field(default_factory=CodecSettings)

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON object a task carries: one object per part, and the schema version."""
        return {
            "schema_version": SETTINGS_SCHEMA_VERSION,
            "train": dataclasses.asdict(self.train),
            "privacy": dataclasses.asdict(self.privacy),
            "codec": dataclasses.asdict(self.codec),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RoundSettings:
        """Read a task's settings; unknown fields are ignored, a newer schema is refused.

        Raises:
            ValueError: a newer schema version, a part that is not an object, or a value of the
                wrong type or out of range.
        """
        version = data.get("schema_version", SETTINGS_SCHEMA_VERSION)
        if not isinstance(version, int) or version > SETTINGS_SCHEMA_VERSION:
            raise ValueError(
                f"task settings have schema_version {version!r}; this edgefl reads "
                f"{SETTINGS_SCHEMA_VERSION}"
            )
        parts: dict[str, Any] = {}
        for name, kind in (
            ("train", TrainConfig), ("privacy", PrivacySettings), ("codec", CodecSettings)
        ):  # fmt: skip
            value = data.get(name, {})
            if not isinstance(value, Mapping):
                raise ValueError(f"task settings {name!r} must be an object")
            parts[name] = from_mapping(kind, value, strict=False, what=name)
        return cls(**parts)


@dataclass(frozen=True)
class RoundPolicy:
    """How the aggregator runs rounds: how many, whom it selects, how long it waits."""

    rounds: int = setting(10, "The last round number to run (a resumed run continues up to it).")
    fraction: float = setting(1.0, "Share of online devices selected per round.")
    min_devices: int = setting(1, "Devices that must be online before a round starts.")
    deadline_s: float = setting(60.0, "Seconds a round waits for updates.")
    quorum: float = setting(0.5, "Share of selected devices whose accepted updates a round needs.")
    wait_devices_s: float = setting(60.0, "Seconds to wait for min-devices to come online.")
    settle_s: float = setting(
        2.0,
        "The first round starts once min-devices are online and no new device came online for "
        "this many seconds (at most wait-devices after the start).",
    )
    stale_after_s: float | None = setting(
        None, "A device not heard for this long is stale and not selected (default: 3 heartbeats)."
    )
    # Accounting belongs to the aggregator (it decides whether a round starts), not to the
    # task's privacy settings: boards never see these.
    target_epsilon: float | None = setting(
        None,
        "Stop the run before a round that would bring the privacy spent (epsilon, at "
        "target-delta) beyond this (needs clip-norm and noise-multiplier).",
    )
    target_delta: float = setting(
        1e-5,
        "The delta of the (epsilon, delta) reported after each noised round; keep it well "
        "below 1 / the number of boards.",
    )

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if self.min_devices < 1:
            raise ValueError("min_devices must be at least 1")
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be positive")
        if not 0.0 <= self.quorum <= 1.0:
            raise ValueError("quorum must be in [0, 1]")
        if not self.wait_devices_s >= 0:
            raise ValueError("wait_devices_s must not be negative")
        if not self.settle_s >= 0:
            raise ValueError("settle_s must not be negative")
        if self.stale_after_s is not None and not self.stale_after_s > 0:
            raise ValueError("stale_after_s must be positive")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError("target_epsilon must be positive")
        if not 0.0 < self.target_delta < 1.0:
            raise ValueError("target_delta must be in (0, 1)")


@dataclass(frozen=True)
class AcceptancePolicy:
    """What the aggregator accepts from devices, beyond the round's identity checks."""

    max_update_bytes: int = setting(16 * 1024 * 1024, "Larger updates are rejected unread.")
    max_norm: float | None = setting(None, "Reject updates whose delta L2 norm exceeds this.")
    allow: tuple[str, ...] | None = setting(None, "The device IDs allowed (default: any).")
    # 2, not 10: one forged update clipped to 10x the median norm still cost FL-digits 6 points
    # (tests/test_fleet_integrity.py); at 2x it costs under 1, and honest outliers still count.
    influence_factor: float = setting(
        2.0,
        "An update's weight and norm are capped at this many times the round's median "
        "(with 3 or more updates; 0: no relative cap).",
    )
    max_samples: int | None = setting(
        None, "Cap on the sample count any update is weighted by (default: none)."
    )

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.max_update_bytes < 1:
            raise ValueError("max_update_bytes must be positive")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError("max_norm must be positive")
        if self.influence_factor != 0 and not self.influence_factor >= 1.0:
            raise ValueError("influence_factor must be at least 1 (0: no relative cap)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError("max_samples must be at least 1")


@dataclass(frozen=True)
class AsyncPolicy:
    """Buffered asynchronous aggregation (FedBuff; `edgefl.core.async_rounds`): boards train
    whenever idle on the newest head, and every `buffer` accepted updates make a new head."""

    mode: str = setting(
        "sync",
        "sync: rounds wait for the selected devices; async: a new head every --buffer updates.",
        choices=("sync", "async"),
    )
    buffer: int = setting(10, "async: accepted updates aggregated into each new head (K).")
    max_staleness: int = setting(
        10, "async: refuse updates trained on a head more than this many versions old."
    )
    staleness: str = setting(
        "poly:0.5", "async: weight of an update S versions old: poly:A (1+S)^-A, const, hinge:A,B."
    )
    time_limit_s: float | None = setting(
        None, "async: stop after this many seconds, closing the buffer being filled."
    )

    @property
    def is_async(self) -> bool:
        """Whether the aggregator runs in async mode."""
        return self.mode == "async"

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, not {self.mode!r}")
        if self.buffer < 1:
            raise ValueError("buffer must be at least 1")
        if self.max_staleness < 0:
            raise ValueError("max_staleness must not be negative")
        parse_staleness(self.staleness)
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError("time_limit_s must be positive")
