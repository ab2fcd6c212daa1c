"""What `edgefl tune` shows and writes: the Pareto table, `pareto.json` and `pareto.png`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from edgefl.compression.tune import TrialResult, TuneResult


def describe_trial(trial: TrialResult) -> str:
    """One line per trial: its number, settings and measurements."""
    p = trial.params
    return (
        f"trial {trial.number}: prune {p.get('prune_ratio', 0):g} ({p.get('importance')}), "
        f"distill {p.get('distill_epochs')} epochs at T={p.get('temperature'):g}, "
        f"{p.get('precision')} -> {100 * trial.accuracy:.2f}% ({0.0 - trial.accuracy_drop:+.2f} "
        f"points), {trial.latency_ms:.3f} ms, {trial.size_kb:.1f} kB"
        + ("" if trial.feasible else " (outside the budgets)")
        + (" [baseline: the base recipe]" if trial.baseline else "")
    )


def render_pareto(result: TuneResult, console: Console) -> None:
    """Print the front (feasible trials no other beats on every objective), the baseline below."""
    table = Table(
        title=f"edgefl tune: Pareto front of {len(result.trials)} trials",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("#", "prune", "imp", "KD ep", "T", "precision", "acc %", "change", "ms",
                   "kB", "speed-up"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("imp", "precision") else "right")
    rows = list(result.pareto)
    if result.baseline is not None and result.baseline not in rows:
        rows.append(result.baseline)
    for trial in rows:
        p = trial.params
        speedup = (
            f"{_latency(result.baseline) / _latency(trial):.2f}x"
            if result.baseline is not None and _latency(trial) > 0
            else "-"
        )
        mark = "*" if trial is result.chosen else ("b" if trial.baseline else "")
        table.add_row(
            f"{trial.number}{mark}",
            f"{p.get('prune_ratio', 0):g}",
            str(p.get("importance")),
            str(p.get("distill_epochs")),
            f"{p.get('temperature', 0):g}",
            str(p.get("precision")),
            f"{100 * trial.accuracy:.2f}",
            f"{0.0 - trial.accuracy_drop:+.2f}",
            f"{_latency(trial):.3f}",
            f"{trial.size_kb:.1f}",
            speedup,
        )
    console.print(table)
    if result.ensemble is not None:
        e = result.ensemble
        console.print(
            f"no single trial fits; an ensemble of trials {' + '.join(map(str, e['trials']))} "
            f"does: {100 * e['accuracy']:.2f}% ({0.0 - e['accuracy_drop']:+.2f} points), "
            f"{e['latency_ms']:.3f} ms run one after the other, {e['size_kb']:.1f} kB "
            "(proposed only: a bundle holds one backbone)"
        )
    baseline = result.baseline
    where = "" if baseline is None or baseline.pareto else ", not on the front"
    console.print(f"* chosen (fastest on the front), b baseline (the base recipe's setting"
                  f"{where}); change in points against the original model")  # fmt: skip
    if any(t.retimed_ms is not None for t in rows):
        console.print("ms: re-timed after the search, these rows side by side")


def _latency(trial: TrialResult) -> float:
    return trial.retimed_ms if trial.retimed_ms is not None else trial.latency_ms


def write_outputs(result: TuneResult, out: Path) -> None:
    """Write `pareto.json` (every trial, the front, the choice, the budgets) and `pareto.png`."""
    data = {
        "study": result.study,
        "budgets": result.budgets,
        "chosen": result.chosen.number if result.chosen is not None else None,
        "baseline": result.baseline.number if result.baseline is not None else None,
        "pareto": [t.number for t in result.pareto],
        "ensemble": result.ensemble,
        "trials": [asdict(t) for t in result.trials],
    }
    (out / "pareto.json").write_text(json.dumps(data, indent=2))
    _plot(result, out / "pareto.png")


def _plot(result: TuneResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    others = [t for t in result.trials if not t.pareto]
    for trials, style, label in (
        ([t for t in others if not t.feasible], dict(c="lightgray", marker="x"), "outside budgets"),
        ([t for t in others if t.feasible], dict(c="tab:blue", marker="o", alpha=0.5), "feasible"),
        (result.pareto, dict(c="tab:red", marker="o"), "Pareto front"),
    ):
        if trials:
            axes.scatter(
                [t.latency_ms for t in trials],
                [100 * t.accuracy for t in trials],
                s=[20 + t.size_kb for t in trials],
                label=label,
                **style,
            )
    for trial, text in ((result.baseline, "baseline"), (result.chosen, "chosen")):
        if trial is not None:
            axes.annotate(text, (trial.latency_ms, 100 * trial.accuracy),
                          textcoords="offset points", xytext=(6, 6))  # fmt: skip
    latency = result.budgets.get("max_latency_ms")
    if latency is not None:
        axes.axvline(latency, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel("latency in the board's runtime (ms)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("edgefl tune: accuracy against latency (marker area: size)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
