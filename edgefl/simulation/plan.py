"""A simulated fleet: how the data is split across devices and how the devices differ.

Everything here is pure: labels and options in, a `FleetPlan` out. The runner turns a plan into
real agents; the same plan (same seed) always gives the same devices, data and schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgefl.errors import SimulationError

PARTITION_KINDS = ("iid", "dirichlet", "shards")
CHURN_KINDS = ("join", "leave")


@dataclass(frozen=True)
class PartitionSpec:
    """How samples are dealt to devices: "iid", "dirichlet:ALPHA" or "shards:K".

    `alpha` is the Dirichlet concentration (smaller is more skewed); `shards` is how many
    label-sorted shards each device gets.
    """

    kind: str
    alpha: float = 0.0
    shards: int = 0

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return self.kind


def parse_partition(text: str) -> PartitionSpec:
    """Parse a partition spec: "iid", "dirichlet:0.5" or "shards:2".

    Args:
        text: the spec as a user typed it.

    Returns:
        The parsed spec.

    Raises:
        SimulationError: the kind is unknown or its parameter is missing or out of range.
    """
    kind, _, param = text.strip().partition(":")
    kind = kind.lower()
    if kind == "iid":
        if param:
            raise SimulationError(f"partition 'iid' takes no parameter (got {text!r})")
        return PartitionSpec("iid")
    if kind == "dirichlet":
        alpha = float(_parse_number(param, text, "dirichlet:ALPHA, e.g. dirichlet:0.5", float))
        if not (alpha > 0 and math.isfinite(alpha)):
            raise SimulationError(f"partition {text!r}: alpha must be a positive number")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "shards":
        shards = int(_parse_number(param, text, "shards:K, e.g. shards:2", int))
        if shards < 1:
            raise SimulationError(f"partition {text!r}: shards per device must be at least 1")
        return PartitionSpec("shards", shards=shards)
    raise SimulationError(
        f"unknown partition {text!r}; use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or shards:K"
    )


def _parse_number(param: str, text: str, form: str, kind: type[float] | type[int]) -> float | int:
    """Parse the numeric part of a spec, with an error that shows the expected form."""
    if not param:
        raise SimulationError(f"partition {text!r} needs a parameter: {form}")
    try:
        return kind(param)
    except ValueError:
        message = f"partition {text!r}: {param!r} is not a number; use {form}"
        raise SimulationError(message) from None


def partition_indices(
    labels: np.ndarray, num_devices: int, spec: PartitionSpec, seed: int = 0
) -> list[np.ndarray]:
    """Deal sample indices to devices as a partition spec says, using `edgefl.core.partition`.

    Args:
        labels: (samples,) integer labels of the pool being dealt.
        num_devices: how many devices.
        spec: the partition spec.
        seed: seeds the partition's random generator.

    Returns:
        One index array per device.

    Raises:
        SimulationError: there are fewer samples than devices, or the partition cannot be made.
    """
    from edgefl.core import partition  # the core's partitioners are the one implementation

    labels = np.asarray(labels)
    if num_devices < 1:
        raise SimulationError("a fleet needs at least one device")
    if len(labels) < num_devices:
        raise SimulationError(f"{len(labels)} samples cannot be split across {num_devices} devices")
    rng = np.random.default_rng(seed)
    try:
        if spec.kind == "iid":
            parts = partition.partition_iid(labels, num_devices, rng)
        elif spec.kind == "dirichlet":
            parts = partition.partition_dirichlet(labels, num_devices, spec.alpha, rng)
        else:
            parts = partition.partition_shards(labels, num_devices, spec.shards, rng)
    except ValueError as exc:
        raise SimulationError(f"partition {spec} of {len(labels)} samples failed: {exc}") from exc
    return [np.asarray(part, dtype=np.int64) for part in parts]


@dataclass(frozen=True)
class ChurnEvent:
    """A fraction of the fleet joining late or leaving early.

    "join" devices are offline until round `round` starts; "leave" devices go offline after
    round `round - 1` and do not come back.
    """

    kind: str
    fraction: float
    round: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.fraction:g}@{self.round}"


def parse_churn(text: str) -> list[ChurnEvent]:
    """Parse a churn schedule: comma-separated "join:FRACTION@ROUND" / "leave:FRACTION@ROUND".

    Example: "join:0.2@3,leave:0.1@5" - a fifth of the devices come online at round 3 and a tenth
    of the others go offline from round 5.

    Args:
        text: the schedule; an empty string means no churn.

    Returns:
        The events, in the order given.

    Raises:
        SimulationError: an event is malformed, a fraction is outside (0, 1], a round is below 2,
            or the fractions add up to more than the whole fleet.
    """
    events: list[ChurnEvent] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, rest = item.partition(":")
        fraction_text, _, round_text = rest.partition("@")
        if kind not in CHURN_KINDS or not fraction_text or not round_text:
            raise SimulationError(
                f"churn event {item!r} is malformed; use join:FRACTION@ROUND or "
                "leave:FRACTION@ROUND, e.g. join:0.2@3"
            )
        try:
            fraction, round_ = float(fraction_text), int(round_text)
        except ValueError:
            raise SimulationError(
                f"churn event {item!r}: fraction must be a number and round an integer"
            ) from None
        if not 0 < fraction <= 1:
            raise SimulationError(f"churn event {item!r}: fraction must be in (0, 1]")
        if round_ < 2:
            raise SimulationError(f"churn event {item!r}: round must be 2 or later")
        events.append(ChurnEvent(kind, fraction, round_))
    if sum(event.fraction for event in events) > 1 + 1e-9:
        raise SimulationError(f"churn {text!r}: the fractions add up to more than the whole fleet")
    return events


@dataclass(eq=False)
class SimulatedDevice:
    """One simulated device: its data, how slow it is and when it is around.

    Attributes:
        device_id: its ID on the wire.
        indices: which samples of the pool it holds.
        speed: slowdown factor, >= 1; a device with speed 3 takes three times as long per round.
        dropout: probability that it silently skips a round it was selected for.
        joins_at: first round it is online.
        leaves_at: first round it is offline again; None when it stays to the end.
    """

    device_id: str
    indices: np.ndarray
    speed: float = 1.0
    dropout: float = 0.0
    joins_at: int = 1
    leaves_at: int | None = None

    def online_in(self, round_: int) -> bool:
        """Return whether the device is part of the fleet during a round (1-based)."""
        return self.joins_at <= round_ and (self.leaves_at is None or round_ < self.leaves_at)

    def drops(self, round_: int, seed: int, index: int) -> bool:
        """Return whether the device drops out of a round; the same for the same seed and round.

        Args:
            round_: the round number.
            seed: the simulation's seed.
            index: the device's position in the fleet (part of its random stream).
        """
        if self.dropout <= 0:
            return False
        return bool(np.random.default_rng([seed, index, round_]).random() < self.dropout)


@dataclass
class FleetPlan:
    """The whole simulated fleet, as the runner builds it."""

    devices: list[SimulatedDevice]
    partition: PartitionSpec
    churn: list[ChurnEvent] = field(default_factory=list)
    seed: int = 0

    def online_in(self, round_: int) -> list[SimulatedDevice]:
        """Return the devices online during a round."""
        return [device for device in self.devices if device.online_in(round_)]

    def sample_counts(self) -> list[int]:
        """Return how many samples each device holds, in fleet order."""
        return [len(device.indices) for device in self.devices]


def plan_fleet(
    labels: np.ndarray,
    num_devices: int,
    partition: PartitionSpec | str = "iid",
    *,
    speed_spread: float = 1.0,
    dropout: float = 0.0,
    churn: Sequence[ChurnEvent] | str = (),
    seed: int = 0,
    id_prefix: str = "sim",
) -> FleetPlan:
    """Plan a simulated fleet over a labelled pool.

    Args:
        labels: (samples,) labels of the federated pool.
        num_devices: how many devices.
        partition: a `PartitionSpec` or its text form.
        speed_spread: ratio between the slowest and the fastest device; speeds are drawn
            log-uniformly from [1, speed_spread]. 1 makes every device equally fast.
        dropout: probability that a device skips a round it was selected for.
        churn: join/leave events, or their text form (see `parse_churn`).
        seed: seeds the partition, the speeds and the churn choice.
        id_prefix: device IDs are "{id_prefix}-0000", "{id_prefix}-0001", ...

    Returns:
        The plan.

    Raises:
        SimulationError: an option is out of range or the partition cannot be made.
    """
    spec = parse_partition(partition) if isinstance(partition, str) else partition
    events = parse_churn(churn) if isinstance(churn, str) else list(churn)
    if not (speed_spread >= 1 and math.isfinite(speed_spread)):
        raise SimulationError(f"speed spread must be 1 or more (got {speed_spread})")
    if not 0 <= dropout < 1:
        raise SimulationError(f"dropout must be in [0, 1) (got {dropout})")
    parts = partition_indices(labels, num_devices, spec, seed)
    # A separate stream from the partition's, so changing the spread keeps the data split.
    rng = np.random.default_rng([seed, 1])
    speeds = np.exp(rng.uniform(0.0, math.log(speed_spread), num_devices))
    width = max(4, len(str(num_devices - 1)))
    devices = [
        SimulatedDevice(f"{id_prefix}-{i:0{width}d}", part, float(speed), dropout)
        for i, (part, speed) in enumerate(zip(parts, speeds, strict=True))
    ]
    # Devices for each event come from one permutation, so join and leave sets never overlap.
    order = iter(rng.permutation(num_devices))
    for event in events:
        for _ in range(round(event.fraction * num_devices)):
            device = devices[int(next(order))]
            if event.kind == "join":
                device.joins_at = event.round
            else:
                device.leaves_at = event.round
    return FleetPlan(devices, spec, events, seed)
