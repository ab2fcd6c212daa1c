"""Split a labelled dataset across simulated devices: IID, Dirichlet label skew, or label shards."""

from __future__ import annotations

import numpy as np


def _check(labels: np.ndarray, num_devices: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {list(y.shape)}")
    if num_devices < 1:
        raise ValueError(f"number of devices must be >= 1, got {num_devices}")
    if num_devices > len(y):
        raise ValueError(f"cannot split {len(y)} samples across {num_devices} devices")
    return y


def partition_iid(
    labels: np.ndarray, num_devices: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle the samples and deal them into near-equal parts.

    Args:
        labels: (n,) labels (only their count matters here).
        num_devices: how many parts, 1 <= num_devices <= n.
        rng: the random generator.

    Returns:
        One sorted int64 index array per device; together they cover every sample once.

    Raises:
        ValueError: labels not 1-D or num_devices out of range.
    """
    y = _check(labels, num_devices)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), num_devices)]


def partition_dirichlet(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among devices in Dirichlet(alpha) proportions.

    Small alpha (0.1) gives devices few classes; large alpha (100) approaches IID. The draw is
    repeated until every device holds at least `min_size` samples, as FedLab and Flower do, so a
    simulated device is never empty.

    Args:
        labels: (n,) class labels.
        num_devices: how many parts, 1 <= num_devices <= n.
        alpha: Dirichlet concentration, > 0.
        rng: the random generator.
        min_size: the fewest samples a device may get.
        max_attempts: draws tried before giving up.

    Returns:
        One sorted int64 index array per device; together they cover every sample once.

    Raises:
        ValueError: bad arguments, or no draw in `max_attempts` gives every device `min_size`.
    """
    y = _check(labels, num_devices)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_devices > len(y):
        raise ValueError(f"{len(y)} samples cannot give {num_devices} devices {min_size} each")
    classes = np.unique(y)
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(y == label))
            shares = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].append(chunk)
        result = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
        if min(len(part) for part in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet({alpha}) split gave each of {num_devices} devices {min_size} samples "
        f"in {max_attempts} attempts; use fewer devices or a larger alpha"
    )


def partition_shards(
    labels: np.ndarray, num_devices: int, shards_per_device: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut into shards, deal.

    Args:
        labels: (n,) class labels.
        num_devices: how many parts.
        shards_per_device: shards each device gets (each device sees about that many classes).
        rng: the random generator.

    Returns:
        One sorted int64 index array per device; together they cover every sample once.

    Raises:
        ValueError: bad arguments, or fewer samples than shards.
    """
    y = _check(labels, num_devices)
    if shards_per_device < 1:
        raise ValueError(f"shards_per_device must be >= 1, got {shards_per_device}")
    count = num_devices * shards_per_device
    if count > len(y):
        raise ValueError(f"cannot cut {len(y)} samples into {count} shards")
    # A stable sort on a shuffled order breaks ties randomly within a class.
    shuffled = rng.permutation(len(y))
    ordered = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(ordered, count)
    deal = rng.permutation(count).reshape(num_devices, shards_per_device)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in deal]
