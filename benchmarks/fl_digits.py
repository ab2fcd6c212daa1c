"""FL-digits (DESIGN.md): edgefl's simulation against Apple pfl's and Flower's on the identical
workload, and the 1,000-device scale run.

    python benchmarks/fl_digits.py                       # 100 devices x 10 rounds, + pfl, Flower
    python benchmarks/fl_digits.py --flower-python /tmp/flwr-venv/bin/python
    python benchmarks/fl_digits.py --no-flower --no-scale --devices 10 --rounds 5
    python benchmarks/fl_digits.py --brokers memory --no-flower --no-scale   # edgefl vs pfl only

edgefl runs once per broker in `--brokers` (default: `memory`, the in-process transport, and
`embedded`, the amqtt broker; or any mqtt:// URL), in that order, in this process.

The workload: digits X/16; 30% pretraining, the rest 70/30 into the federated pool and the test
set (stratified, random_state=0); the digits-mlp backbone pretrained by 60 full-batch Adam steps
(seed 0), frozen; a fresh Linear(64, 10) head; Dirichlet(0.5) partition, seed 0; 1 epoch of SGD
(lr 0.1, batch 16) per round; FedAvg weighted by samples; every device every round. edgefl's
aggregator bounds each update's influence by default; the benchmark turns that off
(`--influence-factor 0`, its default) so that every framework runs the same plain FedAvg, and
edgefl's devices keep no personal head (`--personalize` turns that on), as the workload says.

Every framework gets the same backbone weights, initial head, partition and minibatch order.
Wall time is from the start of the federated part (broker, devices and aggregator up) to the last
round's result; for Flower, from its first central evaluation (server app and Ray backend up) to
the last. Flower's whole `run_simulation` call is reported too (`total_s`), which is what
DESIGN.md's 34.7 s measures. Flower runs in its own process, from any interpreter that has
`flwr[simulation]` and torch (the `bench` extra); pfl too (benchmarks/fl_digits_pfl.py), from
this interpreter when it can import pfl (the `bench` extra) or `--pfl-python`. The scale run is
`edgefl simulate` in its own process, so its peak RSS is its own. Results:
benchmarks/out/fl_digits.json.
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

from edgefl.core.settings import AcceptancePolicy, RoundPolicy, RoundSettings, TrainConfig
from edgefl.simulation.plan import plan_fleet
from edgefl.simulation.runner import SimulationConfig, run_simulation
from edgefl.simulation.workload import fl_digits_bundle, load_federated_data

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
FLOWER_SCRIPT = HERE / "fl_digits_flower.py"
PFL_SCRIPT = HERE / "fl_digits_pfl.py"
FALLBACK_FLOWER_PYTHON = Path("/tmp/flwr-venv/bin/python")


def find_python(explicit: str | None, module: str, fallback: Path | None = None) -> str | None:
    """Return an interpreter that can import `module` and torch: the given one, this one, or
    the fallback."""
    candidates = [explicit] if explicit else [sys.executable, str(fallback or "")]
    for candidate in candidates:
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            probe = subprocess.run(
                [candidate, "-c", f"import {module}, torch"], capture_output=True, check=False
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


def run_edgefl(
    devices: int,
    rounds: int,
    seed: int,
    broker: str | None,
    influence_factor: float = 0.0,
    personalize: bool = False,
) -> dict[str, Any]:
    """Run edgefl's simulation of the workload in this process (`broker` None: embedded).

    `influence_factor` 0 is the workload's plain FedAvg, as the peers run it; edgefl's default
    (2: each update's weight and norm capped at twice the round's median) reaches 0.656.
    `personalize` False: the workload keeps no personal heads (edgefl's simulation does by
    default, at about 15% more device time).
    """
    bundle = fl_digits_bundle()
    data = load_federated_data("digits")
    config = SimulationConfig(
        devices=devices, policy=RoundPolicy(rounds=rounds, deadline_s=10.0),
        settings=RoundSettings(train=TrainConfig(seed=seed)), partition="dirichlet:0.5", seed=seed,
        broker_url=broker, fleet="fl-digits",
        acceptance=AcceptancePolicy(influence_factor=influence_factor), personalize=personalize,
    )  # fmt: skip
    started = time.perf_counter()
    metrics = run_simulation(config, bundle, data)
    total = time.perf_counter() - started
    return {
        "framework": "edgefl",
        "broker": broker or "embedded",
        "devices": devices,
        "rounds": rounds,
        "wall_s": metrics.summary["wall_s"],
        "startup_s": metrics.summary["startup_s"],
        "total_s": total,
        "accuracy": metrics.final_accuracy,
        "accuracy_per_round": [r.accuracy for r in metrics.rounds],
        "bytes_per_device_per_round": metrics.summary["bytes_per_device_per_round"],
    }


def run_peer(script: Path, python: str, devices: int, rounds: int, seed: int) -> dict[str, Any]:
    """Run a peer framework's simulation of the workload (its script) in its own process."""
    with tempfile.TemporaryDirectory() as scratch:
        workload, result = Path(scratch) / "workload.npz", Path(scratch) / "peer.json"
        write_flower_workload(workload, devices, seed)
        completed = subprocess.run(
            [python, str(script), str(workload), str(result), str(rounds)],
            capture_output=True, text=True, check=False,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        if completed.returncode != 0 or not result.is_file():
            tail = (completed.stdout + completed.stderr)[-2000:]
            raise RuntimeError(f"{script.name} failed ({completed.returncode}):\n{tail}")
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


def _broker_url(name: str) -> str | None:
    """Map a `--brokers` entry to SimulationConfig.broker_url (None: the embedded broker)."""
    return None if name == "embedded" else name


def main() -> None:
    """Run the benchmark, print the table and write benchmarks/out/fl_digits.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--brokers", default="memory,embedded",
                        help="comma-separated: memory, embedded or mqtt:// URLs")  # fmt: skip
    parser.add_argument("--influence-factor", type=float, default=0.0,
                        help="edgefl's influence bound; 0: plain FedAvg")  # fmt: skip
    parser.add_argument("--personalize", action="store_true",
                        help="devices also keep personal heads (not in the workload)")  # fmt: skip
    parser.add_argument("--flower-python", default=None, help="interpreter with flwr[simulation]")
    parser.add_argument("--pfl-python", default=None, help="interpreter with pfl and torch")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--no-pfl", action="store_true")
    parser.add_argument("--no-scale", action="store_true")
    parser.add_argument("--scale-devices", type=int, default=1000)
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--scale-oversample", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("amqtt").setLevel(logging.ERROR)  # per-message chatter, not results

    results: dict[str, Any] = {"workload": "FL-digits (DESIGN.md)", "cpus": os.cpu_count()}
    fl_digits_bundle()  # built outside every timing
    rows: list[tuple[str, dict[str, Any]]] = []
    for broker in [b.strip() for b in args.brokers.split(",") if b.strip()]:
        run = run_edgefl(
            args.devices, args.rounds, args.seed, _broker_url(broker), args.influence_factor,
            args.personalize,
        )  # fmt: skip
        results.setdefault("edgefl_runs", []).append(run)
        rows.append((f"edgefl {broker if '://' not in broker else 'mqtt'}", run))
    results["edgefl"] = rows[0][1] if rows else {}
    peers: list[tuple[str, dict[str, Any]]] = []
    pfl_python = None if args.no_pfl else find_python(args.pfl_python, "pfl")
    if pfl_python is not None:
        results["pfl"] = run_peer(PFL_SCRIPT, pfl_python, args.devices, args.rounds, args.seed)
        peers.append(("pfl", results["pfl"]))
    elif not args.no_pfl:
        print("pfl not found: install the bench extra or pass --pfl-python; pfl skipped")
    flower_python = (
        None if args.no_flower else find_python(args.flower_python, "flwr", FALLBACK_FLOWER_PYTHON)
    )
    if flower_python is not None:
        flower = run_peer(FLOWER_SCRIPT, flower_python, args.devices, args.rounds, args.seed)
        results["flower"] = flower
        peers.append(("flower", flower))
    elif not args.no_flower:
        print("flwr not found: install the bench extra or pass --flower-python; Flower skipped")

    print(f"\nFL-digits, {args.devices} devices x {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'framework':<18}{'wall s':>9}{'total s':>9}{'accuracy':>10}")
    for name, row in [*rows, *((row["framework"], row) for _, row in peers)]:
        print(f"{name:<18}{row['wall_s']:>9.2f}{row['total_s']:>9.2f}{row['accuracy']:>10.3f}")
    ratios: dict[str, dict[str, float]] = {}
    for peer, peer_row in peers:
        for name, row in rows:
            ratio = {
                "wall": row["wall_s"] / peer_row["wall_s"],
                "total": row["total_s"] / peer_row["total_s"],
                "accuracy_gap_points": 100 * (peer_row["accuracy"] - row["accuracy"]),
            }
            ratios[f"{name} / {peer}"] = ratio
            print(
                f"{name} / {peer}: wall time {ratio['wall']:.3f}x (whole runs "
                f"{ratio['total']:.3f}x); accuracy gap {ratio['accuracy_gap_points']:+.2f} "
                f"points ({peer} minus edgefl)"
            )
    results["ratios"] = ratios
    if rows:
        print(f"bytes per device per round: {rows[0][1]['bytes_per_device_per_round']:,.0f}")

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
