"""Wire messages: schema-versioned dataclasses, strict JSON decoding, safetensors for tensors.

Control messages (device status, round result) are UTF-8 JSON objects. Messages that carry
tensors (round task, update) are one safetensors file whose `__metadata__["edgefl"]` holds the
message's JSON fields; see docs/protocol.md for the byte layout. Decoding never trusts the
sender: missing required fields, wrong types and a newer schema raise `MessageError`. Readers are
tolerant of what is only new: fields they do not know are ignored, so boards and servers of two
versions can share a fleet while it is upgraded one machine at a time. No pickle anywhere.
"""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Self, TypeVar, Union

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from edgefl.errors import MessageError
from edgefl.head import Weights

# 2: protocol v2 (run and bundle identity, relative deadlines, per-device outcomes).
SCHEMA_VERSION = 2
META_KEY = "edgefl"
# A safetensors header is JSON of ~100 bytes per tensor; anything near this is hostile.
MAX_HEADER_BYTES = 1 << 20

# Codes an update can carry (agent-side failures) or be rejected with (aggregator-side checks).
AGENT_ERROR_CODES: tuple[str, ...] = (
    "no-bundle",  # the device has no bundle installed yet
    "no-head",  # the task names a head the device's bundle or the task message lacks
    "model-version",  # the task is for a bundle version the device does not run
    "no-data",  # the device has no labelled samples
    "train-failed",  # training raised (message in `reason`)
    "head-digest",  # the task's heads do not hash to the task's head_digest
    "bundle-digest",  # the task is for a bundle (by digest) the device does not run
)

T = TypeVar("T")


def _check_value(value: Any, expected: Any, where: str) -> Any:
    """Return `value` if it has type `expected` (a type hint), else raise MessageError."""
    origin, args = _hint_parts(expected)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _check_value(value, option, where)
            except MessageError:
                continue
        raise MessageError(f"{where} has the wrong type ({type(value).__name__})")
    if expected is type(None):
        if value is None:
            return None
        raise MessageError(f"{where} must be null")
    if expected is Any:
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise MessageError(f"{where} must be a boolean")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise MessageError(f"{where} must be an integer")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise MessageError(f"{where} must be a finite number")
    if expected is str:
        if isinstance(value, str):
            return value
        raise MessageError(f"{where} must be a string")
    if origin is list:
        if not isinstance(value, list):
            raise MessageError(f"{where} must be a list")
        (item,) = args
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be an object")
        key_type, item = args
        return {
            _check_value(k, key_type, f"{where} key"): _check_value(v, item, f"{where}.{k}")
            for k, v in value.items()
        }
    raise TypeError(f"unsupported field type {expected!r}")  # a bug in this module, not input


@functools.cache
def _hint_parts(expected: Any) -> tuple[Any, tuple[Any, ...]]:
    # typing.get_origin/get_args cost microseconds per call, and an update header checks ~20
    # values; the hints are a handful of fixed objects, so their parts are computed once.
    return typing.get_origin(expected), typing.get_args(expected)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations costs ~1 ms; an aggregator ingests thousands of updates/s.
    return {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls)}


def from_fields(cls: type[T], data: Any) -> T:
    """Build the dataclass `cls` from parsed JSON, checking every field strictly.

    Fields the dataclass does not know are ignored (a newer peer's additions); the schema
    version must be an integer from 1 to `SCHEMA_VERSION`.

    Raises:
        MessageError: not an object, a newer or missing schema version, a missing required
            field, or a field of the wrong type.
    """
    name = getattr(cls, "KIND", cls.__name__)
    if not isinstance(data, dict):
        raise MessageError(f"{name} message is not a JSON object")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MessageError(f"{name} message has no valid schema_version ({version!r})")
    if version > SCHEMA_VERSION:
        raise MessageError(
            f"{name} message has schema_version {version}; this edgefl reads up to "
            f"{SCHEMA_VERSION} (upgrade it)"
        )
    hints = _type_hints(cls)  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "schema_version":
            continue  # checked above; the decoded message is in this edgefl's schema
        if f.name in data:
            values[f.name] = _check_value(data[f.name], hints[f.name], f"{name}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise MessageError(f"{name} message lacks the field {f.name!r}")
    message = cls(**values)
    check = getattr(message, "check", None)
    if check is not None:
        check()
    return message


def _json_object(payload: bytes | str, name: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"{name} message is not JSON: {exc}") from None


def _dumps(message: Any) -> str:
    return json.dumps(asdict(message), separators=(",", ":"), allow_nan=False)


class _JsonMessage:
    """encode/decode for a control message dataclass sent as UTF-8 JSON."""

    KIND: typing.ClassVar[str]

    def encode(self) -> bytes:
        """Return the message as UTF-8 JSON."""
        return _dumps(self).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse and validate a message of this kind.

        Raises:
            MessageError: not JSON, or not a valid message of this kind (see `from_fields`).
        """
        return from_fields(cls, _json_object(payload, cls.KIND))


@dataclass
class DeviceStatus(_JsonMessage):
    """A device's retained status: who it is, what it can run, whether it is online."""

    KIND: typing.ClassVar[str] = "status"

    device_id: str
    state: str  # "online" | "offline"
    task: str = "default"
    arch: str = ""
    runtimes: list[str] = field(default_factory=list)
    memory_mb: int = 0
    samples: int = 0
    model_version: int = 0
    heartbeat_s: float = 0.0  # re-published this often; 0: no heartbeat (never judged stale)
    time: float = 0.0  # Unix time of publication (the device's clock)
    # For the operator, not the protocol: `deploy --group` targets groups, and `edgefl fleet`
    # shows which board profile each device runs and the last round it trained in.
    group: str = ""
    profile: str = ""
    last_round: int = 0
    # The digest of the bundle the device runs (`edgefl.bundle.manifest_digest`; "" for none):
    # devices are selected only for the bundle whose digest the aggregator federates.
    bundle_digest: str = ""
    # What runs the backbone, for the operator: the artifact file of the bundle, the runtime
    # ("onnxruntime", "litert") and its execution provider ("CUDAExecutionProvider"; "" for
    # LiteRT); all "" before a backbone is loaded.
    artifact: str = ""
    runtime: str = ""
    provider: str = ""
    # The board's X25519 public key (hex) for the key it shares with the aggregator to MAC its
    # updates (`edgefl.security.update_mac`); "" when it seals nothing.
    mac_key: str = ""
    # When the board opened the connection this status went out on (Unix time, its clock); its
    # last will carries its own connection's. A will delivered late, after the board came back
    # on a newer connection (a bridge or a restarted broker re-sends it), is then told apart
    # (`edgefl.transport.presence.supersedes`). 0: not given (a board older than this field).
    connected_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise MessageError when a field holds an impossible value."""
        if self.state not in ("online", "offline"):
            raise MessageError(f"status.state must be 'online' or 'offline', not {self.state!r}")
        if self.samples < 0 or self.memory_mb < 0:
            raise MessageError("status counts must not be negative")
        if self.heartbeat_s < 0:
            raise MessageError("status.heartbeat_s must not be negative")


@dataclass
class RoundResult(_JsonMessage):
    """What a round produced: the new head version, counts, metrics; retained per round."""

    KIND: typing.ClassVar[str] = "result"

    round: int
    status: str  # "closed" (aggregated) | "failed" (no quorum; the head is unchanged)
    head_version: int
    selected: int
    accepted: int
    rejected: dict[str, int] = field(default_factory=dict)  # code -> count
    late: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    online: int = 0  # eligible devices online (fresh status) when the round selected
    stale: int = 0  # devices whose status said online but was not refreshed in time
    run_id: str = ""  # the aggregation run the round belongs to
    # Each selected device's answer: "accepted", or the code it was rejected with; `reasons`
    # says why for those not accepted, so a device learns what became of its update.
    answers: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise MessageError when a field holds an impossible value."""
        if self.status not in ("closed", "failed"):
            raise MessageError(f"result.status must be 'closed' or 'failed', not {self.status!r}")


@dataclass
class RoundTask:
    """A round's instructions: who trains, from which head, how, until when.

    `config` is `edgefl.core.settings.RoundSettings.to_wire()`: the training, privacy and codec
    settings, as the strategy's `configure_round` set them for this round.
    """

    KIND: typing.ClassVar[str] = "task"

    round: int
    selected: list[str]
    tasks: list[str]
    head_version: int
    model_version: int
    # Seconds after publication the round waits for updates (0: not given); relative, so the
    # aggregator's and the boards' clocks need not agree.
    deadline_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    # What the task asks, by digest: the run, the heads it carries (`edgefl.head.head_digest`)
    # and the bundle they belong to (`edgefl.bundle.manifest_digest`). An update echoes them.
    run_id: str = ""
    head_digest: str = ""
    bundle_digest: str = ""
    # The aggregator's X25519 public key (hex): boards that announced theirs MAC their updates
    # under the key the two agree (`edgefl.security.update_mac`); "": they seal them.
    mac_key: str = ""
    # The newest update frame the aggregator reads besides safetensors (0: none; 1: the compact
    # frame of `edgefl.transport.update_frame`). A board sends the newest both know.
    update_frame: int = 0
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise MessageError when a field holds an impossible value."""
        if self.round < 1:
            raise MessageError("task.round must be at least 1")


@dataclass
class UpdateHeader:
    """The JSON part of an update: which round, device and head it answers, and how it went.

    `status` is "ok" (the safetensors body holds the delta) or "error" (no tensors; `error_code`
    and `reason` say what failed on the device).
    """

    KIND: typing.ClassVar[str] = "update"

    round: int
    device_id: str
    task: str
    samples: int
    head_version: int
    model_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    error_code: str = ""
    reason: str = ""
    # Echoed from the task this update answers (see `RoundTask`).
    run_id: str = ""
    head_digest: str = ""
    bundle_digest: str = ""
    # The privacy the board applied to this delta (the stricter of the round's and its own):
    # the L2 clip norm (None: unclipped) and the noise std in units of it. The aggregator
    # refuses an update claiming less than the round asked ("privacy").
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def check(self) -> None:
        """Raise MessageError when a field holds an impossible value."""
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise MessageError("update.clip_norm must be positive")
        if self.noise_multiplier < 0:
            raise MessageError("update.noise_multiplier must not be negative")
        if self.status not in ("ok", "error"):
            raise MessageError(f"update.status must be 'ok' or 'error', not {self.status!r}")
        if self.samples < 0:
            raise MessageError("update.samples must not be negative")


def read_safetensors_metadata(data: bytes) -> dict[str, str]:
    """Return the `__metadata__` of safetensors bytes without decoding any tensor.

    Raises:
        MessageError: the bytes do not start with a valid safetensors header.
    """
    if len(data) < 8:
        raise MessageError("message is not safetensors: shorter than its 8-byte header length")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8 or length > MAX_HEADER_BYTES:
        raise MessageError("message is not safetensors: bad header length")
    header = _json_object(data[8 : 8 + length], "safetensors header")
    if not isinstance(header, dict):
        raise MessageError("message is not safetensors: header is not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MessageError("safetensors metadata must map strings to strings")
    return metadata


def encode_round_task(task: RoundTask, heads: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """Encode a task with the global head of each of its tasks as tensors `"{task}/{param}"`."""
    arrays = {
        f"{name}/{key}": np.ascontiguousarray(value, dtype=np.float32)
        for name, weights in heads.items()
        for key, value in weights.items()
    }
    return bytes(save_safetensors_bytes(arrays, metadata={META_KEY: _dumps(task)}))


def decode_round_task(data: bytes) -> tuple[RoundTask, dict[str, Weights]]:
    """Decode a task message into the task and its heads by task name.

    Raises:
        MessageError: not a valid task message.
    """
    metadata = read_safetensors_metadata(data)
    if META_KEY not in metadata:
        raise MessageError("task message has no 'edgefl' metadata")
    task = from_fields(RoundTask, _json_object(metadata[META_KEY], RoundTask.KIND))
    try:
        arrays = load_safetensors_bytes(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise MessageError(f"task tensors are not valid safetensors: {exc}") from None
    heads: dict[str, Weights] = {}
    for name, value in arrays.items():
        head, _, key = name.partition("/")
        if not key:
            raise MessageError(f"task tensor {name!r} is not named 'task/parameter'")
        if value.dtype != np.float32:
            raise MessageError(f"task tensor {name!r} is {value.dtype}, not float32")
        heads.setdefault(head, {})[key] = value
    return task, heads


def encode_update_error(header: UpdateHeader) -> bytes:
    """Encode an error update: safetensors with no tensors, the header in the metadata."""
    return bytes(save_safetensors_bytes({}, metadata={META_KEY: _dumps(header)}))


def update_metadata(header: UpdateHeader) -> dict[str, str]:
    """Return the safetensors metadata that carries `header` (pass it to `encode_delta`)."""
    return {META_KEY: _dumps(header)}


def read_update_header(data: bytes) -> UpdateHeader:
    """Read an update's header from its safetensors metadata without decoding the delta.

    Raises:
        MessageError: not safetensors, or the header is missing or invalid.
    """
    metadata = read_safetensors_metadata(data)
    if META_KEY not in metadata:
        raise MessageError("update has no 'edgefl' metadata")
    return from_fields(UpdateHeader, _json_object(metadata[META_KEY], UpdateHeader.KIND))
