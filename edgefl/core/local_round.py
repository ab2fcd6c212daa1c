"""A board's answer to a round's task, as a pure function: train, privatize, encode.

`run_local_round` takes everything it needs as arguments (the task, the heads, the cached
features and labels, the head's layers, the board's own settings, the error-feedback state, a
clock and a noise generator) and returns the update's bytes and what happened. It does no I/O:
the agent (`edgefl.roles.agent`) fetches the task, keeps the state and publishes the bytes.
Every failure becomes an error update with one of `AGENT_ERROR_CODES`, never an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefl.core.codecs import ErrorFeedback, encode_delta
from edgefl.core.privacy import add_gaussian_noise, clip_by_norm
from edgefl.core.settings import (
    CodecSettings,
    PrivacySettings,
    RoundSettings,
    TrainConfig,
    from_mapping,
)
from edgefl.core.training import train_head
from edgefl.head import Weights, head_accuracy
from edgefl.transport.messages import (
    RoundTask,
    UpdateHeader,
    encode_update_error,
    update_metadata,
)

# An error update's reason is one line for a log, not a traceback (docs/protocol.md).
MAX_REASON_CHARS = 500

Clock = Callable[[], float]


@dataclass(frozen=True)
class BoardSettings:
    """What the board itself decides about its answers, whatever a round asks.

    Attributes:
        device_id: this device's ID (the update's header names it).
        task: which head of the bundle this device trains.
        privacy: this board's own bounds: the smaller clip norm and the larger noise multiplier
            of the board's and the round's apply. A board's noise multiplier may come without a
            clip norm of its own: the round's clip norm then scales it (no clip norm on either
            side makes the round an error update).
        codec: force an update codec; None follows the round's settings.
        personalize: return the locally trained head as the personal head.
        train_backend: "auto", "numpy" or "torch" (see edgefl.core.training).
    """

    device_id: str
    task: str = "default"
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    codec: str | None = None
    personalize: bool = True
    train_backend: str = "auto"


@dataclass(frozen=True)
class LocalData:
    """What the board trains on: backbone features of its samples and their labels."""

    features: np.ndarray
    labels: np.ndarray


@dataclass
class RoundOutcome:
    """What the board did in a round (kept for the caller; the same numbers went on the wire)."""

    round: int
    status: str  # "ok" | "error"
    error_code: str
    metrics: dict[str, float]
    bytes_sent: int


@dataclass
class LocalRound:
    """The answer to one task.

    Attributes:
        payload: the update's bytes, to publish as they are (an error update when it failed).
        outcome: status, error code, metrics and size.
        reason: why it failed (empty when it did not).
        trained: the locally trained head (the board's personal head when it personalizes);
            None when the round failed or the board does not personalize.
    """

    payload: bytes
    outcome: RoundOutcome
    reason: str = ""
    trained: Weights | None = None


def read_round_settings(config: Mapping[str, Any]) -> RoundSettings:
    """Read a task's `config`: `RoundSettings.to_wire()`, or the flat dict older servers send.

    A config without "schema_version" and without any part as an object ("train", "privacy",
    "codec") is the flat form (`{"epochs": 2, "lr": 0.1, "codec": "int8", ...}`); its fields
    are sorted into the parts by name, so a board keeps working with a server not yet upgraded.

    Raises:
        ValueError: a newer schema version, or a value of the wrong type or out of range.
    """
    # "codec" is both a part of the wire form (an object) and a field of the flat one (a name).
    parts = ("train", "privacy", "codec")
    if "schema_version" in config or any(isinstance(config.get(p), Mapping) for p in parts):
        return RoundSettings.from_wire(config)
    return RoundSettings(
        train=from_mapping(TrainConfig, config, strict=False, what="train"),
        privacy=from_mapping(PrivacySettings, config, strict=False, what="privacy"),
        codec=from_mapping(CodecSettings, config, strict=False, what="codec"),
    )


def privacy_bounds(board: PrivacySettings, round_: PrivacySettings) -> tuple[float | None, float]:
    """Return (clip norm, noise multiplier): the stricter of the board's and the round's.

    Raises:
        ValueError: noise is asked for but neither side gives a clip norm to scale it.
    """
    clips = [c for c in (board.clip_norm, round_.clip_norm) if c is not None]
    clip = min(clips) if clips else None
    multiplier = max(board.noise_multiplier, round_.noise_multiplier)
    if multiplier > 0 and clip is None:
        raise ValueError("noise_multiplier is set but no clip_norm bounds the noise")
    return clip, multiplier


def privatize(
    delta: Weights, clip: float | None, multiplier: float, rng: np.random.Generator
) -> Weights:
    """Clip `delta` to L2 norm `clip` (None: unclipped), then add N(0, (multiplier·clip)²)."""
    if clip is None:
        return delta
    delta = clip_by_norm(delta, clip)
    if multiplier > 0:
        delta = add_gaussian_noise(delta, multiplier * clip, rng)
    return delta


def error_update(
    task: RoundTask, board: BoardSettings, model_version: int, code: str, reason: str
) -> LocalRound:
    """Return the error update answering `task` with `code` (one of AGENT_ERROR_CODES)."""
    reason = reason[:MAX_REASON_CHARS]
    header = UpdateHeader(
        round=task.round,
        device_id=board.device_id,
        task=board.task,
        samples=0,
        head_version=task.head_version,
        model_version=model_version,
        status="error",
        error_code=code,
        reason=reason,
    )
    payload = encode_update_error(header)
    return LocalRound(payload, RoundOutcome(task.round, "error", code, {}, len(payload)), reason)


def run_local_round(
    task: RoundTask,
    heads: Mapping[str, Weights],
    data: LocalData | None,
    layers: Sequence[Mapping[str, Any]] | None,
    model_version: int,
    board: BoardSettings,
    feedback: ErrorFeedback,
    *,
    clock: Clock,
    noise_rng: np.random.Generator,
) -> LocalRound:
    """Answer a task: train the board's head on its data, privatize and encode the delta.

    Args:
        task: the round's task (round, head version, bundle version, settings in `config`).
        heads: the global heads the task carries, by task name.
        data: the board's features and labels; None when it has none.
        layers: the layers of the board's head in its installed bundle; None: no bundle.
        model_version: the installed bundle's version (0: none).
        board: the board's own settings.
        feedback: the error-feedback residuals of lossy codecs; updated in place when the
            update is encoded with one (the caller keeps it across rounds).
        clock: seconds, for the update's `train_seconds` metric (e.g. `time.perf_counter`).
        noise_rng: draws the privacy noise; pass a fresh OS-seeded generator on a board
            (noise a seed could reproduce would protect nothing).

    Returns:
        The update's bytes and the outcome; failures (no bundle, another bundle version, no
        head, no data, invalid settings, training raised) are error updates.
    """

    def fail(code: str, reason: str) -> LocalRound:
        return error_update(task, board, model_version, code, reason)

    if layers is None:
        return fail("no-bundle", "no bundle is installed on this device")
    if task.model_version != model_version:
        return fail(
            "model-version",
            f"task is for bundle v{task.model_version}, device runs v{model_version}",
        )
    if board.task not in heads:
        return fail("no-head", f"task carries no head for {board.task!r}")
    if data is None or len(data.labels) == 0:
        return fail("no-data", "the device has no labelled samples")
    try:
        return _train(task, heads[board.task], data, layers, model_version, board, feedback,
                      clock, noise_rng)  # fmt: skip
    except Exception as exc:  # any failure is reported, never raised on the network thread
        return fail("train-failed", f"{type(exc).__name__}: {exc}")


def _train(
    task: RoundTask,
    global_head: Weights,
    data: LocalData,
    layers: Sequence[Mapping[str, Any]],
    model_version: int,
    board: BoardSettings,
    feedback: ErrorFeedback,
    clock: Clock,
    noise_rng: np.random.Generator,
) -> LocalRound:
    settings = read_round_settings(task.config)
    clip, multiplier = privacy_bounds(board.privacy, settings.privacy)
    # The seed moves with the round so that minibatch orders differ between rounds but replay
    # identically when a round is resent.
    train = dataclasses.replace(settings.train, seed=settings.train.seed + task.round)
    started = clock()
    global_accuracy = head_accuracy(layers, global_head, data.features, data.labels)
    result = train_head(layers, global_head, data.features, data.labels, train, board.train_backend)
    delta = {key: result.weights[key] - global_head[key] for key in global_head}
    delta = privatize(delta, clip, multiplier, noise_rng)
    # Rounded: every digit is sent with every update, and 5 significant digits are plenty.
    metrics = {
        "loss": float(f"{result.loss:.5g}"),
        "global_accuracy": float(f"{global_accuracy:.5g}"),
        "personal_accuracy": float(f"{result.accuracy:.5g}"),
        "train_seconds": float(f"{clock() - started:.3g}"),
    }
    header = UpdateHeader(
        round=task.round,
        device_id=board.device_id,
        task=board.task,
        samples=int(result.samples),
        head_version=task.head_version,
        model_version=model_version,
        metrics=metrics,
    )
    codec = board.codec or settings.codec.codec
    payload = encode_delta(
        delta,
        codec,
        feedback=feedback if codec != "float32" else None,
        topk_fraction=settings.codec.topk_fraction,
        metadata=update_metadata(header),
    )
    outcome = RoundOutcome(task.round, "ok", "", metrics, len(payload))
    return LocalRound(payload, outcome, trained=result.weights if board.personalize else None)
