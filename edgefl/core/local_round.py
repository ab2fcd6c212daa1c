"""A board's answer to a round's task, as a pure function: check, train, privatize, encode.

`run_local_round` takes everything it needs as arguments (the task, the heads, the cached
features and labels, the head's layers, the board's own settings and limits, the personal head,
the error-feedback state, a clock and a noise generator) and returns the update's bytes and what
happened. It does no I/O: the agent (`edgefl.roles.agent`) fetches the task, keeps the state and
publishes the bytes. Every failure becomes an error update with one of `AGENT_ERROR_CODES`,
never an exception. Every update echoes the task's run ID, head digest and bundle digest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefl.core.board_limits import BoardLimits, bound_training
from edgefl.core.codecs import ErrorFeedback, encode_delta, encode_payload
from edgefl.core.personal_head import judging_split, keeps_candidate
from edgefl.core.privacy import add_gaussian_noise, clip_by_norm
from edgefl.core.settings import (
    CodecSettings,
    PrivacySettings,
    RoundSettings,
    TrainConfig,
    from_mapping,
)
from edgefl.core.training import train_head
from edgefl.head import Weights, head_accuracy, head_digest
from edgefl.transport.messages import (
    RoundTask,
    UpdateHeader,
    encode_update_error,
    update_metadata,
)
from edgefl.transport.update_frame import COMPACT_FRAME, encode_compact, fits_compact, task_ref

# An error update's reason is one line for a log, not a traceback (docs/protocol.md).
MAX_REASON_CHARS = 500

Clock = Callable[[], float]
# What names a task (run ID, round, head digest, bundle digest): a stored answer is re-sent only
# for the same task, never for another with the same round number.
TaskKey = tuple[str, int, str, str]


def task_key(task: RoundTask, heads: Mapping[str, Weights]) -> TaskKey:
    """Return the identity of `task`; the heads' own digest stands in when the task has none."""
    return (task.run_id, task.round, task.head_digest or head_digest(heads), task.bundle_digest)


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
        personalize: keep a personal head: return the locally trained head when it is not
            worse than the current personal head on the board's fixed judging share of its
            samples (`edgefl.core.personal_head`).
        train_backend: "auto", "numpy" or "torch" (see edgefl.core.training).
        limits: the most a round may ask (`edgefl.core.board_limits`; beyond them, clamped).
    """

    device_id: str
    task: str = "default"
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    codec: str | None = None
    personalize: bool = True
    train_backend: str = "auto"
    limits: BoardLimits = field(default_factory=BoardLimits)


@dataclass(frozen=True)
class LocalData:
    """What the board trains on: backbone features of its samples and their labels."""

    features: np.ndarray
    labels: np.ndarray


@dataclass
class RoundOutcome:
    """What the board did in a round (kept for the caller; the same numbers went on the wire).

    `answer` and `answer_reason` are what the aggregator made of the update, from the round's
    result once it arrives: "accepted", a rejection code, or "unknown" (the result does not
    list this device); empty until then.
    """

    round: int
    status: str  # "ok" | "error"
    error_code: str
    metrics: dict[str, float]
    bytes_sent: int
    run_id: str = ""
    answer: str = ""
    answer_reason: str = ""


@dataclass
class LocalRound:
    """The answer to one task.

    Attributes:
        payload: the update's bytes, to publish as they are (an error update when it failed).
        outcome: status, error code, metrics and size.
        reason: why it failed (empty when it did not).
        trained: the board's new personal head: the locally trained one when the board
            personalizes and it is not worse on the held-out samples than the current one;
            None keeps the current (the round failed, the board does not personalize, or the
            new head is worse).
        limited: what the board's limits changed ("epochs 30000 -> 50", "stopped at the 120 s
            budget after 3.2 epochs"); empty when nothing.
    """

    payload: bytes
    outcome: RoundOutcome
    reason: str = ""
    trained: Weights | None = None
    limited: list[str] = field(default_factory=list)


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
        run_id=task.run_id,
        head_digest=task.head_digest,
        bundle_digest=task.bundle_digest,
    )
    payload = encode_update_error(header)
    outcome = RoundOutcome(task.round, "error", code, {}, len(payload), run_id=task.run_id)
    return LocalRound(payload, outcome, reason)


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
    bundle_digest: str = "",
    personal: Weights | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> LocalRound:
    """Answer a task: check what it names, train the board's head on its data, privatize and
    encode the delta.

    Args:
        task: the round's task (run, round, head and bundle digests, settings in `config`).
        heads: the global heads the task carries, by task name.
        data: the board's features and labels; None when it has none.
        layers: the layers of the board's head in its installed bundle; None: no bundle.
        model_version: the installed bundle's version (0: none).
        board: the board's own settings and limits.
        feedback: the error-feedback residuals of lossy codecs; updated in place when the
            update is encoded with one (the caller keeps it across rounds).
        clock: seconds, for the update's `train_seconds` metric and the limits' time budget
            (e.g. `time.perf_counter`); read before every minibatch step.
        noise_rng: draws the privacy noise; pass a fresh OS-seeded generator on a board
            (noise a seed could reproduce would protect nothing).
        bundle_digest: the installed bundle's digest (`ModelBundle.digest`); a task naming
            another is refused. Empty: not checked.
        personal: the board's personal head, or None before it has one; the trained head
            replaces it only when not worse on the held-out samples.
        cancelled: asked with the clock; True stops training like the time budget (the agent
            is stopping).

    Returns:
        The update's bytes and the outcome; failures (no bundle, another bundle, heads that do
        not match the task's digest, no head, no data, invalid settings, training raised) are
        error updates. A task with empty digests (an older aggregator) is answered unchecked.
    """

    def fail(code: str, reason: str) -> LocalRound:
        return error_update(task, board, model_version, code, reason)

    if layers is None:
        return fail("no-bundle", "no bundle is installed on this device")
    if task.bundle_digest and bundle_digest and task.bundle_digest != bundle_digest:
        return fail(
            "bundle-digest",
            f"task is for bundle {task.bundle_digest[:12]}, device runs {bundle_digest[:12]}",
        )
    if task.model_version != model_version:
        return fail(
            "model-version",
            f"task is for bundle v{task.model_version}, device runs v{model_version}",
        )
    if task.head_digest and head_digest(heads) != task.head_digest:
        return fail("head-digest", "the task's heads do not hash to its head_digest")
    if board.task not in heads:
        return fail("no-head", f"task carries no head for {board.task!r}")
    if data is None or len(data.labels) == 0:
        return fail("no-data", "the device has no labelled samples")
    try:
        return _train(task, heads[board.task], data, layers, model_version, board, feedback,
                      clock, noise_rng, personal, cancelled)  # fmt: skip
    except Exception as exc:  # any failure is reported, never raised on a board's thread
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
    personal: Weights | None,
    cancelled: Callable[[], bool] | None,
) -> LocalRound:
    settings = read_round_settings(task.config)
    clip, multiplier = privacy_bounds(board.privacy, settings.privacy)
    train, limited = bound_training(settings.train, board.limits)
    # The seed moves with the round so that minibatch orders differ between rounds but replay
    # identically when a round is resent.
    train = dataclasses.replace(train, seed=train.seed + task.round)
    features, labels = data.features, data.labels
    started = clock()
    budget = board.limits.round_budget_s

    def stop() -> bool:
        return clock() - started > budget or (cancelled is not None and cancelled())

    global_accuracy = head_accuracy(layers, global_head, features, labels)
    result = train_head(layers, global_head, features, labels, train, board.train_backend, stop)
    if result.stopped:
        epochs_run = result.steps / max(1, -(-len(labels) // train.batch_size))
        limited.append(f"stopped at the {budget:g} s budget after {epochs_run:.3g} epochs")
    delta = {key: result.weights[key] - global_head[key] for key in global_head}
    delta = privatize(delta, clip, multiplier, noise_rng)
    # Rounded: every digit is sent with every update, and 5 significant digits are plenty.
    metrics = {
        "loss": float(f"{result.loss:.5g}"),
        "global_accuracy": float(f"{global_accuracy:.5g}"),
        "personal_accuracy": float(f"{result.accuracy:.5g}"),
        "train_seconds": float(f"{clock() - started:.3g}"),
    }
    if limited:  # the update is not quite what the round asked: say so (docs/protocol.md)
        metrics["limited"] = 1.0
        metrics["steps"] = float(result.steps)
    header = UpdateHeader(
        round=task.round,
        device_id=board.device_id,
        task=board.task,
        samples=int(result.samples),
        head_version=task.head_version,
        model_version=model_version,
        metrics=metrics,
        run_id=task.run_id,
        head_digest=task.head_digest,
        bundle_digest=task.bundle_digest,
        clip_norm=clip,
        noise_multiplier=multiplier if clip is not None else 0.0,
    )
    codec = board.codec or settings.codec.codec
    payload = encode_update(
        header, delta, codec, task.update_frame,
        feedback=feedback if codec != "float32" else None,
        topk_fraction=settings.codec.topk_fraction,
    )  # fmt: skip
    outcome = RoundOutcome(task.round, "ok", "", metrics, len(payload), run_id=task.run_id)
    trained = None
    if board.personalize:
        # Judged on the board's fixed share; every sample still trains (see personal_head).
        _, held = judging_split(len(labels))
        judge = held if len(held) else slice(None)
        current = personal if personal is not None else global_head
        if keeps_candidate(layers, current, result.weights, data.features[judge],
                           data.labels[judge]):  # fmt: skip
            trained = result.weights
    return LocalRound(payload, outcome, trained=trained, limited=limited)


def encode_update(
    header: UpdateHeader,
    delta: Mapping[str, np.ndarray],
    codec: str,
    update_frame: int = 0,
    *,
    feedback: ErrorFeedback | None = None,
    topk_fraction: float = 0.01,
) -> bytes:
    """Return an "ok" update's bytes: the compact frame where the task reads it, else safetensors.

    Args:
        header: the update's header (what it answers, samples, metrics, privacy applied).
        delta: the head's delta, by parameter name.
        codec: one of `edgefl.core.codecs.CODEC_NAMES`.
        update_frame: the task's `update_frame` (0: the aggregator reads safetensors only).
        feedback, topk_fraction: as `edgefl.core.codecs.encode_delta`.
    """
    if update_frame < COMPACT_FRAME or not fits_compact(header.metrics):
        return encode_delta(delta, codec, feedback=feedback, topk_fraction=topk_fraction,
                            metadata=update_metadata(header))  # fmt: skip
    ordered = {key: delta[key] for key in sorted(delta)}  # the frame's order: byte-wise names
    payload = encode_payload(ordered, codec, feedback=feedback, topk_fraction=topk_fraction)
    ref = task_ref(header.run_id, header.round, header.task, header.head_digest,
                   header.head_version, header.bundle_digest)  # fmt: skip
    return encode_compact(codec, ref, header.samples, payload, header.metrics, header.clip_norm,
                          header.noise_multiplier)  # fmt: skip
