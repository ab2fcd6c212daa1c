"""What a federation run reports: a summary per round, and the files written from them.

metrics.csv and metrics.json are rebuilt from the record (`summaries_from_record`) after every
round and on every restart, so they hold every round the SQLite file holds, each rejection
counted under the round it was for (also those that arrived after it closed).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefl.atomic import write_atomic
from edgefl.bundle import encode_head
from edgefl.head import Weights
from edgefl.roles.record import AggregatorRecord


@dataclass
class RoundSummary:
    """What one round did; also the per-round row of metrics.csv."""

    round: int
    status: str  # "closed" | "failed"
    head_version: int
    selected: int
    accepted: int
    rejected: dict[str, int]
    late: int
    seconds: float
    metrics: dict[str, float]
    online: int = 0  # eligible devices with a fresh status when the round selected
    stale_devices: list[str] = field(default_factory=list)  # said online, not heard in time

    def row(self) -> dict[str, Any]:
        """Return a flat dict for CSV/JSON: metrics and rejection counts become columns."""
        flat: dict[str, Any] = {
            "round": self.round,
            "status": self.status,
            "head_version": self.head_version,
            "selected": self.selected,
            "online": self.online,
            "stale": len(self.stale_devices),
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "late": self.late,
            "seconds": round(self.seconds, 4),
        }
        flat.update(self.metrics)
        flat.update({f"rejected_{code}": n for code, n in sorted(self.rejected.items())})
        return flat


@dataclass
class FederationSummary:
    """What a whole run did."""

    rounds: list[RoundSummary]
    head_version: int
    accuracy: float | None
    seconds: float
    state_path: str
    stopped: str = ""  # why the run ended before its last round ("": it did not)


def write_metrics(out_dir: Path, summaries: Sequence[RoundSummary]) -> None:
    """Write metrics.json and metrics.csv (one row per round; columns: the union of rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [s.row() for s in summaries]
    write_atomic(out_dir / "metrics.json", json.dumps(rows, indent=2).encode())
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "metrics.csv", text.getvalue().encode())


def write_heads(out_dir: Path, heads: Mapping[str, Weights]) -> None:
    """Write each task's head as safetensors: head.safetensors (default), head-TASK.safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, weights in heads.items():
        name = "head.safetensors" if task == "default" else f"head-{task}.safetensors"
        write_atomic(out_dir / name, encode_head(weights))


def summaries_from_record(record: AggregatorRecord) -> list[RoundSummary]:
    """Return a summary of every finished round in the record, oldest first.

    Counts come from the record's updates (so rejections recorded after a round closed count
    in it); seconds and stale devices from the stored result.
    """
    # Three queries whatever the number of rounds: this runs after every round of a long run.
    metrics = record.metrics()
    counts_by_round = record.update_counts_by_round()
    summaries = []
    for number, status, _config, result in record.finished_rounds():
        counts = counts_by_round.get(number, {})
        rejected = {code: n for code, n in counts.items() if code not in ("accepted", "late")}
        summaries.append(
            RoundSummary(
                number,
                status,
                int(result.get("head_version", 0)),
                int(result.get("selected", 0)),
                int(result.get("accepted", 0)),
                rejected,
                counts.get("late", 0),
                float(result.get("seconds", 0.0)),
                metrics.get(number, {}),
                int(result.get("online", 0)),
                list(result.get("stale_devices", [])),
            )
        )
    return summaries
