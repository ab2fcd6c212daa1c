"""Time to accuracy: async FedBuff against sync FedAvg on a slow, flaky FL-digits fleet.

    python benchmarks/async.py                       # 100 devices, both modes, + Flower if found
    python benchmarks/async.py --target 0.7 --buffer 30 --no-flower

The workload is FL-digits (DESIGN.md: Dirichlet(0.5) partition, 1 epoch of SGD at lr 0.1, batch
16, FedAvg weighted by samples), 100 simulated devices over one Mosquitto started for the run
(the embedded broker when Mosquitto is not installed), every message sealed, with a fleet that is
slow and flaky: device speeds are log-uniform over a 10x spread and a device of speed s answers
(s - 1) x --speed-unit seconds after the fastest (0.5 s: the slowest takes 4.5 s longer), and
each device skips a round (sync) or a head version (async) with probability 0.1.

- sync: every online device every round; a round ends when every selected device answered or at
  the deadline (default: the slowest device's delay + 0.5 s). With 10% dropout some selected
  device is always missing, so every round lasts the deadline: that is what sync costs here.
- async: `--mode async`: a head version every --buffer accepted updates, updates at most
  --max-staleness versions old, weighted (1 + s)^-0.5; each device trains whenever idle on the
  newest head it has.

Both runs use the same bundle, partition, speeds, dropouts and seeds, one after the other in
this process. Reported for each: wall time from the start of the federated part to the first
round whose test accuracy reaches --target (and that round), the final and best accuracy, and
the wall time of the whole run. Flower's synchronous simulation of the same workload
(benchmarks/fl_digits_flower.py, from an interpreter with flwr) runs every client as fast as it
can, with no speed spread or dropout: its rounds to the target are comparable, its wall time is
compute only. Results: benchmarks/out/async.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefl.core.round_state import Verdict
from edgefl.core.settings import AsyncPolicy, RoundPolicy, RoundSettings, TrainConfig
from edgefl.roles.summary import RoundSummary
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.workload import fl_digits_bundle, load_federated_data

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
# The tests' Mosquitto launcher and FL-digits' Flower runner: siblings, not part of the package.
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def time_to_target(rounds: list[dict[str, Any]], target: float) -> tuple[float | None, int | None]:
    """Return (elapsed seconds, round) of the first round at or above `target` (None: never)."""
    for row in rounds:
        if row["accuracy"] >= target:
            return row["elapsed_s"], row["round"]
    return None, None


def run_mode(args: argparse.Namespace, mode: str, broker: str | None) -> dict[str, Any]:
    """Run one simulated federation in `mode` ("sync" or "async") and return its timeline."""
    slowest_s = (args.speed_spread - 1.0) * args.speed_unit
    deadline = args.deadline if args.deadline is not None else slowest_s + 0.5
    rounds = args.sync_rounds if mode == "sync" else args.async_rounds
    config = SimulationConfig(
        devices=args.devices,
        # Async: the deadline only bounds a buffer that stops filling.
        policy=RoundPolicy(rounds=rounds, deadline_s=deadline if mode == "sync" else 60.0),
        settings=RoundSettings(train=TrainConfig(seed=args.seed)),
        partition="dirichlet:0.5", speed_spread=args.speed_spread, speed_unit_s=args.speed_unit,
        dropout=args.dropout, seed=args.seed, broker_url=broker, fleet=f"async-bench-{mode}",
        asynchronous=AsyncPolicy(
            mode=mode, buffer=args.buffer, max_staleness=args.max_staleness,
            staleness=args.staleness,
        ),
    )  # fmt: skip
    summaries: dict[int, dict[str, float]] = {}
    rejected: dict[str, int] = {}

    def on_summary(summary: RoundSummary) -> None:
        summaries[summary.round] = summary.metrics

    def on_verdict(verdict: Verdict) -> None:
        if verdict.code:
            rejected[verdict.code] = rejected.get(verdict.code, 0) + 1

    simulation = Simulation(
        config, fl_digits_bundle(), load_federated_data("digits"),
        on_verdict=on_verdict, on_summary=on_summary,
    )  # fmt: skip
    started = time.perf_counter()
    metrics = simulation.run()
    total = time.perf_counter() - started
    timeline = [
        {
            "round": r.round, "elapsed_s": r.elapsed, "accuracy": r.accuracy,
            "accepted": r.reported,
            "staleness_mean": summaries.get(r.round, {}).get("staleness_mean", 0.0),
        }
        for r in metrics.rounds
    ]  # fmt: skip
    reached_s, reached_round = time_to_target(timeline, args.target)
    accuracies = [row["accuracy"] for row in timeline]
    return {
        "mode": mode,
        "rounds": rounds,
        "deadline_s": deadline if mode == "sync" else None,
        "buffer": args.buffer if mode == "async" else None,
        "time_to_target_s": reached_s,
        "round_at_target": reached_round,
        "final_accuracy": accuracies[-1] if accuracies else math.nan,
        "best_accuracy": max(accuracies, default=math.nan),
        "wall_s": metrics.summary["wall_s"],
        "process_s": total,
        "updates_accepted": sum(row["accepted"] for row in timeline),
        "rejected": rejected,
        "timeline": timeline,
    }


def run_flower_rounds(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run Flower's synchronous FedAvg of the workload (no delays); None when flwr is missing."""
    from fl_digits import find_flower_python, run_flower

    python = find_flower_python(args.flower_python)
    if python is None:
        return None
    result = run_flower(python, args.devices, args.sync_rounds, args.seed)
    per_round = result["accuracy_per_round"]
    reached = next((i + 1 for i, a in enumerate(per_round) if a >= args.target), None)
    result["round_at_target"] = reached
    return result


def main() -> None:
    """Run the benchmark, print the table and write benchmarks/out/async.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.6, help="test accuracy to reach")
    parser.add_argument("--sync-rounds", type=int, default=15)
    parser.add_argument("--async-rounds", type=int, default=80, help="head versions")
    parser.add_argument("--buffer", type=int, default=30, help="async: updates per version")
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--staleness", default="poly:0.5")
    parser.add_argument("--speed-spread", type=float, default=10.0)
    parser.add_argument(
        "--speed-unit", type=float, default=0.5, help="seconds per unit of slowness"
    )
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--deadline", type=float, default=None, help="sync round deadline (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--broker", default=None, help="mqtt:// URL; default: Mosquitto for the run"
    )
    parser.add_argument("--flower-python", default=None, help="interpreter with flwr[simulation]")
    parser.add_argument("--no-flower", action="store_true")
    args = parser.parse_args()
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    logging.getLogger("edgefl").setLevel(logging.ERROR)  # refusals are counted, not logged

    fl_digits_bundle()  # built outside every timing
    mosquitto = None
    broker = args.broker
    scratch = tempfile.TemporaryDirectory()
    if broker is None and shutil.which("mosquitto") is not None:
        from local_mosquitto import LocalMosquitto

        mosquitto = LocalMosquitto(Path(scratch.name))
        mosquitto.start()
        broker = mosquitto.url
    try:
        runs = {mode: run_mode(args, mode, broker) for mode in ("sync", "async")}
    finally:
        if mosquitto is not None:
            mosquitto.stop()
        scratch.cleanup()
    sync, asyn = runs["sync"], runs["async"]
    results: dict[str, Any] = {
        "workload": "FL-digits (DESIGN.md), Dirichlet(0.5), sealed",
        "command": " ".join(["python", "benchmarks/async.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "broker": "mosquitto" if mosquitto is not None else (args.broker or "embedded (amqtt)"),
        "settings": vars(args),
        "sync": sync,
        "async": asyn,
    }
    if sync["time_to_target_s"] and asyn["time_to_target_s"]:
        results["time_to_target_ratio"] = asyn["time_to_target_s"] / sync["time_to_target_s"]
    results["final_accuracy_gap_points"] = 100 * (sync["final_accuracy"] - asyn["final_accuracy"])
    flower = None
    if not args.no_flower:
        flower = run_flower_rounds(args)
        if flower is None:
            print("flwr not found: install the bench extra or pass --flower-python; Flower skipped")
        else:
            results["flower"] = flower

    print(
        f"\nFL-digits, {args.devices} devices, speeds x{args.speed_spread:g} "
        f"(unit {args.speed_unit:g} s), dropout {args.dropout:g}, target {args.target:g}, "
        f"{os.cpu_count()} CPUs, load {results['load_avg_1m']:.1f}"
    )
    print(f"{'run':<28}{'to target s':>12}{'round':>7}{'final':>8}{'best':>7}{'wall s':>9}")
    for name, run in (
        (f"sync FedAvg (deadline {sync['deadline_s']:g} s)", sync),
        (f"async FedBuff (K={args.buffer})", asyn),
    ):
        reached = run["time_to_target_s"]
        print(
            f"{name:<28}{reached if reached is not None else float('nan'):>12.2f}"
            f"{run['round_at_target'] or '-':>7}{run['final_accuracy']:>8.3f}"
            f"{run['best_accuracy']:>7.3f}{run['wall_s']:>9.2f}"
        )
    if flower is not None:
        print(
            f"{flower['framework'] + ' (no delays)':<28}{'':>12}"
            f"{flower['round_at_target'] or '-':>7}"
            f"{flower['accuracy']:>8.3f}{max(flower['accuracy_per_round']):>7.3f}"
            f"{flower['wall_s']:>9.2f}"
        )
    if "time_to_target_ratio" in results:
        print(f"async/sync time to {args.target:g}: {results['time_to_target_ratio']:.3f}x")
    print(
        f"final accuracy: sync {sync['final_accuracy']:.3f}, async {asyn['final_accuracy']:.3f} "
        f"({results['final_accuracy_gap_points']:+.1f} points sync minus async); "
        f"async refused: {asyn['rejected'] or 'none'}"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "async.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
