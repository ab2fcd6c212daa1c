"""The PNG plot of a simulation: global (and personalized) accuracy and bytes per round."""

from __future__ import annotations

import math
from pathlib import Path

from edgefl.simulation.metrics import SimulationMetrics

PLOT_FILE = "metrics.png"


def plot_metrics(metrics: SimulationMetrics, path: str | Path) -> Path:
    """Draw accuracy (top) and update bytes (bottom) per round into a PNG file.

    Args:
        metrics: the run's metrics; a run without rounds gives empty axes.
        path: the PNG file to write (its directory is created when missing).

    Returns:
        The path written.
    """
    # Agg: no display on servers and CI, and importing pyplot must not try to open one.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rounds = [r.round for r in metrics.rounds]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    try:
        top.plot(
            rounds, [r.accuracy for r in metrics.rounds], marker="o", label="global head, test set"
        )
        on_devices = [
            ([r.device_accuracy for r in metrics.rounds], "^", "global head on devices' data"),
            ([r.personal_accuracy for r in metrics.rounds], "s", "personalized heads"),
        ]
        for values, marker, label in on_devices:
            if any(not math.isnan(v) for v in values):
                top.plot(rounds, values, marker=marker, linestyle="--", label=label)
        top.set_ylabel("accuracy")
        top.set_ylim(0.0, 1.0)
        top.grid(alpha=0.3)
        top.legend(loc="lower right")
        title = metrics.config.get("title") or "edgefl simulation"
        top.set_title(str(title))
        bottom.bar(rounds, [r.bytes_up / 1024 for r in metrics.rounds], label="updates (up)")
        bottom.plot(
            rounds,
            [r.bytes_down / 1024 for r in metrics.rounds],
            "k--",
            marker=".",
            label="tasks (down)",
        )
        bottom.set_xlabel("round")
        bottom.set_ylabel("KiB per round")
        bottom.grid(alpha=0.3)
        bottom.legend(loc="lower right", framealpha=0.9)
        figure.tight_layout()
        figure.savefig(target, dpi=100)
    finally:
        plt.close(figure)
    return target
