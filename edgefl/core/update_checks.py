"""The checks every update passes before it may count, whichever engine runs the rounds.

The synchronous `edgefl.core.rounds.RoundEngine` and the buffered asynchronous
`edgefl.core.async_rounds.AsyncRoundEngine` differ in which task an update may answer; what the
update must then be (the sender allowed, the header matching its topic, the task's bundle, head
and privacy echoed, a valid delta) is checked here, once. Each check raises `UpdateRejected`
with the code the record counts.
"""

from __future__ import annotations

from typing import NamedTuple

from edgefl.core.accounting import check_applied_privacy
from edgefl.core.codecs import decode_delta, decode_payload
from edgefl.core.settings import PrivacySettings
from edgefl.core.validation import UpdateRejected, validate_delta, validate_values
from edgefl.errors import MessageError
from edgefl.head import Weights
from edgefl.transport.messages import UpdateHeader, read_update_header
from edgefl.transport.update_frame import CompactHeader, is_compact, read_compact, task_ref

# An update's header in either form: the safetensors JSON one, or the compact frame's.
AnyHeader = UpdateHeader | CompactHeader


class TaskIdentity(NamedTuple):
    """What a task named and an "ok" update must echo (see docs/protocol.md).

    (A named tuple: one is made per update read, and a frozen dataclass costs several times as
    much to build.)
    """

    bundle_digest: str
    head_digest: str
    head_version: int
    privacy: PrivacySettings
    # The run and round: a compact update names its task by a reference over all of these.
    run_id: str = ""
    round: int = 0

    def ref(self, task: str) -> bytes:
        """Return the `task_ref` a compact update answering this task for `task` carries."""
        return task_ref(self.run_id, self.round, task, self.head_digest, self.head_version,
                        self.bundle_digest)  # fmt: skip


def read_header(
    device: str, number: int, payload: bytes, allow: frozenset[str] | None
) -> AnyHeader:
    """Check the sender may send at all and that the header matches the topic; return it.

    A compact frame names no device or round: it is its topic's, and `check_update` compares
    its task reference with the round's.

    Args:
        device: the device its topic names.
        number: the round its topic names.
        payload: the update's bytes (seal removed).
        allow: the device IDs allowed (None: any).

    Raises:
        UpdateRejected: "unknown-device", "malformed", "device-mismatch", "round-mismatch".
    """
    if allow is not None and device not in allow:
        raise UpdateRejected("unknown-device", f"device {device!r} is not in the fleet list")
    try:
        if is_compact(payload):
            return read_compact(payload)
        header = read_update_header(payload)
    except MessageError as exc:
        raise UpdateRejected("malformed", str(exc)) from None
    if header.device_id != device:
        raise UpdateRejected(
            "device-mismatch", f"update from {header.device_id!r} on {device!r}'s topic"
        )
    if header.round != number:
        raise UpdateRejected(
            "round-mismatch", f"update for round {header.round} on round {number}'s topic"
        )
    return header


def check_run(header: AnyHeader, run_id: str) -> None:
    """Refuse an update of another aggregation run ("run-mismatch"; a compact update's run is
    checked with its task reference)."""
    if isinstance(header, UpdateHeader) and header.run_id != run_id:
        raise UpdateRejected(
            "run-mismatch", f"update for run {header.run_id or '(none)'}, not {run_id}"
        )


def refuse_error_update(header: AnyHeader) -> None:
    """Turn a device's error update into its rejection ("device:CODE")."""
    if isinstance(header, UpdateHeader) and header.status == "error":
        raise UpdateRejected(
            f"device:{header.error_code or 'error'}", header.reason or "device reported failure"
        )


def check_update(
    header: AnyHeader,
    task: str,
    identity: TaskIdentity,
    head: Weights,
    max_norm: float | None,
    payload: bytes,
) -> Weights:
    """Check what an "ok" update claims (bundle, task, head, privacy, samples); return its delta.

    Args:
        header: the update's header (`read_header`).
        task: the head the device was asked to train.
        identity: what the task it answers named.
        head: that task's current global head (the delta must fit it).
        max_norm: the acceptance policy's bound on the delta's L2 norm (None: none).
        payload: the update's bytes.

    Raises:
        UpdateRejected: "bundle-mismatch", "task-mismatch", "head-mismatch" ("ref-mismatch" for
            a compact update), a privacy code, "no-samples", "malformed" or a `validate_delta`
            code.
    """
    if isinstance(header, CompactHeader):
        _check_reference(header, task, identity)
    else:
        _check_echoes(header, task, identity)
    check_applied_privacy(identity.privacy, header.clip_norm, header.noise_multiplier)
    if header.samples < 1:
        raise UpdateRejected("no-samples", "update reports no training samples")
    try:
        if isinstance(header, CompactHeader):
            delta = decode_compact_body(header, head, payload)
        else:
            delta = decode_delta(payload)[0]
    except MessageError as exc:
        raise UpdateRejected("malformed", str(exc)) from None
    if isinstance(header, CompactHeader):
        validate_values(delta, max_norm)  # keys, dtype and shapes are the head's by construction
    else:
        validate_delta(delta, head, max_norm)
    return delta


def _check_echoes(header: UpdateHeader, task: str, identity: TaskIdentity) -> None:
    """A safetensors update echoes the task's bundle, head and its own task by name."""
    if header.bundle_digest != identity.bundle_digest:
        raise UpdateRejected(
            "bundle-mismatch",
            f"update from bundle {header.bundle_digest[:12] or '(none)'}, round federates "
            f"{identity.bundle_digest[:12]}",
        )
    if header.task != task:
        raise UpdateRejected("task-mismatch", f"update is for task {header.task!r}, not {task!r}")
    if header.head_digest != identity.head_digest or header.head_version != identity.head_version:
        raise UpdateRejected(
            "head-mismatch",
            f"trained from head v{header.head_version} "
            f"({header.head_digest[:12] or 'no digest'}), round sends v{identity.head_version} "
            f"({identity.head_digest[:12]})",
        )


def _check_reference(header: CompactHeader, task: str, identity: TaskIdentity) -> None:
    """A compact update's reference stands for the run, round, task, head and bundle."""
    if header.ref != identity.ref(task):
        raise UpdateRejected(
            "ref-mismatch",
            f"update answers task {header.ref.hex()}, not round {identity.round}'s {task!r} "
            f"({identity.ref(task).hex()}): another run, round, task, head or bundle",
        )


def decode_compact_body(header: CompactHeader, head: Weights, payload: bytes) -> Weights:
    """Decode a compact update's tensors, shaped as `head`'s.

    Raises:
        MessageError: the payload does not fit the head.
    """
    shapes = [(key, tuple(head[key].shape)) for key in sorted(head)]
    return decode_payload(header.codec, memoryview(payload)[header.body_offset :], shapes)
