"""Update codecs: a delta to the bytes that go on the wire and back (float32, int8, top-k).

Every codec writes one safetensors file whose metadata holds "codec" and "shapes" plus the caller's
metadata. "shapes" is a JSON list of `[name, shape]` pairs: the list order is the tensors' order
in the payload, given explicitly so that no reader depends on a JSON object's key order. (The
first form, a JSON object name -> shape in key order, is still decoded.)
No pickle: the decoder only parses safetensors and JSON and checks every size and index before
using it, so hostile bytes raise `MessageError`.

Layouts (why they differ: safetensors' JSON header is ~100 bytes per tensor, which matters for a
64×10 head whose int8 payload is 650 bytes, so the lossy codecs pack everything into one array):

- "float32": one F32 tensor per key, readable by any safetensors reader as it is.
- "int8": one U8 array "d": a float32 scale per tensor (little-endian), then every tensor's
  int8 values, x ≈ q · scale (symmetric per-tensor quantization: deltas are centred on zero).
- "topk": one U8 array "d": K int32 indices into the concatenation of all flattened tensors
  (strictly increasing), then K float16 values. Each tensor keeps its
  `max(1, round(topk_fraction · size))` largest-magnitude entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from edgefl.errors import MessageError
from edgefl.head import Weights

CODEC_NAMES: tuple[str, ...] = ("float32", "int8", "topk")
RESERVED_METADATA = ("codec", "shapes")
# A decoded delta is allocated densely from the declared shapes; cap it so a few hostile bytes
# cannot ask for gigabytes (50M floats = 200 MB, far above any head).
MAX_DECODED_ELEMENTS = 50_000_000
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_LE_F32 = np.dtype("<f4")
_LE_I32 = np.dtype("<i4")
_LE_F16 = np.dtype("<f2")


class ErrorFeedback:
    """Residuals a lossy codec dropped, added back to the next round's delta (per key).

    With error feedback nothing a device learned is lost to compression, only delayed: what top-k
    drops this round is sent once it has accumulated enough magnitude (Seide et al. 2014; Stich et
    al. 2018). A device keeps one instance per head for the whole federation.
    """

    def __init__(self) -> None:
        self.residuals: Weights = {}

    def corrected(self, delta: Mapping[str, np.ndarray]) -> Weights:
        """Return delta + residual (float32), per key; keys without a residual pass through."""
        result: Weights = {}
        for key, value in delta.items():
            array = np.asarray(value, dtype=np.float32)
            residual = self.residuals.get(key)
            result[key] = (
                array + residual
                if residual is not None and residual.shape == array.shape
                else array
            )
        return result

    def update(self, corrected: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> None:
        """Keep what was meant (`corrected`) minus what the receiver will decode (`sent`)."""
        self.residuals = {
            key: (np.asarray(corrected[key], np.float32) - np.asarray(sent[key], np.float32))
            for key in corrected
        }

    def reset(self) -> None:
        """Forget every residual (e.g. when the head's shapes change with a new bundle)."""
        self.residuals = {}

    def state_dict(self) -> Weights:
        """Return the residuals, to persist across agent restarts."""
        return {key: value.copy() for key, value in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore residuals saved by `state_dict`."""
        self.residuals = {key: np.asarray(value, np.float32).copy() for key, value in state.items()}


def _shapes_json(delta: Mapping[str, np.ndarray]) -> str:
    # A list, not an object: the order of the pairs is the order of the tensors in the payload.
    return json.dumps(
        [[key, list(np.shape(value))] for key, value in delta.items()], separators=(",", ":")
    )


def _quantize_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric int8: q = round(x / s), s = max|x| / 127 (s = 1 for an all-zero tensor)."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0.0 and np.isfinite(peak) else 1.0
    q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
    return q, scale


def _topk_indices(flat: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the max(1, round(fraction·n)) largest-magnitude entries, ascending."""
    k = min(flat.size, max(1, round(fraction * flat.size)))
    if k >= flat.size:
        return np.arange(flat.size)
    chosen = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    return np.sort(chosen)


def encode_delta(
    delta: Mapping[str, np.ndarray],
    codec: str = "float32",
    *,
    feedback: ErrorFeedback | None = None,
    topk_fraction: float = 0.01,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a delta for the wire.

    Args:
        delta: local weights - global weights, per key (float arrays).
        codec: one of `CODEC_NAMES`.
        feedback: error-feedback state; when given, its residual is added to `delta` before
            encoding and replaced by what this encoding loses (int8 and topk; float32 is exact).
        topk_fraction: fraction of each tensor's entries that "topk" keeps, in (0, 1].
        metadata: extra string metadata for the header (e.g. round, device); keep it short,
            it is sent with every update. "codec" and "shapes" are reserved.

    Returns:
        safetensors bytes.

    Raises:
        ValueError: unknown codec, topk_fraction out of range, reserved or non-string metadata.
    """
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown codec {codec!r}; choose one of: {', '.join(CODEC_NAMES)}")
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the codec")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("metadata keys and values must be strings")

    values = (
        feedback.corrected(delta)
        if feedback is not None
        else {key: np.asarray(value, dtype=np.float32) for key, value in delta.items()}
    )
    header = {"codec": codec, "shapes": _shapes_json(values), **extra}
    if codec == "float32":
        # One tensor per key: any safetensors reader reads a float32 update as it is.
        arrays = {key: np.ascontiguousarray(value) for key, value in values.items()}
        sent = values
    else:
        blob, sent = _encode_lossy(values, codec, topk_fraction)
        arrays = {"d": np.frombuffer(blob, dtype=np.uint8)}
    if feedback is not None:
        feedback.update(values, sent)
    return bytes(save_safetensors_bytes(arrays, metadata=header))


def encode_payload(
    delta: Mapping[str, np.ndarray],
    codec: str,
    *,
    feedback: ErrorFeedback | None = None,
    topk_fraction: float = 0.01,
) -> bytes:
    """Return a codec's payload alone, the tensors in `delta`'s order (the compact frame's body).

    float32 is every tensor's values (little-endian float32, row-major) one after another; int8
    and topk are the bytes of their array "d" (module docstring). Arguments as `encode_delta`.

    Raises:
        ValueError: unknown codec, topk_fraction out of range.
    """
    if codec not in CODEC_NAMES:
        raise ValueError(f"unknown codec {codec!r}; choose one of: {', '.join(CODEC_NAMES)}")
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    values = (
        feedback.corrected(delta)
        if feedback is not None
        else {key: np.asarray(value, dtype=np.float32) for key, value in delta.items()}
    )
    if codec == "float32":
        parts = [value.astype(_LE_F32, copy=False).ravel() for value in values.values()]
        blob, sent = np.concatenate([*parts, np.zeros(0, _LE_F32)]).tobytes(), values
    else:
        blob, sent = _encode_lossy(values, codec, topk_fraction)
    if feedback is not None:
        feedback.update(values, sent)
    return blob


def _encode_lossy(values: Weights, codec: str, topk_fraction: float) -> tuple[bytes, Weights]:
    """Return the int8 or topk payload of `values` and what a receiver decodes from it."""
    sent: Weights = {}
    if codec == "int8":
        scales, parts = [], []
        for key, value in values.items():
            q, scale = _quantize_int8(value)
            scales.append(scale)
            parts.append(q.ravel())
            sent[key] = q.astype(np.float32) * np.float32(scale)
        blob = (
            np.array(scales, dtype=_LE_F32).tobytes()
            + np.concatenate([*parts, np.zeros(0, np.int8)]).tobytes()
        )
        return blob, sent
    indices, kept = [], []
    offset = 0
    for key, value in values.items():
        flat = value.ravel()
        chosen = _topk_indices(flat, topk_fraction) if flat.size else np.zeros(0, np.int64)
        half = np.clip(flat[chosen], -_FLOAT16_MAX, _FLOAT16_MAX).astype(_LE_F16)
        dense = np.zeros(flat.size, np.float32)
        dense[chosen] = half.astype(np.float32)
        sent[key] = dense.reshape(value.shape)
        indices.append(chosen + offset)
        kept.append(half)
        offset += flat.size
    if offset > np.iinfo(np.int32).max:
        raise ValueError("delta is too large for int32 top-k indices")
    blob = (
        np.concatenate([*indices, np.zeros(0, np.int64)]).astype(_LE_I32).tobytes()
        + np.concatenate([*kept, np.zeros(0, _LE_F16)]).tobytes()
    )
    return blob, sent


def _shape_pairs(raw: Any) -> list[tuple[Any, Any]]:
    """Return the (name, shape) pairs of "shapes" metadata in order, either form."""
    if isinstance(raw, dict):  # the first form: an object, in key order
        return list(raw.items())
    if not isinstance(raw, list):
        raise MessageError("update 'shapes' metadata is not a list of [name, shape] pairs")
    pairs: list[tuple[Any, Any]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise MessageError(f"update 'shapes' entry {item!r} is not a [name, shape] pair")
        pairs.append((item[0], item[1]))
    return pairs


def _parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    if text is None:
        raise MessageError("update has no 'shapes' metadata")
    try:
        raw: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"update 'shapes' metadata is not JSON: {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    total = 0
    for key, shape in _shape_pairs(raw):
        if key in shapes:
            raise MessageError(f"update 'shapes' names {key!r} twice")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise MessageError(f"update shape for {key!r} is not a list of non-negative integers")
        size = 1
        for dim in shape:
            size *= dim
            if size > MAX_DECODED_ELEMENTS:
                break
        total += size
        if total > MAX_DECODED_ELEMENTS:
            raise MessageError(f"update declares more than {MAX_DECODED_ELEMENTS} values")
        shapes[key] = tuple(shape)
    return shapes


def decode_delta(data: bytes) -> tuple[Weights, dict[str, str]]:
    """Decode bytes written by `encode_delta`.

    Args:
        data: the safetensors bytes from the wire.

    Returns:
        (delta as float32 arrays, metadata including "codec" and "shapes").

    Raises:
        MessageError: the bytes are not safetensors, the codec is unknown, or sizes, shapes or
            indices are inconsistent. No other exception escapes, whatever the bytes.
    """
    try:
        return _decode(data)
    except MessageError:
        raise
    except Exception as exc:  # hostile bytes must never surface as anything but MessageError
        raise MessageError(f"update cannot be decoded: {type(exc).__name__}: {exc}") from None


def _read_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"update must be bytes, got {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < 8:
        raise MessageError("update is not safetensors: shorter than its 8-byte header length")
    header_length = int.from_bytes(raw[:8], "little")
    if header_length > len(raw) - 8:
        raise MessageError("update is not safetensors: header length exceeds the message")
    try:
        header = json.loads(raw[8 : 8 + header_length])
        arrays = dict(load_safetensors_bytes(raw))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise MessageError(f"update is not valid safetensors: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise MessageError("update has no metadata (expected 'codec' and 'shapes')")
    return arrays, {str(k): str(v) for k, v in metadata.items()}


def _decode(data: bytes) -> tuple[Weights, dict[str, str]]:
    arrays, metadata = _read_safetensors(data)
    codec = metadata.get("codec")
    if codec not in CODEC_NAMES:
        raise MessageError(f"update has unknown codec {codec!r} (known: {', '.join(CODEC_NAMES)})")
    shapes = _parse_shapes(metadata.get("shapes"))

    if codec == "float32":
        if set(arrays) != set(shapes):
            raise MessageError(
                f"float32 update tensors {sorted(arrays)} do not match its shapes {sorted(shapes)}"
            )
        delta: Weights = {}
        for key, shape in shapes.items():
            array = arrays[key]
            if array.dtype != np.float32 or array.shape != shape:
                raise MessageError(
                    f"float32 update tensor {key!r} is {array.dtype}{list(array.shape)}, "
                    f"expected float32{list(shape)}"
                )
            delta[key] = np.array(array, dtype=np.float32)
        return delta, metadata

    blob = arrays.get("d")
    if set(arrays) != {"d"} or blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise MessageError(f"{codec} update must hold exactly one uint8 array 'd'")
    return _decode_payload(codec, blob.tobytes(), list(shapes.items())), metadata


def decode_payload(
    codec: str, payload: bytes | memoryview, shapes: Sequence[tuple[str, tuple[int, ...]]]
) -> Weights:
    """Decode a codec's payload alone (`encode_payload`) into tensors of the given shapes.

    Args:
        codec: one of `CODEC_NAMES`.
        payload: the payload bytes.
        shapes: (name, shape) of each tensor, in the payload's order; the receiver's own (the
            head it sent), so their sizes are trusted.

    Raises:
        MessageError: unknown codec, or the payload does not fit the shapes. Nothing else.
    """
    if codec not in CODEC_NAMES:
        raise MessageError(f"update has unknown codec {codec!r} (known: {', '.join(CODEC_NAMES)})")
    try:
        return _decode_payload(codec, payload, shapes)
    except MessageError:
        raise
    except Exception as exc:  # hostile bytes must never surface as anything but MessageError
        raise MessageError(f"update cannot be decoded: {type(exc).__name__}: {exc}") from None


def _decode_payload(
    codec: str, payload: bytes | memoryview, shapes: Sequence[tuple[str, tuple[int, ...]]]
) -> Weights:
    sizes = [math.prod(shape) for _, shape in shapes]
    total = sum(sizes)
    delta: Weights = {}
    if codec == "float32":
        if len(payload) != 4 * total:
            raise MessageError(f"float32 update holds {len(payload)} bytes, its shapes need "
                               f"{4 * total}")  # fmt: skip
        flat = np.frombuffer(payload, dtype=_LE_F32).astype(np.float32)
        start = 0
        for (key, shape), size in zip(shapes, sizes, strict=True):
            delta[key] = flat[start : start + size].reshape(shape)
            start += size
        return delta
    if codec == "int8":
        expected = 4 * len(shapes) + total
        if len(payload) != expected:
            raise MessageError(
                f"int8 update holds {len(payload)} bytes, its shapes need {expected}"
            )
        scales = np.frombuffer(payload, dtype=_LE_F32, count=len(shapes))
        q = np.frombuffer(payload, dtype=np.int8, offset=4 * len(shapes))
        start = 0
        for (key, shape), size, scale in zip(shapes, sizes, scales, strict=True):
            delta[key] = (q[start : start + size].astype(np.float32) * scale).reshape(shape)
            start += size
        return delta

    if len(payload) % 6:
        raise MessageError(f"topk update holds {len(payload)} bytes, not a multiple of 6")
    count = len(payload) // 6
    indices = np.frombuffer(payload, dtype=_LE_I32, count=count).astype(np.int64)
    values = np.frombuffer(payload, dtype=_LE_F16, offset=4 * count).astype(np.float32)
    if count and (indices[0] < 0 or indices[-1] >= total or np.any(np.diff(indices) <= 0)):
        raise MessageError(
            f"topk update indices must be strictly increasing and within [0, {total})"
        )
    flat = np.zeros(total, np.float32)
    flat[indices] = values
    start = 0
    for (key, shape), size in zip(shapes, sizes, strict=True):
        delta[key] = flat[start : start + size].reshape(shape)
        start += size
    return delta
