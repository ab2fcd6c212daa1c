"""FL-digits (DESIGN.md): edgefl's simulation against Flower's on the identical workload, and the
1,000-device scale run.

    python benchmarks/fl_digits.py                       # 100 devices x 10 rounds, + Flower
    python benchmarks/fl_digits.py --flower-python /tmp/flwr-venv/bin/python
    python benchmarks/fl_digits.py --no-flower --no-scale --devices 10 --rounds 5

The workload: digits X/16; 30% pretraining, the rest 70/30 into the federated pool and the test
set (stratified, random_state=0); the digits-mlp backbone pretrained by 60 full-batch Adam steps
(seed 0), frozen; a fresh Linear(64, 10) head; Dirichlet(0.5) partition, seed 0; 1 epoch of SGD
(lr 0.1, batch 16) per round; FedAvg weighted by samples; every device every round.

Both frameworks get the same backbone weights, initial head, partition and minibatch order.
Wall time is from the start of the federated part (broker, devices and aggregator up) to the last
round's result; for Flower, from its first central evaluation (server app and Ray backend up) to
the last. Flower's whole `run_simulation` call is reported too (`total_s`), which is what
DESIGN.md's 34.7 s measures. Flower runs in its own process, from any interpreter that has
`flwr[simulation]` and torch (the `bench` extra). The scale run is `edgefl simulate` in its own
process, so its peak RSS is its own. Results: benchmarks/out/fl_digits.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.simulation.plan import plan_fleet
from edgefl.simulation.runner import SimulationConfig, run_simulation
from edgefl.simulation.workload import fl_digits_bundle, load_federated_data

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
FLOWER_SCRIPT = HERE / "fl_digits_flower.py"
FALLBACK_FLOWER_PYTHON = Path("/tmp/flwr-venv/bin/python")


def find_flower_python(explicit: str | None) -> str | None:
    """Return an interpreter that can import flwr: the given one, this one, or the fallback."""
    candidates = [explicit] if explicit else [sys.executable, str(FALLBACK_FLOWER_PYTHON)]
    for candidate in candidates:
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            probe = subprocess.run(
                [candidate, "-c", "import flwr, torch"], capture_output=True, check=False
            )
            if probe.returncode == 0:
                return candidate
    return None


def write_flower_workload(path: Path, devices: int, seed: int) -> None:
    """Write what Flower's clients need: the same pool, test set, partition, backbone and head."""
    from edgefl.models.builtin import pretrained_digits_mlp

    bundle = fl_digits_bundle()
    data = load_federated_data("digits")
    plan = plan_fleet(data.pool.y, devices, "dirichlet:0.5", seed=seed)
    backbone = pretrained_digits_mlp().backbone.state_dict()
    head = bundle.head_weights()
    np.savez(
        path,
        pool_X=data.pool.X.reshape(len(data.pool), -1),
        pool_y=data.pool.y,
        test_X=data.test.X.reshape(len(data.test), -1),
        test_y=data.test.y,
        indices=np.concatenate([d.indices for d in plan.devices]),
        offsets=np.cumsum([0] + [len(d.indices) for d in plan.devices]),
        seed=np.int64(seed),
        **{f"backbone.{k}": v.numpy() for k, v in backbone.items()},
        **{"head.weight": head["0.weight"], "head.bias": head["0.bias"]},
    )


def run_edgefl(devices: int, rounds: int, seed: int, broker: str | None) -> dict[str, Any]:
    """Run edgefl's simulation of the workload in this process."""
    bundle = fl_digits_bundle()
    data = load_federated_data("digits")
    config = SimulationConfig(
        devices=devices, policy=RoundPolicy(rounds=rounds, deadline_s=10.0),
        settings=RoundSettings(train=TrainConfig(seed=seed)), partition="dirichlet:0.5", seed=seed,
        broker_url=broker, fleet="fl-digits",
    )  # fmt: skip
    started = time.perf_counter()
    metrics = run_simulation(config, bundle, data)
    total = time.perf_counter() - started
    return {
        "framework": "edgefl",
        "broker": broker or "embedded (amqtt)",
        "devices": devices,
        "rounds": rounds,
        "wall_s": metrics.summary["wall_s"],
        "startup_s": metrics.summary["startup_s"],
        "total_s": total,
        "accuracy": metrics.final_accuracy,
        "accuracy_per_round": [r.accuracy for r in metrics.rounds],
        "bytes_per_device_per_round": metrics.summary["bytes_per_device_per_round"],
    }


def run_flower(python: str, devices: int, rounds: int, seed: int) -> dict[str, Any]:
    """Run Flower's simulation of the workload in its own process."""
    with tempfile.TemporaryDirectory() as scratch:
        workload, result = Path(scratch) / "workload.npz", Path(scratch) / "flower.json"
        write_flower_workload(workload, devices, seed)
        completed = subprocess.run(
            [python, str(FLOWER_SCRIPT), str(workload), str(result), str(rounds)],
            capture_output=True, text=True, check=False,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        if completed.returncode != 0 or not result.is_file():
            tail = (completed.stdout + completed.stderr)[-2000:]
            raise RuntimeError(f"Flower run failed ({completed.returncode}):\n{tail}")
        return dict(json.loads(result.read_text()))


def run_scale(devices: int, rounds: int, oversample: int, out: Path) -> dict[str, Any]:
    """Run `edgefl simulate` for the scale run in its own process; return its summary."""
    command = [
        sys.executable, "-c", "from edgefl.cli import main; main()", "simulate",
        "--devices", str(devices), "--rounds", str(rounds), "--oversample", str(oversample),
        "--out", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    total = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"scale run failed:\n{(completed.stdout + completed.stderr)[-2000:]}")
    data = json.loads((out / "metrics.json").read_text())
    summary = data["summary"]
    return {
        "command": " ".join(["edgefl", *command[3:-2]]),
        "devices": devices,
        "rounds": rounds,
        "samples": data["config"]["pool_samples"],
        "wall_s": summary["wall_s"],
        "startup_s": summary["startup_s"],
        "process_s": total,
        "peak_rss_mb": summary["peak_rss_mb"],
        "accuracy": summary["final_accuracy"],
        "reported_per_round": [r["reported"] for r in data["rounds"]],
    }


def main() -> None:
    """Run the benchmark, print the table and write benchmarks/out/fl_digits.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broker", default=None, help="mqtt:// URL; default: embedded broker")
    parser.add_argument("--flower-python", default=None, help="interpreter with flwr[simulation]")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--scale-devices", type=int, default=1000)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--scale-oversample", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("amqtt").setLevel(logging.ERROR)  # per-message chatter, not results

    results: dict[str, Any] = {"workload": "FL-digits (DESIGN.md)", "cpus": os.cpu_count()}
    fl_digits_bundle()  # built outside every timing
    edgefl = run_edgefl(args.devices, args.rounds, args.seed, args.broker)
    results["edgefl"] = edgefl
    rows = [("edgefl", edgefl)]
    python = None if args.no_flower else find_flower_python(args.flower_python)
    if python is not None:
        flower = run_flower(python, args.devices, args.rounds, args.seed)
        results["flower"] = flower
        rows.append((flower["framework"], flower))
        results["ratio_wall"] = edgefl["wall_s"] / flower["wall_s"]
        results["ratio_total"] = edgefl["total_s"] / flower["total_s"]
        results["accuracy_gap_points"] = 100 * (flower["accuracy"] - edgefl["accuracy"])
    elif not args.no_flower:
        print("flwr not found: install the bench extra or pass --flower-python; Flower skipped")

    print(f"\nFL-digits, {args.devices} devices x {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'framework':<16}{'wall s':>9}{'total s':>9}{'accuracy':>10}")
    for name, row in rows:
        print(f"{name:<16}{row['wall_s']:>9.2f}{row['total_s']:>9.2f}{row['accuracy']:>10.3f}")
    if "ratio_wall" in results:
        print(
            f"edgefl/Flower wall time {results['ratio_wall']:.3f}x (whole runs "
            f"{results['ratio_total']:.3f}x); accuracy gap {results['accuracy_gap_points']:+.2f} "
            "points (Flower minus edgefl)"
        )
    print(f"bytes per device per round: {edgefl['bytes_per_device_per_round']:,.0f}")

    if not args.no_scale:
        with tempfile.TemporaryDirectory() as scratch:
            scale = run_scale(
                args.scale_devices, args.scale_rounds, args.scale_oversample, Path(scratch)
            )
        results["scale"] = scale
        print(
            f"\nscale: {scale['devices']} devices x {scale['rounds']} rounds "
            f"({scale['samples']} samples): wall {scale['wall_s']:.2f} s, start-up "
            f"{scale['startup_s']:.2f} s, process {scale['process_s']:.2f} s, peak RSS "
            f"{scale['peak_rss_mb']:,.0f} MiB, accuracy {scale['accuracy']:.3f}, updates per "
            f"round {scale['reported_per_round']}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fl_digits.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'fl_digits.json'}")


if __name__ == "__main__":
    main()
