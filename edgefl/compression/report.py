"""The compression report: per stage size, MACs, latency, accuracy, agreement; and the back-off log.

Written to the bundle as report.json and printed as a rich table. Latency is always measured
here, in the runtime named in the row, with the thread count stated; never assumed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from safetensors.torch import save
from torch import nn

from edgefl.compression.prune import PruningPlan

REPORT_SCHEMA_VERSION = 1
_RUNTIME_SHORT = {"onnxruntime": "ort"}


@dataclass
class StageReport:
    """One stage: the torch model after a step, or one exported artifact in its runtime."""

    stage: str
    runtime: str
    precision: str
    threads: int
    size_bytes: int
    latency_ms: float | None = None
    params: int | None = None
    macs: int | None = None
    accuracy: float | None = None
    max_error: float | None = None
    relative_error: float | None = None  # max_error over the features' max magnitude
    top1_agreement: float | None = None
    file: str | None = None
    at_chance: bool = False  # accuracy no better than guessing (see compression.chance)


@dataclass
class BackoffAttempt:
    """One try of the accuracy-aware search: what was set, the drop it gave (points lost; negative
    is a gain), whether it was kept, and what it measured (None where it was not measured)."""

    step: str
    setting: str
    accuracy_drop: float | None
    kept: bool
    accuracy: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    reason: str = ""  # why a try was not measured, e.g. the verification it failed


@dataclass
class CompressionReport:
    """Everything `edgefl compress` measured; `accuracy_drop` values are in accuracy points."""

    model: str
    recipe: str
    train_samples: int
    test_samples: int
    stages: list[StageReport] = field(default_factory=list)
    backoff: list[BackoffAttempt] = field(default_factory=list)
    pruning: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # The accuracy at or below which a stage is flagged `at_chance`; None until checked.
    chance_accuracy: float | None = None
    # What the accuracies were measured on: `eval_data`, or a share held out of the training data.
    evaluation: str = ""
    # The recipe's metric ("top-1", "top-K", "within-N"): what `accuracy`, the drops, the chance
    # level and `top1_agreement` (the agreement with PyTorch under this metric) measure.
    metric: str = "top-1"
    # False when `best_effort` kept a try beyond max_accuracy_drop (the CLI then exits 1).
    within_budget: bool = True
    # Accuracy points lost pruning each layer alone at the recipe's ratio, most sensitive first
    # (measured only when the back-off needed it).
    pruning_sensitivity: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    schema_version: int = REPORT_SCHEMA_VERSION

    def stage(self, name: str) -> StageReport:
        """Return the stage called `name`.

        Raises:
            KeyError: no such stage.
        """
        for stage in self.stages:
            if stage.stage == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-able data."""
        return asdict(self)


def state_size_bytes(model: nn.Module) -> int:
    """Return the size of the model's weights serialized as fp32 safetensors."""
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def torch_latency_ms(
    model: nn.Module, sample: np.ndarray, threads: int, repeats: int = 30
) -> float:
    """Return the median eager latency (ms) of one sample, with torch limited to `threads`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(np.ascontiguousarray(sample[:1], dtype=np.float32))
        model.eval()
        timings = []
        with torch.no_grad():
            for i in range(repeats + 3):
                start = time.perf_counter()
                model(x)
                if i >= 3:  # the first calls allocate; they are not what a board sees
                    timings.append(time.perf_counter() - start)
        return statistics.median(timings) * 1000.0
    finally:
        torch.set_num_threads(previous)


def render_report(report: CompressionReport, console: Console) -> None:
    """Print the stages as a table, then the back-off log if anything was retried."""
    threads = sorted({s.threads for s in report.stages})
    table = Table(
        title=f"edgefl compress: {report.model}, recipe {report.recipe}, "
        f"latency on {'/'.join(map(str, threads))} thread(s)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # Short headers and cells: the table must fit an 80-column terminal without wrapping.
    for column in (
        "stage",
        "runtime",
        "params",
        "MACs",
        "size",
        "ms",
        "acc %",
        "rel err",
        "top1 %" if report.metric == "top-1" else "agr %",
    ):
        left = column in ("stage", "runtime")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for s in report.stages:
        table.add_row(
            s.stage,
            _RUNTIME_SHORT.get(s.runtime, s.runtime),
            _count(s.params),
            _count(s.macs),
            _bytes(s.size_bytes),
            "-" if s.latency_ms is None else f"{s.latency_ms:.3f}",
            "-" if s.accuracy is None else f"{100 * s.accuracy:.2f}" + ("!" if s.at_chance else ""),
            "-" if s.relative_error is None else f"{s.relative_error:.1e}",
            "-" if s.top1_agreement is None else f"{100 * s.top1_agreement:.1f}",
        )
    console.print(table)
    if report.evaluation:
        what = "accuracy" if report.metric == "top-1" else f"{report.metric} accuracy"
        console.print(f"{what} on {report.evaluation}", markup=False, highlight=False)
    if report.metric != "top-1":
        console.print(f"agr %: the artifact's predictions scored {report.metric} against PyTorch's")
    if any(s.at_chance for s in report.stages) and report.chance_accuracy is not None:
        console.print(
            f"! at chance accuracy (<= {100 * report.chance_accuracy:.1f}%): no better than "
            "guessing"
        )
    if any(not a.kept for a in report.backoff):
        log = Table(title="accuracy back-off (change in points against the original)")
        for column in ("step", "setting", "acc %", "change", "size", "ms", "kept"):
            log.add_column(column, overflow="fold")
        for a in report.backoff:
            log.add_row(
                a.step,
                a.setting + (f" ({a.reason})" if a.reason else ""),
                "-" if a.accuracy is None else f"{100 * a.accuracy:.2f}",
                "-" if a.accuracy_drop is None else f"{0.0 - a.accuracy_drop:+.2f}",
                "-" if a.size_bytes is None else _bytes(a.size_bytes),
                "-" if a.latency_ms is None else f"{a.latency_ms:.3f}",
                "yes" if a.kept else "no",
            )
        console.print(log)
    if not report.within_budget:
        console.print("best effort: the bundle misses max_accuracy_drop (see the back-off)")


def render_plan(plan: PruningPlan | None, artifacts: list[str], console: Console) -> None:
    """Print what a run would do (`--dry-run`): layers pruned, MACs and params, artifacts."""
    if plan is None:
        console.print("pruning: none (the recipe has no [prune] step)")
    else:
        table = Table(title=f"pruning plan: ratio {plan.ratio}, importance {plan.importance}")
        for column in ("layer", "kind", "channels before", "channels after"):
            table.add_column(column)
        for change in plan.layers:
            table.add_row(change.name, change.kind, str(change.before), str(change.after))
        console.print(table)
        console.print(
            f"params {plan.params_before:,} -> {plan.params_after:,} "
            f"(-{100 * plan.params_removed:.1f}%), MACs {plan.macs_before:,} -> "
            f"{plan.macs_after:,} (-{100 * plan.macs_removed:.1f}%)"
        )
    console.print("artifacts: " + ", ".join(artifacts))
    console.print("dry run: nothing was written")


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value} B"
