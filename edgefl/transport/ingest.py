"""The ingest protocol: what an aggregator's coordinator and its ingest workers say on the broker.

`edgefl aggregate --workers N` splits the aggregator: N ingest workers share the update topic
through an MQTT shared subscription (each update reaches one worker), judge their share with the
aggregator's own checks and fold it; the coordinator keeps the rounds. They talk only through
these topics under the fleet (docs/protocol.md, "Ingest workers"), every payload sealed with the
fleet's signing key when signing is on (a worker is part of the aggregator and holds its key):

| topic | from | retained | payload |
| --- | --- | --- | --- |
| `ingest/round` | coordinator | yes | `IngestRound` JSON: the open round a worker judges |
| `ingest/collect` | coordinator | no | `Collect` JSON: close the round, or fold it |
| `ingest/workers/{id}/status` | worker (and its will) | yes | `WorkerStatus` JSON |
| `ingest/workers/{id}/notes` | worker | no | `VerdictNotes` JSON: its verdicts, batched |
| `ingest/workers/{id}/partial` | worker | no | partial (safetensors, `encode_partial`) |

Every message names the run, the round and the head digest it is about, so a restarted worker
or a message of an earlier run or round is told apart from the current one.
"""

from __future__ import annotations

import base64
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from edgefl.errors import MessageError
from edgefl.head import Weights
from edgefl.transport import topics
from edgefl.transport.messages import from_fields, read_safetensors_metadata

# The ingest messages' own schema version; a reader refuses a newer one.
INGEST_SCHEMA_VERSION = 1
PARTIAL_METADATA_KEY = "edgefl-ingest"
# Tensor bytes per message of a gathering reply: far below the 16 MiB an aggregator's client
# takes by default and the packet limits brokers are usually given.
PART_BYTES = 4 * 1024 * 1024


def ingest_round(fleet: str) -> str:
    """The retained topic of the round workers judge."""
    return f"{topics.fleet_root(fleet)}/ingest/round"


def ingest_collect(fleet: str) -> str:
    """The topic the coordinator asks workers to close or fold a round on."""
    return f"{topics.fleet_root(fleet)}/ingest/collect"


def worker_topic(fleet: str, worker: str, kind: str) -> str:
    """A worker's own topic: `kind` is "status", "notes", "partial" or "probe" (its check, at
    start, that the broker delivers shared subscriptions)."""
    return f"{topics.fleet_root(fleet)}/ingest/workers/{topics.check_name(worker, 'worker')}/{kind}"


def all_worker_topics(fleet: str) -> str:
    """The filter of every worker's status, notes and partials."""
    return f"{topics.fleet_root(fleet)}/ingest/workers/+/+"


def parse_worker_topic(fleet: str, topic: str) -> tuple[str, str] | None:
    """Return (worker, kind) of a worker's topic, None for any other topic."""
    prefix = f"{topics.fleet_root(fleet)}/ingest/workers/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 2 or not parts[0] or parts[1] not in ("status", "notes", "partial", "probe"):
        return None
    return parts[0], parts[1]


def shared_updates(fleet: str) -> str:
    """The shared subscription the workers split updates through (one group per fleet)."""
    return f"{topics.SHARED_PREFIX}edgefl-ingest-{fleet}/{topics.all_updates(fleet)}"


def _decode(cls: type[Any], payload: bytes) -> Any:
    """Parse an ingest JSON message, refusing a newer schema than this edgefl's."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"{cls.__name__} message is not JSON: {exc}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > INGEST_SCHEMA_VERSION:
        raise MessageError(f"{cls.__name__} has schema_version {version}; this edgefl reads "
                           f"up to {INGEST_SCHEMA_VERSION}")  # fmt: skip
    return from_fields(cls, data)


class _Json:
    """encode/decode of an ingest JSON message."""

    def encode(self) -> bytes:
        """Return the message as compact UTF-8 JSON."""
        # Fields taken as they are, not through `asdict`, which deep-copies every note of a batch.
        message = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def decode(cls, payload: bytes) -> typing.Self:
        """Parse and check a message of this kind (MessageError: not one)."""
        message: typing.Self = _decode(cls, payload)
        return message


@dataclass
class IngestRound(_Json):
    """The open round, as workers need it to judge updates exactly as the coordinator would.

    `task` is the round's task as published (base64 of its unsealed bytes: heads, digests,
    config); `selected` maps each selected device to its task; `devices` gives every device
    the coordinator knows by key: [raw public key hex, registry state, the `mac_key` its verified
    status announced].
    """

    run_id: str
    round: int
    head_digest: str
    task: str
    selected: dict[str, str]
    devices: dict[str, list[str]] = field(default_factory=dict)
    max_norm: float | None = None
    allow: list[str] | None = None
    max_update_bytes: int = 16 * 1024 * 1024
    schema_version: int = INGEST_SCHEMA_VERSION

    def task_bytes(self) -> bytes:
        """Return the task's bytes (MessageError: not base64)."""
        try:
            return base64.b64decode(self.task, validate=True)
        except ValueError as exc:
            raise MessageError(f"ingest round task is not base64: {exc}") from None


@dataclass
class WorkerStatus(_Json):
    """A worker's retained status: online (holding a round) or offline (its last will)."""

    worker: str
    state: str  # "online" | "offline"
    run_id: str = ""
    round: int = 0
    head_digest: str = ""  # the round it holds; all three "" / 0: none
    time: float = 0.0
    schema_version: int = INGEST_SCHEMA_VERSION


@dataclass
class Collect(_Json):
    """Ask the workers about a round: `close` it (later updates are late) and say what they hold,
    or `fold` it: per worker, the devices to take with their [weight, norm bound or null]."""

    run_id: str
    round: int
    head_digest: str
    collect_id: str  # names this request; replies echo it
    phase: str  # "close" | "fold"
    # worker -> device -> [weight, norm bound or null]; checked by `take_of`, not on decoding
    # (a fold names every accepted update of the round: thousands of values).
    take: dict[str, Any] = field(default_factory=dict)
    gather: bool = False  # fold: send the deltas (robust strategies), not weighted sums
    schema_version: int = INGEST_SCHEMA_VERSION

    def take_of(self, worker: str) -> dict[str, tuple[int, float | None]]:
        """Return what `worker` is asked to fold: device -> (weight, norm bound or None).

        Raises:
            MessageError: an entry that is not [weight >= 0, number or null].
        """
        wanted = self.take.get(worker, {})
        if not isinstance(wanted, dict):
            raise MessageError(f"collect take for {worker} is not an object")
        plans: dict[str, tuple[int, float | None]] = {}
        for device, entry in wanted.items():
            ok = isinstance(entry, list) and len(entry) == 2 and _number(entry[0])
            if not ok or entry[0] < 0 or not (entry[1] is None or _number(entry[1])):
                raise MessageError(f"collect take for {device} is not [weight, bound or null]")
            plans[device] = (int(entry[0]), None if entry[1] is None else float(entry[1]))
        return plans


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# One verdict as a worker notes it: the fields of `edgefl.core.round_state.Verdict` the record
# keeps, plus the delta's L2 norm (an accepted update's; the coordinator bounds influence by it).
NOTE_FIELDS: tuple[tuple[str, type], ...] = (
    ("outcome", str), ("round", int), ("device", str), ("code", str), ("reason", str),
    ("task", str), ("samples", int), ("sha256", str), ("size", int), ("metrics", dict),
    ("norm", float),
)  # fmt: skip


@dataclass
class VerdictNotes(_Json):
    """A batch of a worker's verdicts, in the order it reached them; `notes` are lists in
    `NOTE_FIELDS` order (compact: a busy worker sends thousands a second)."""

    worker: str
    run_id: str
    notes: list[Any]  # checked by `rows`
    session: str = ""  # the worker process (a restart starts a new one)
    seq: int = 0  # 1, 2, ... per session: the close reply says up to which batch it covers
    schema_version: int = INGEST_SCHEMA_VERSION

    def rows(self) -> list[dict[str, Any]]:
        """Return the notes as checked dicts (MessageError: a note of the wrong shape)."""
        rows = []
        names = [name for name, _ in NOTE_FIELDS]
        kinds = [kind for _, kind in NOTE_FIELDS]
        for index, note in enumerate(self.notes):
            if type(note) is not list or len(note) != len(NOTE_FIELDS):
                raise MessageError(f"note {index} is not a list of {len(NOTE_FIELDS)} fields")
            # Exact types (`type(v) is int` refuses a bool) and a float field may be an int:
            # a coordinator reads thousands of notes a second.
            for name, kind, value in zip(names, kinds, note, strict=True):
                if type(value) is not kind and not (kind is float and type(value) is int):
                    raise MessageError(f"note {index}: {name} has the wrong type")
            rows.append(dict(zip(names, note, strict=True)))
        return rows


@dataclass
class PartialHeader:
    """What a worker's reply to a `Collect` says beside its tensors.

    `devices`: the devices it covers (close: every update it accepted, with `sha256`; fold: the
    ones it took). `missing`: devices the request listed that it does not hold (a worker that
    restarted). `weights`: task -> total weight of its sum (fold, weighted sums).
    """

    worker: str
    run_id: str
    round: int
    head_digest: str
    collect_id: str
    phase: str
    devices: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    session: str = ""
    notes_seq: int = 0  # the last notes batch sent before this reply
    part: int = 0  # a gathering reply too large for one message comes in `parts` parts
    parts: int = 1
    schema_version: int = INGEST_SCHEMA_VERSION


def encode_partial(header: PartialHeader, tensors: dict[str, np.ndarray]) -> bytes:
    """Return a reply as safetensors: `tensors` (weighted sums `sum/{task}/{param}` in float64,
    or gathered deltas `delta/{index in devices}/{param}`) and the header as metadata."""
    metadata = {PARTIAL_METADATA_KEY: json.dumps(asdict(header), separators=(",", ":"))}
    return bytes(save_safetensors_bytes(tensors, metadata=metadata))


def decode_partial(data: bytes) -> tuple[PartialHeader, dict[str, np.ndarray]]:
    """Parse a reply (MessageError: not one)."""
    metadata = read_safetensors_metadata(data)
    if PARTIAL_METADATA_KEY not in metadata:
        raise MessageError("partial has no ingest header")
    header: PartialHeader = _decode(PartialHeader, metadata[PARTIAL_METADATA_KEY].encode())
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for bad bytes
        raise MessageError(f"partial tensors unreadable: {exc}") from None
    return header, tensors


def sums_by_task(tensors: dict[str, np.ndarray]) -> dict[str, Weights]:
    """Return the weighted sums of a fold reply, task -> parameter -> float64 sum."""
    sums: dict[str, Weights] = {}
    for name, values in tensors.items():
        kind, _, rest = name.partition("/")
        task, _, parameter = rest.partition("/")
        if kind == "sum" and task and parameter:
            sums.setdefault(task, {})[parameter] = values
    return sums


def gathered_deltas(header: PartialHeader, tensors: dict[str, np.ndarray]) -> dict[str, Weights]:
    """Return the deltas of a gathering fold reply, device -> parameter -> values."""
    deltas: dict[str, Weights] = {}
    for name, values in tensors.items():
        kind, _, rest = name.partition("/")
        index, _, parameter = rest.partition("/")
        if kind == "delta" and index.isdigit() and int(index) < len(header.devices):
            deltas.setdefault(header.devices[int(index)], {})[parameter] = values
    return deltas


def split_partial(
    header: PartialHeader, tensors: dict[str, np.ndarray], max_bytes: int = PART_BYTES
) -> list[tuple[PartialHeader, dict[str, np.ndarray]]]:
    """Split a gathering reply into parts of about `max_bytes` of tensors each (a device's
    delta is never split); any other reply, or a small one, is one part."""
    by_index: dict[int, dict[str, np.ndarray]] = {}
    for name, values in tensors.items():
        kind, _, rest = name.partition("/")
        index, _, parameter = rest.partition("/")
        if kind != "delta" or not index.isdigit():
            return [(header, tensors)]
        by_index.setdefault(int(index), {})[parameter] = values
    groups: list[list[int]] = [[]]
    size = 0
    for position in range(len(header.devices)):
        nbytes = sum(v.nbytes for v in by_index.get(position, {}).values())
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(position)
        size += nbytes
    if len(groups) == 1:
        return [(header, tensors)]
    parts = []
    for number, group in enumerate(groups):
        part_header = replace(
            header, devices=[header.devices[old] for old in group], part=number, parts=len(groups),
            missing=header.missing if number == 0 else [],
        )  # fmt: skip
        part_tensors = {
            f"delta/{new}/{parameter}": values
            for new, old in enumerate(group)
            for parameter, values in by_index.get(old, {}).items()
        }
        parts.append((part_header, part_tensors))
    return parts


def merge_parts(
    parts: list[tuple[PartialHeader, dict[str, np.ndarray]]],
) -> tuple[PartialHeader, dict[str, np.ndarray]]:
    """Join the parts of one reply, in part order, into the reply `split_partial` split."""
    if len(parts) == 1:
        return parts[0]
    devices: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    for header, part in parts:
        for name, values in part.items():
            kind, _, rest = name.partition("/")
            index, _, parameter = rest.partition("/")
            if kind == "delta" and index.isdigit():
                tensors[f"delta/{len(devices) + int(index)}/{parameter}"] = values
        devices += header.devices
    return replace(parts[0][0], devices=devices, part=0, parts=1), tensors
