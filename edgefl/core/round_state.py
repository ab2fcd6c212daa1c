"""What a federated round holds and produces: verdicts on updates, the open round, the closed one.

Plain values shared by the round engine (`edgefl.core.rounds`) and the aggregator's record; no
rules live here except the summary of a round's accepted updates (`update_metrics`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgefl.core.settings import PrivacySettings
from edgefl.head import Weights
from edgefl.transport.messages import RoundTask
from edgefl.transport.update_frame import COMPACT_FRAME

# What `RoundEngine.receive` decided about an update.
ACCEPTED = "accepted"
REJECTED = "rejected"
LATE = "late"  # for a round already closed; recorded under that round
REPEATED = "repeated"  # the same bytes again (re-delivery after a reconnect): already counted

# A selected device's answer in a round's result when none came before the round closed.
NO_ANSWER = "no-answer"

# Device metrics averaged over a round's accepted updates, weighted by samples.
DEVICE_METRICS = ("loss", "global_accuracy", "personal_accuracy")


@dataclass(frozen=True)
class Verdict:
    """What the engine decided about one update, with what the record needs to keep."""

    outcome: str  # ACCEPTED | REJECTED | LATE | REPEATED
    round: int  # the round the update was for (its topic's round): recorded and counted there
    device: str
    code: str = ""  # why it was rejected or late
    reason: str = ""
    task: str = ""
    samples: int = 0
    sha256: str = ""
    size: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    complete: bool = False  # every selected device of the open round has now answered


@dataclass
class AcceptedUpdate:
    """An update taken into a round: the decoded delta and what it reported."""

    delta: Weights
    samples: int
    sha256: str
    size: int
    metrics: dict[str, float]


@dataclass
class OpenRound:
    """A round from selection to close. `config` is the task's settings as sent on the wire.

    `run_id`, `head_digest` and `bundle_digest` are what the task names and every update must
    echo. `answers` holds each selected device's answer so far: "accepted" or the code its
    update was rejected with (`reasons` says why); `answered` the SHA-256 of that update.
    """

    number: int
    selected: dict[str, str]  # device -> task
    config: dict[str, object]
    deadline: float  # Unix time
    head_version: int
    run_id: str = ""
    head_digest: str = ""
    bundle_digest: str = ""
    privacy: PrivacySettings = field(default_factory=PrivacySettings)  # what the task asks
    announced: dict[str, int] = field(default_factory=dict)  # device -> samples in its status
    online: int = 0
    stale: list[str] = field(default_factory=list)
    accepted: dict[str, AcceptedUpdate] = field(default_factory=dict)
    answered: dict[str, str] = field(default_factory=dict)  # device -> sha256 (rejected too)
    answers: dict[str, str] = field(default_factory=dict)  # device -> "accepted" | code
    reasons: dict[str, str] = field(default_factory=dict)  # device -> why not accepted
    rejected: Counter[str] = field(default_factory=Counter)
    late: int = 0
    closed: bool = False

    @property
    def complete(self) -> bool:
        """Whether every selected device has answered (a rejected answer counts)."""
        return len(self.answered) >= len(self.selected)

    def task(self, model_version: int, now: float) -> RoundTask:
        """Return the task message announcing this round (its heads go beside it)."""
        return RoundTask(
            round=self.number,
            selected=sorted(self.selected),
            tasks=sorted(set(self.selected.values())),
            head_version=self.head_version,
            model_version=model_version,
            deadline_s=max(0.0, self.deadline - now),
            config=self.config,
            run_id=self.run_id,
            head_digest=self.head_digest,
            bundle_digest=self.bundle_digest,
            update_frame=COMPACT_FRAME,
        )


@dataclass(frozen=True)
class ClosedRound:
    """What closing a round produced."""

    number: int
    status: str  # "closed" (aggregated) | "failed" (below quorum; heads unchanged)
    reason: str
    head_version: int  # after the round
    selected: int
    accepted: int
    rejected: dict[str, int]
    late: int
    online: int
    stale: list[str]
    metrics: dict[str, float]  # accepted updates' samples, bytes, device_* averages; bounding
    answers: dict[str, str] = field(default_factory=dict)  # every selected device
    reasons: dict[str, str] = field(default_factory=dict)


class StoredAnswer(Protocol):
    """An accepted update as a record keeps it (`edgefl.roles.record.StoredUpdate` is one)."""

    device_id: str
    samples: int
    sha256: str
    payload: bytes
    metrics: dict[str, float]


def update_metrics(accepted: Iterable[AcceptedUpdate]) -> dict[str, float]:
    """Summarise a round's accepted updates: total samples, mean bytes, device metric averages.

    A device metric (`DEVICE_METRICS`) is averaged, weighted by samples, only when every update
    reports it.
    """
    updates = list(accepted)
    if not updates:
        return {}
    samples = np.array([u.samples for u in updates], dtype=np.float64)
    metrics = {
        "samples": float(samples.sum()),
        "bytes_per_update": float(np.mean([u.size for u in updates])),
    }
    weights = samples / max(samples.sum(), 1.0)
    for name in DEVICE_METRICS:
        values = [u.metrics.get(name) for u in updates]
        if all(v is not None for v in values):
            metrics[f"device_{name}"] = float(np.dot(weights, np.array(values, float)))
    return metrics
