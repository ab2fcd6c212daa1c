"""Update codecs: bytes per update and final FL-digits accuracy per codec, in one process.

Runs the FL-digits workload of DESIGN.md with the core's own functions (train_head, encode_delta,
decode_delta, FedAvg) and no transport, so the only thing that differs between rows is the codec.

    .venv/bin/python benchmarks/codecs.py [--devices 10 100] [--rounds 10] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgefl.core.codecs import ErrorFeedback, decode_delta, encode_delta
from edgefl.core.partition import partition_dirichlet
from edgefl.core.strategies import make_strategy
from edgefl.core.training import TrainConfig, train_head
from edgefl.data import fl_digits_split
from edgefl.head import head_accuracy, init_head
from edgefl.models import load_model

# (label, codec, error feedback)
VARIANTS = [
    ("float32", "float32", False),
    ("int8", "int8", False),
    ("topk 1% + EF", "topk", True),
    ("topk 1% no EF", "topk", False),
]


def _median_us(call: Callable[[], object], repeats: int = 7, number: int = 200) -> float:
    """Median over `repeats` of the mean time of `number` calls, in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - start) / number)
    return 1e6 * float(np.median(times))


def wire_sizes() -> list[dict[str, Any]]:
    """Bytes of one encoded update per codec for a 64x10 and a 1280x10 head."""
    rng = np.random.default_rng(0)
    rows = []
    for in_features in (64, 1280):
        delta = {
            "0.weight": rng.normal(0, 0.01, (10, in_features)).astype(np.float32),
            "0.bias": rng.normal(0, 0.01, 10).astype(np.float32),
        }
        encoded = {codec: encode_delta(delta, codec) for codec in ("float32", "int8", "topk")}
        sizes = {codec: len(data) for codec, data in encoded.items()}
        params = 10 * in_features + 10
        k = max(1, round(0.01 * 10 * in_features)) + 1
        payload = {"float32": 4 * params, "int8": params + 8, "topk": 6 * k}
        for codec, size in sizes.items():
            rows.append(
                {
                    "head": f"{in_features}x10",
                    "codec": codec,
                    "bytes": size,
                    "ratio": size / sizes["float32"],
                    "payload_bytes": payload[codec],
                    "header_bytes": size - payload[codec],
                    "encode_us": _median_us(lambda c=codec, d=delta: encode_delta(d, c)),
                    "decode_us": _median_us(lambda b=encoded[codec]: decode_delta(b)),
                }
            )
    return rows


def digits_features() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Pool and test features of the frozen pretrained digits-mlp backbone."""
    model = load_model("digits-mlp")
    _, (x_pool, y_pool), (x_test, y_test) = fl_digits_split()
    with torch.no_grad():
        f_pool = model.backbone(torch.from_numpy(x_pool)).numpy()
        f_test = model.backbone(torch.from_numpy(x_test)).numpy()
    return (f_pool, y_pool), (f_test, y_test)


def federate(
    pool: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    devices: int,
    rounds: int,
    codec: str,
    feedback: bool,
) -> dict[str, Any]:
    """Run FedAvg over a Dirichlet(0.5) split with every device in every round."""
    features, labels = pool
    parts = partition_dirichlet(labels, devices, 0.5, np.random.default_rng(0))
    layers = [{"kind": "linear", "in": features.shape[1], "out": 10}]
    head = init_head(layers, seed=0)
    strategy = make_strategy("fedavg")
    residuals = [ErrorFeedback() if feedback else None for _ in range(devices)]
    sent = 0
    curve = []
    start = time.perf_counter()
    for round_number in range(rounds):
        deltas = []
        for device, indices in enumerate(parts):
            config = TrainConfig(
                epochs=1, lr=0.1, batch_size=16, seed=round_number * 10_007 + device
            )
            local = train_head(layers, head, features[indices], labels[indices], config)
            delta = {key: local.weights[key] - head[key] for key in head}
            data = encode_delta(delta, codec, feedback=residuals[device])
            sent += len(data)
            deltas.append((decode_delta(data)[0], local.samples))
        head = strategy.aggregate(head, deltas)
        curve.append(head_accuracy(layers, head, *test))
    return {
        "accuracy": curve[-1],
        # One round's accuracy swings by points under label skew; the last five show the level.
        "last5_mean": float(np.mean(curve[-5:])),
        "curve": curve,
        "bytes_per_update": sent / (rounds * devices),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    sizes = wire_sizes()
    print("bytes per update (one safetensors message, no caller metadata)")
    print(f"{'head':>8} {'codec':>8} {'bytes':>7} {'x float32':>9} {'payload':>8} {'header':>7} "
          f"{'enc us':>7} {'dec us':>7}")  # fmt: skip
    for row in sizes:
        print(
            f"{row['head']:>8} {row['codec']:>8} {row['bytes']:>7} {row['ratio']:>9.3f} "
            f"{row['payload_bytes']:>8} {row['header_bytes']:>7} "
            f"{row['encode_us']:>7.0f} {row['decode_us']:>7.0f}"
        )

    pool, test = digits_features()
    runs = []
    print("\nFL-digits (digits-mlp backbone, 64x10 head, Dirichlet 0.5, FedAvg, all devices)")
    print(f"{'devices':>7} {'rounds':>6} {'codec':>14} {'accuracy':>8} {'vs f32':>7} "
          f"{'last5':>6} {'vs f32':>7} {'B/update':>8} {'secs':>6}")  # fmt: skip
    for devices in args.devices:
        for rounds in args.rounds:
            baseline: dict[str, Any] = {}
            for label, codec, feedback in VARIANTS:
                result = federate(pool, test, devices, rounds, codec, feedback)
                baseline = baseline or result
                gap = 100 * (result["accuracy"] - baseline["accuracy"])
                gap5 = 100 * (result["last5_mean"] - baseline["last5_mean"])
                runs.append({"devices": devices, "rounds": rounds, "variant": label, **result})
                print(
                    f"{devices:>7} {rounds:>6} {label:>14} {result['accuracy']:>8.3f} "
                    f"{gap:>+6.1f}p {result['last5_mean']:>6.3f} {gap5:>+6.1f}p "
                    f"{result['bytes_per_update']:>8.0f} {result['seconds']:>6.1f}"
                )

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "codecs.json"
    path.write_text(json.dumps({"sizes": sizes, "fl_digits": runs}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
