"""The compact update frame: a fixed binary header before the codec's payload.

An update in the safetensors form (docs/protocol.md, "Update") carries its header as JSON: with
the digests it echoes it is ~750 bytes, more than a 64×10 head's whole int8 payload (658). Most
of it repeats what the aggregator sent: run, round, task, head and bundle. The compact frame
names that task by an 8-byte reference instead (`task_ref`), packs the rest in fixed fields and
takes the tensors' shapes and order from the head the task carried, so the header is 18 bytes
plus 4 per metric. A board sends it only to an aggregator whose task says it reads it
(`RoundTask.update_frame` ≥ 1); every aggregator still reads the safetensors form.

Layout (little-endian):

    0   4   magic "EFU1" (the compact frame, version 1)
    4   1   flags: bits 0-1 codec (0 float32, 1 int8, 2 topk), bit 2 privacy fields follow,
            bits 3-7 zero
    5   8   task reference (`task_ref`)
    13  4   samples, unsigned
    17  1   metrics present: bit i for `METRIC_SLOTS[i]`, bits 6-7 zero
    18  4m  the present metrics, float32, in slot order
    ..  8   if bit 2: clip_norm, noise_multiplier (float32 each)
    ..      the codec's payload (`edgefl.core.codecs.encode_payload`), the head's parameters in
            byte-wise order of their names

Pure: bytes in, bytes out; hostile bytes raise `MessageError`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections.abc import Mapping
from typing import NamedTuple

from edgefl.errors import MessageError

FRAME_MAGIC = b"EFU1"
# The frame version the task announces (`RoundTask.update_frame`); 0: safetensors only.
COMPACT_FRAME = 1
FRAME_CODECS: tuple[str, ...] = ("float32", "int8", "topk")
# Metrics a board sends, by slot; an update with another metric goes in the safetensors form.
METRIC_SLOTS: tuple[str, ...] = (
    "loss", "global_accuracy", "personal_accuracy", "train_seconds", "limited", "steps",
)  # fmt: skip
REF_BYTES = 8
_FIXED = struct.Struct("<4sB8sIB")  # magic, flags, reference, samples, metrics mask
_PRIVACY = struct.Struct("<ff")
_PRIVACY_FLAG = 0x04
_REF_DOMAIN = b"edgefl-task-ref-v1\0"


class CompactHeader(NamedTuple):
    """The fields of a compact update; the round, device and task are its topic's and task's.

    (A named tuple: the aggregator makes thousands a second, and a frozen dataclass costs
    several times as much to build.)
    """

    codec: str
    ref: bytes
    samples: int
    metrics: dict[str, float]
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    body_offset: int = _FIXED.size
    status: str = "ok"  # a compact frame is never an error update (those stay JSON)


@functools.lru_cache(maxsize=4096)  # the aggregator asks for the same few per round
def task_ref(
    run_id: str, round_number: int, task: str, head_digest: str, head_version: int,
    bundle_digest: str,
) -> bytes:  # fmt: skip
    """Return the 8-byte reference of the task an update answers.

    SHA-256 over a domain string and the run, round, task name, head digest, head version and
    bundle digest (each NUL-terminated, numbers in decimal), cut to its first 8 bytes. An update
    whose reference differs answered another run, round, task, head or bundle; the reference
    detects honest mismatches, while the MAC or seal says who sent it.
    """
    parts = (run_id, str(round_number), task, head_digest, str(head_version), bundle_digest)
    text = "\0".join(parts).encode("utf-8")
    return hashlib.sha256(_REF_DOMAIN + text).digest()[:REF_BYTES]


def fits_compact(metrics: Mapping[str, float]) -> bool:
    """Whether every metric has a slot in the frame (else the update goes as safetensors)."""
    return all(name in METRIC_SLOTS for name in metrics)


def is_compact(data: bytes) -> bool:
    """Whether `data` starts like a compact update frame."""
    return data[: len(FRAME_MAGIC)] == FRAME_MAGIC


def encode_compact(
    codec: str,
    ref: bytes,
    samples: int,
    payload: bytes,
    metrics: Mapping[str, float] | None = None,
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
) -> bytes:
    """Return a compact update frame.

    Args:
        codec: the payload's codec, one of `FRAME_CODECS`.
        ref: `task_ref` of the task answered.
        samples: training samples (the aggregation weight).
        payload: the codec's payload, tensors in byte-wise order of their names.
        metrics: values by name, each a `METRIC_SLOTS` name.
        clip_norm: the L2 clip norm applied (None: unclipped; then no privacy fields).
        noise_multiplier: the noise added, in units of `clip_norm`.

    Raises:
        ValueError: unknown codec or metric, a reference not 8 bytes, samples out of range.
    """
    if codec not in FRAME_CODECS:
        raise ValueError(f"unknown codec {codec!r}")
    if len(ref) != REF_BYTES:
        raise ValueError(f"a task reference is {REF_BYTES} bytes, not {len(ref)}")
    if not 0 <= samples < 2**32:
        raise ValueError(f"samples {samples} does not fit the frame")
    values = dict(metrics or {})
    unknown = sorted(set(values) - set(METRIC_SLOTS))
    if unknown:
        raise ValueError(f"metrics {unknown} have no slot in the compact frame")
    flags = FRAME_CODECS.index(codec) | (_PRIVACY_FLAG if clip_norm is not None else 0)
    mask, present = 0, []
    for slot, name in enumerate(METRIC_SLOTS):
        if name in values:
            mask |= 1 << slot
            present.append(values[name])
    parts = [
        _FIXED.pack(FRAME_MAGIC, flags, ref, samples, mask),
        struct.pack(f"<{len(present)}f", *present),
    ]
    if clip_norm is not None:
        parts.append(_PRIVACY.pack(clip_norm, noise_multiplier))
    parts.append(payload)
    return b"".join(parts)


def read_compact(data: bytes) -> CompactHeader:
    """Read a compact frame's header; its payload starts at `body_offset`.

    Raises:
        MessageError: not a compact frame, truncated, reserved bits set, a non-finite metric
            or privacy field, or an impossible clip norm or noise.
    """
    if len(data) < _FIXED.size or not is_compact(data):
        raise MessageError("update is not a compact frame (magic EFU1 and an 18-byte header)")
    _, flags, ref, samples, mask = _FIXED.unpack_from(data)
    codec_id = flags & 0x03
    if flags & ~0x07 or codec_id >= len(FRAME_CODECS) or mask >> len(METRIC_SLOTS):
        raise MessageError(
            f"compact update sets reserved bits (flags {flags:#x}, metrics {mask:#x})"
        )
    names, metrics_format = _metric_layout(mask)
    offset = _FIXED.size + metrics_format.size
    privacy = bool(flags & _PRIVACY_FLAG)
    if len(data) < offset + (_PRIVACY.size if privacy else 0):
        raise MessageError("compact update is shorter than its header")
    values = metrics_format.unpack_from(data, _FIXED.size)
    if not all(math.isfinite(v) for v in values):
        raise MessageError("compact update has a non-finite metric")
    clip_norm, noise = None, 0.0
    if privacy:
        clip_norm, noise = _PRIVACY.unpack_from(data, offset)
        offset += _PRIVACY.size
        if not (math.isfinite(clip_norm) and clip_norm > 0 and math.isfinite(noise) and noise >= 0):
            raise MessageError(
                f"compact update claims clip_norm {clip_norm} and noise {noise}: the norm must be "
                "positive and the noise non-negative"
            )
    return CompactHeader(
        FRAME_CODECS[codec_id], bytes(ref), samples, dict(zip(names, values, strict=True)),
        clip_norm, noise, offset,
    )  # fmt: skip


@functools.cache
def _metric_layout(mask: int) -> tuple[tuple[str, ...], struct.Struct]:
    """The metric names a mask says are present, and the struct that reads their values (one
    per mask: the aggregator reads thousands of frames a second with the same few masks)."""
    names = tuple(name for slot, name in enumerate(METRIC_SLOTS) if mask >> slot & 1)
    return names, struct.Struct(f"<{len(names)}f")
