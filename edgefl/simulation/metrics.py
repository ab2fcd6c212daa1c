"""Per-round records of a simulation and their files: metrics.json and metrics.csv."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
JSON_FILE = "metrics.json"
CSV_FILE = "metrics.csv"


@dataclass
class RoundRecord:
    """What one round of a simulation did, as the terminal, the files and the plot show it.

    Attributes:
        round: 1-based round number.
        online: devices online at the start of the round.
        selected: devices the aggregator asked for an update.
        reported: updates the aggregator accepted into the round.
        dropped: selected devices that simulated a dropout.
        accuracy: test accuracy of the new global head (nan when there is no test set).
        personal_accuracy: mean accuracy of the devices' personalized heads on their own data,
            weighted by samples (nan when devices do not report it).
        device_accuracy: the same for the global head the round started from: how well one
            shared head fits each device's data, against which personalization is measured.
        bytes_up: update bytes the devices sent in this round, all together.
        bytes_down: task bytes the aggregator sent for this round.
        seconds: wall time of the round.
        elapsed: wall time from the start of the federated part to the end of this round.
        epsilon: the privacy spent after this round, at `delta` (nan when rounds add no noise;
            see `edgefl.core.accounting`).
        delta: the δ the ε is stated for (nan with it).
    """

    round: int
    online: int
    selected: int
    reported: int
    dropped: int
    accuracy: float
    personal_accuracy: float
    device_accuracy: float
    bytes_up: int
    bytes_down: int
    seconds: float
    elapsed: float
    epsilon: float = math.nan
    delta: float = math.nan

    @property
    def bytes_per_device(self) -> float:
        """Mean update bytes per reporting device (0 when none reported)."""
        return self.bytes_up / self.reported if self.reported else 0.0


@dataclass
class SimulationMetrics:
    """A whole run: its settings and one record per round."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last round (nan before any round)."""
        return self.rounds[-1].accuracy if self.rounds else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Return plain JSON-able data; NaN becomes null so any JSON reader accepts it."""
        rows = [_row(r) for r in self.rounds]
        data = {
            "schema_version": self.schema_version,
            "config": self.config,
            "summary": self.summary,
            "rounds": rows,
        }
        return _nan_to_none(data)


CSV_COLUMNS = [f.name for f in fields(RoundRecord)] + ["bytes_per_device"]


def write_metrics(metrics: SimulationMetrics, out: str | Path) -> tuple[Path, Path]:
    """Write metrics.json and metrics.csv into a directory (created when missing).

    Args:
        metrics: the run's metrics.
        out: the output directory.

    Returns:
        The paths of the JSON and the CSV file.
    """
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / JSON_FILE, directory / CSV_FILE
    json_path.write_text(json.dumps(metrics.to_dict(), indent=2, default=str))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in metrics.rounds:
            writer.writerow({k: _csv_value(v) for k, v in _row(record).items()})
    return json_path, csv_path


def _row(record: RoundRecord) -> dict[str, Any]:
    """One round as the files show it: the record's fields and the derived bytes per device."""
    return dict(asdict(record), bytes_per_device=record.bytes_per_device)


def _csv_value(value: Any) -> Any:
    """Format floats compactly and NaN as an empty cell."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_nan_to_none(v) for v in value]
    return value
