"""int8 quantization against the peers: edgefl, onnxruntime's quantize_static defaults, NNCF.

Two models with real accuracy: the built-in digits-cnn, and a residual network with
squeeze-excitation blocks trained here on digits upsampled to 32x32. Each is split as edgefl
splits it; its fp32 backbone is exported to ONNX once, and that one file is quantized by

- edgefl: `quantize_onnx_static` (onnxruntime pre-processing, QDQ, per-channel int8 weights,
  uint8 activations; without the compress pipeline's back-off, which would only add to it),
- ort defaults: `onnxruntime.quantization.quantize_static(fp32, out, reader)` and nothing else,
- nncf: `nncf.quantize(onnx_model, nncf.Dataset(...))` with its defaults (when NNCF imports;
  otherwise its rows say why they are missing),

all calibrated on the same 256 training samples. Each int8 backbone runs in onnxruntime on the
held-out test split; the fp32 head (numpy, as on a board) turns its features into predictions.
Latency: one sample, median over round-robin calls (so load from other processes hits every
variant alike), one thread by default.

    .venv/bin/python benchmarks/quantize_peers.py            # about a minute
    .venv/bin/python benchmarks/quantize_peers.py --models digits-cnn --repeats 200

Prints a table and writes benchmarks/out/quantize_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# NNCF's telemetry would try the network; it stays off when NNCF believes it runs in CI.
os.environ.setdefault("NNCF_CI", "1")

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from edgefl.compression.export import export_onnx
from edgefl.compression.quantize import quantize_onnx_static
from edgefl.data import Dataset, holdout_split, load_digits
from edgefl.head import head_forward
from edgefl.models.loading import resolve_model
from edgefl.models.split import SplitModel, split_model
from edgefl.runtime import load_backbone

OUT = Path(__file__).resolve().parent / "out" / "quantize_peers.json"
MODELS = ("digits-cnn", "se-resnet-32")
CALIBRATION = 256


@dataclass
class Row:
    """One quantized (or fp32) backbone of one model."""

    model: str
    method: str
    accuracy: float | None
    drop_points: float | None
    size_bytes: int | None
    latency_ms: float | None
    seconds: float | None  # time to quantize
    note: str = ""


class SEBlock(nn.Module):
    """A residual block with squeeze-excitation: conv-bn-relu-conv-bn, channels re-weighted."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
            nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(out, out // 4, 1), nn.ReLU(),
            nn.Conv2d(out // 4, out, 1), nn.Sigmoid(),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and inp == out
            else nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.relu(y * self.se(y) + self.skip(x))


def se_resnet() -> nn.Module:
    """A small SE-ResNet for 1x32x32 inputs and 10 classes, head `fc`."""
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False),
                                           nn.BatchNorm2d(16), nn.ReLU()))  # fmt: skip
    model.add_module("blocks", nn.Sequential(SEBlock(16, 16, 1), SEBlock(16, 32, 2),
                                             SEBlock(32, 64, 2)))  # fmt: skip
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(64, 10))
    return model


def upsampled(data: Dataset, size: int = 32) -> Dataset:
    """Digits resized to size x size (bilinear), as float32 model inputs."""
    x = torch.from_numpy(data.X)
    big = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return Dataset(big.numpy().astype(np.float32), data.y, data.labels)


def train(model: nn.Module, data: Dataset, epochs: int, seed: int = 0) -> nn.Module:
    """Adam (cosine-annealed), batch 64, cross-entropy: the SE-ResNet learns digits (~98%)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Annealed to zero: the last epochs settle the weights and BatchNorm's running statistics,
    # so fp32 accuracy is the model's, not one noisy step's.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    x, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def workload(name: str, epochs: int) -> tuple[SplitModel, Dataset, Dataset]:
    """The model split as edgefl splits it, with its training and test sets."""
    digits = load_digits()
    train_set, test_set = holdout_split(digits, seed=0)
    if name == "digits-cnn":
        model = resolve_model("digits-cnn").module
    else:
        train_set, test_set = upsampled(train_set), upsampled(test_set)
        torch.manual_seed(0)  # the initial weights too: one run's numbers are the next run's
        model = train(se_resnet(), train_set, epochs)
    example = torch.from_numpy(train_set.X[:2])
    return (
        split_model(model, None, example, torch.from_numpy(train_set.X[:64])),
        train_set,
        test_set,
    )


def quantize_ort_defaults(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """onnxruntime's quantize_static with every default: what a user gets from the docs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    name = onnx.load(str(src)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader())


def quantize_nncf(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """NNCF's post-training quantization of the ONNX model, its defaults, the same samples."""
    import nncf
    import onnx

    model = onnx.load(str(src))
    name = model.graph.input[0].name
    dataset = nncf.Dataset(
        [calibration[i : i + 1] for i in range(len(calibration))], lambda x: {name: x}
    )
    onnx.save(nncf.quantize(model, dataset, subset_size=len(calibration)), str(dst))


def latencies(paths: dict[str, Path], sample: np.ndarray, threads: int, repeats: int) -> dict:
    """Median ms per one-sample call of each model, timed round-robin."""
    runners = {key: load_backbone(path, threads=threads) for key, path in paths.items()}
    times: dict[str, list[float]] = {key: [] for key in runners}
    for runner in runners.values():
        for _ in range(10):
            runner.run(sample)
    for _ in range(repeats):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.run(sample)
            times[key].append(time.perf_counter() - start)
    return {key: 1000.0 * statistics.median(values) for key, values in times.items()}


def bench_model(name: str, args: argparse.Namespace, folder: Path, console: Console) -> list[Row]:
    """Every method on one model: accuracy, drop against fp32, size, latency, time taken."""
    console.log(f"{name}: preparing the model")
    split, train_set, test_set = workload(name, args.epochs)
    layers, weights = split.head_layers(), split.head_weights()
    fp32 = export_onnx(split.backbone, torch.from_numpy(train_set.X[:1]), folder / f"{name}.onnx")
    calibration = train_set.X[:CALIBRATION]
    methods = {
        "edgefl": lambda src, dst: quantize_onnx_static(src, dst, calibration),
        "ort defaults": lambda src, dst: quantize_ort_defaults(src, dst, calibration),
        "nncf": lambda src, dst: quantize_nncf(src, dst, calibration),
    }
    paths = {"fp32": fp32}
    seconds: dict[str, float] = {}
    notes: dict[str, str] = {}
    for method, quantize in methods.items():
        dst = folder / f"{name}-{method.replace(' ', '-')}.onnx"
        console.log(f"{name}: quantizing with {method}")
        start = time.perf_counter()
        try:
            quantize(fp32, dst)
        except ImportError as exc:
            notes[method] = f"not installed: {exc}"
            continue
        except Exception as exc:  # a peer failing on a model is a result, not a crash
            notes[method] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        seconds[method] = time.perf_counter() - start
        paths[method] = dst
    scores = {
        key: float(
            (
                head_forward(layers, weights, load_backbone(path).run(test_set.X)).argmax(1)
                == test_set.y
            ).mean()
        )
        for key, path in paths.items()
    }
    console.log(f"{name}: timing {len(paths)} models ({args.threads} thread(s))")
    timing = latencies(paths, test_set.X[:1], args.threads, args.repeats)
    rows = []
    for method in ("fp32", *methods):
        if method not in paths:
            rows.append(Row(name, method, None, None, None, None, None, notes.get(method, "")))
            continue
        rows.append(
            Row(
                model=name,
                method=method,
                accuracy=round(scores[method], 4),
                drop_points=round(100 * (scores["fp32"] - scores[method]), 2),
                size_bytes=paths[method].stat().st_size,
                latency_ms=round(timing[method], 4),
                seconds=round(seconds[method], 2) if method in seconds else None,
                note=f"{len(test_set.y)} test samples",
            )
        )
    return rows


def render(rows: list[Row], console: Console) -> None:
    table = Table(
        title="int8 ONNX: edgefl against onnxruntime defaults and NNCF",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("model", "method", "acc %", "drop", "kB", "ms", "x fp32", "quant s"):
        left = column in ("model", "method")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    fp32 = {r.model: r for r in rows if r.method == "fp32"}
    for r in rows:
        base = fp32[r.model].latency_ms
        if r.accuracy is None:
            table.add_row(r.model, r.method, "-", "-", "-", "-", "-", r.note[:40])
            continue
        table.add_row(
            r.model,
            r.method,
            f"{100 * r.accuracy:.2f}",
            f"{r.drop_points:.2f}" if r.method != "fp32" else "-",
            f"{(r.size_bytes or 0) / 1000:.1f}",
            f"{r.latency_ms:.4f}",
            f"{(r.latency_ms or 0) / base:.2f}" if base else "-",
            "-" if r.seconds is None else f"{r.seconds:.1f}",
        )
    console.print(table)
    console.print("drop: accuracy points lost against fp32 (negative: gained)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10, help="SE-ResNet training epochs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    console = Console()
    torch.set_num_threads(max(1, args.threads))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgefl-peers-") as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp), console)
    render(rows, console)
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("onnxruntime", "nncf"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "threads": args.threads, "repeats": args.repeats, "calibration_samples": CALIBRATION,
        "versions": versions, "rows": [asdict(r) for r in rows],
    }, indent=2))  # fmt: skip
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
