"""Compression benchmark: size, latency and accuracy of each artifact kind, per built-in model.

For resnet18, mobilenet-v2 and digits-cnn it builds each model and measures, in one run and with
the same thread count: fp32 torch eager, fp32 ONNX, int8 ONNX (static, QDQ, per-channel),
50%-channel-pruned + int8 ONNX (digits-cnn: pruned + distilled), int8 TFLite and pruned + int8
TFLite. Ratios are against fp32 ONNX; latencies are timed round-robin so load from other
processes hits every variant alike. The whole model (backbone + head) is measured, as in
DESIGN.md's facts. Accuracy (digits-cnn only) is top-1 on the held-out digits test split.

    .venv/bin/python benchmarks/compress.py                      # everything (minutes)
    .venv/bin/python benchmarks/compress.py --models digits-cnn --skip-tflite   # seconds

Prints a table and writes benchmarks/out/compress.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgefl.compression.distill import distill
from edgefl.compression.export import export_onnx, export_tflite
from edgefl.compression.prune import apply_pruning, count_macs_params
from edgefl.compression.quantize import quantize_onnx_static
from edgefl.compression.recipe import DistillStep, PruneStep
from edgefl.compression.report import state_size_bytes
from edgefl.data import Dataset, holdout_split, load_digits
from edgefl.models.loading import resolve_model
from edgefl.models.split import split_model
from edgefl.runtime import load_backbone

MODELS = ("resnet18", "mobilenet-v2", "digits-cnn")
OUT = Path(__file__).resolve().parent / "out" / "compress.json"


@dataclass
class Row:
    """One measured artifact."""

    model: str
    variant: str
    size_bytes: int
    latency_ms: float
    macs: int
    accuracy: float | None = None
    size_ratio: float | None = None
    latency_ratio: float | None = None
    seconds_to_build: float = 0.0


@dataclass
class Workload:
    """The data one model is calibrated and evaluated on; test and train data only for digits."""

    calibration: np.ndarray
    sample: np.ndarray
    test_X: np.ndarray | None = None
    test_y: np.ndarray | None = None
    train: Dataset | None = None


def workload(name: str, input_shape: list[int]) -> Workload:
    """Digits for digits-cnn; deterministic normalised noise for the ImageNet architectures."""
    if name.startswith("digits"):
        train, test = holdout_split(load_digits())
        return Workload(train.X[:256], test.X[:1], test.X, test.y, train)
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(32, *input_shape)).astype(np.float32)
    return Workload(calibration, calibration[:1])


def timed(build: Callable[[], Path]) -> tuple[Path, float]:
    """Run `build` and return what it wrote with the seconds it took."""
    start = time.perf_counter()
    path = build()
    return path, time.perf_counter() - start


def accuracy(logits: np.ndarray | None, work: Workload) -> float | None:
    """Return top-1 accuracy of `logits` on the workload's test labels; None without either."""
    if logits is None or work.test_y is None:
        return None
    return float((logits.argmax(axis=1) == work.test_y).mean())


def interleaved_latency(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 5
) -> dict[str, float]:
    """Median ms per call of each run, timed round-robin.

    Other work on a shared machine slows every variant alike when their timings interleave, so
    the ratios stay fair even when the absolute numbers drift.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    timings: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            timings[label].append(time.perf_counter() - start)
    return {label: float(np.median(values) * 1000.0) for label, values in timings.items()}


def bench_model(name: str, args: argparse.Namespace, folder: Path, console: Console) -> list[Row]:
    """Build every variant of one model and measure them.

    The whole model (backbone + head) is measured, as in DESIGN.md's facts; a bundle ships the
    backbone and the head separately, and the head is a small share of the weights.
    """
    loaded = resolve_model(name)
    assert loaded.input_shape is not None
    example = torch.zeros(1, *loaded.input_shape)
    model = split_model(loaded.module, loaded.head, example)
    work = workload(name, loaded.input_shape)
    macs, _ = count_macs_params(model, example)

    console.log(f"{name}: exporting fp32 and int8 ONNX")
    fp32, fp32_s = timed(lambda: export_onnx(model, example, folder / f"{name}.onnx"))
    int8, int8_s = timed(
        lambda: quantize_onnx_static(
            fp32, folder / f"{name}-int8.onnx", work.calibration, activation_type=args.activation
        )
    )

    console.log(f"{name}: pruning {args.prune_ratio:.0%} of channels")
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    # keep_features=False: half of every layer's channels, the ones feeding the head included.
    apply_pruning(pruned, example, PruneStep(ratio=args.prune_ratio, keep_features=False))
    variant = f"pruned {args.prune_ratio:.0%} + int8 ONNX"
    if work.train is not None and not args.no_distill:
        distill(pruned, model, work.train, DistillStep())
        variant = f"pruned {args.prune_ratio:.0%} + distilled + int8 ONNX"
    pruned_macs, _ = count_macs_params(pruned, example)
    pruned_fp32 = export_onnx(pruned, example, folder / f"{name}-pruned.onnx")
    pruned_int8 = quantize_onnx_static(
        pruned_fp32,
        folder / f"{name}-pruned-int8.onnx",
        work.calibration,
        activation_type=args.activation,
    )
    pruned_s = time.perf_counter() - start

    artifacts: list[tuple[str, Path, float, int]] = [
        ("fp32 ONNX", fp32, fp32_s, macs),
        ("int8 ONNX", int8, int8_s, macs),
        (variant, pruned_int8, pruned_s, pruned_macs),
    ]
    if not args.skip_tflite:
        console.log(f"{name}: converting to int8 TFLite (slow)")
        tflite, tflite_s = timed(
            lambda: export_tflite(
                model,
                example,
                folder / f"{name}-int8.tflite",
                calibration=work.calibration[: args.tflite_calibration],
            )
        )
        artifacts.append(("int8 TFLite", tflite, tflite_s, macs))
        pruned_tflite, pruned_tflite_s = timed(
            lambda: export_tflite(
                pruned,
                example,
                folder / f"{name}-pruned-int8.tflite",
                calibration=work.calibration[: args.tflite_calibration],
            )
        )
        artifacts.append(
            (variant.replace("ONNX", "TFLite"), pruned_tflite, pruned_tflite_s, pruned_macs)
        )

    console.log(f"{name}: measuring latency ({args.threads} thread(s), {args.repeats} repeats)")
    sample_tensor = torch.from_numpy(work.sample)
    runners = {label: load_backbone(path, threads=args.threads) for label, path, *_ in artifacts}

    def eager() -> object:
        with torch.no_grad():
            return model(sample_tensor)

    runs: dict[str, Callable[[], object]] = {"fp32 torch eager": eager}
    for label, runner in runners.items():
        runs[label] = functools.partial(runner.run, work.sample)
    latency = interleaved_latency(runs, args.repeats)

    eager_logits = None
    if work.test_X is not None:
        with torch.no_grad():
            eager_logits = model(torch.from_numpy(work.test_X)).numpy()
    rows = [
        Row(
            name,
            "fp32 torch eager",
            state_size_bytes(model),
            latency["fp32 torch eager"],
            macs,
            accuracy(eager_logits, work),
        )
    ]
    for label, path, seconds, variant_macs in artifacts:
        logits = runners[label].run(work.test_X) if work.test_X is not None else None
        rows.append(
            Row(
                name,
                label,
                path.stat().st_size,
                latency[label],
                variant_macs,
                accuracy(logits, work),
                seconds_to_build=seconds,
            )
        )
    base = next(row for row in rows if row.variant == "fp32 ONNX")
    for row in rows:
        row.size_ratio = row.size_bytes / base.size_bytes
        row.latency_ratio = row.latency_ms / base.latency_ms
    return rows


def check_targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""

    def find(model: str, prefix: str) -> Row | None:
        return next((r for r in rows if r.model == model and r.variant.startswith(prefix)), None)

    checks: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, below: bool = True) -> None:
        if value is None:
            return
        met = value <= limit if below else value >= limit
        checks.append({"target": target, "value": round(value, 4), "limit": limit, "met": met})

    for model in ("resnet18", "mobilenet-v2"):
        int8 = find(model, "int8 ONNX")
        add(f"{model}: int8 ONNX size <= 0.27x fp32", int8.size_ratio if int8 else None, 0.27)
    int8 = find("resnet18", "int8 ONNX")
    add("resnet18: int8 ONNX latency <= 0.4x fp32", int8.latency_ratio if int8 else None, 0.4)
    pruned = find("resnet18", "pruned")
    if pruned is not None and pruned.size_ratio:
        add("resnet18: pruned + int8 latency <= 0.15x fp32", pruned.latency_ratio, 0.15)
        add("resnet18: pruned + int8 >= 10x smaller", 1 / pruned.size_ratio, 10.0, below=False)
    eager = find("digits-cnn", "fp32 torch")
    if eager is not None and eager.accuracy is not None:
        for row in rows:
            if row.model == "digits-cnn" and "int8" in row.variant and row.accuracy is not None:
                drop = (eager.accuracy - row.accuracy) * 100
                add(f"digits-cnn: {row.variant} accuracy drop <= 1.0 point", drop, 1.0)
    return checks


def render(rows: list[Row], checks: list[dict[str, Any]], console: Console, threads: int) -> None:
    table = Table(title=f"edgefl compression benchmark ({threads} thread(s), median latency)")
    for column in ("model", "variant", "size", "× size", "latency ms", "× latency", "MMACs"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    table.add_column("accuracy", justify="right")
    for row in rows:
        table.add_row(
            row.model,
            row.variant,
            f"{row.size_bytes / 1e6:.2f} MB",
            f"{row.size_ratio:.3f}",
            f"{row.latency_ms:.3f}",
            f"{row.latency_ratio:.3f}",
            f"{row.macs / 1e6:.1f}",
            "" if row.accuracy is None else f"{row.accuracy:.4f}",
        )
    console.print(table)
    for check in checks:
        mark = "met" if check["met"] else "NOT met"
        console.print(f"{mark:>7}  {check['target']}: {check['value']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}"
    )
    parser.add_argument("--skip-tflite", action="store_true", help="skip the slow TFLite rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--no-distill", action="store_true", help="prune digits-cnn without KD")
    parser.add_argument("--activation", choices=("int8", "uint8"), default="uint8")
    parser.add_argument("--tflite-calibration", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-") as tmpdir:
        for name in args.models.split(","):
            rows.extend(bench_model(name, args, Path(tmpdir), console))
    checks = check_targets(rows)
    render(rows, checks, console, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "threads": args.threads,
        "activation_type": args.activation,
        "rows": [asdict(row) for row in rows],
        "targets": checks,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
