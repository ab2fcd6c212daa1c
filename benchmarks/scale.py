"""A 10,000-device simulation on one machine (issue 13, point 6): wall time and peak memory.

    python benchmarks/scale.py                                   # 10,000 x 3 over memory
    python benchmarks/scale.py --broker mosquitto                # over a real Mosquitto
    python benchmarks/scale.py --broker mosquitto --shards 2     # two simulation processes
    python benchmarks/scale.py --devices 1000 --broker embedded  # fl_digits.py's scale run

Each simulation process is `edgefl simulate` (FL-digits, the pool repeated so that devices hold
`--oversample` samples on average, as fl_digits.py's 1,000-device run); with `--shards N` they
are `--shard I/N` processes against one Mosquitto, shard 1 running the aggregator. The deadline
is raised (`--deadline`): one process trains every device of a round on one thread, about 1 ms
each here, so the default 10 s would close a 10,000-device round before the last ones answer.

Reported: the wall time from launching the first process to the last one's exit (what a user
waits), each process's start-up and federated part (from its metrics.json), and peak memory:
the sum of every simulation process's peak RSS plus Mosquitto's (`VmHWM`), an upper bound on
what was resident at once. Results: benchmarks/out/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The tests' Mosquitto launcher: a broker for one run, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_mosquitto import LocalMosquitto

OUT = Path(__file__).resolve().parent / "out"


def _peak_rss_mb(pid: int) -> float:
    """Return a live process's peak resident memory (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Start the broker if needed, run the simulation processes, return what they measured."""
    mosquitto: LocalMosquitto | None = None
    broker = args.broker
    if broker == "mosquitto":
        mosquitto = LocalMosquitto(scratch / "mosquitto", max_queued_messages=1_000_000)
        (scratch / "mosquitto").mkdir()
        mosquitto.start()
        broker = mosquitto.url
    shards = args.shards
    if shards > 1 and mosquitto is None:
        raise SystemExit("--shards needs --broker mosquitto: the shards share one broker")
    base = [
        sys.executable, "-c", "from edgefl.cli import main; main()", "simulate",
        "--devices", str(args.devices), "--rounds", str(args.rounds),
        "--oversample", str(args.oversample), "--deadline", str(args.deadline),
        "--seed", str(args.seed), "--fleet", "scale",
    ]  # fmt: skip
    if broker != "embedded":
        base += ["--broker", broker]
    commands = []
    for index in range(1, shards + 1):
        shard = ["--shard", f"{index}/{shards}"] if shards > 1 else []
        commands.append([*base, *shard, "--out", str(scratch / f"shard-{index}")])
    started = time.perf_counter()
    # Shard 1 (the aggregator) last: the others' devices are then up when it starts waiting.
    processes = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in reversed(commands)
    ][::-1]
    outputs = [p.communicate()[0] for p in processes]
    wall = time.perf_counter() - started
    broker_rss = _peak_rss_mb(mosquitto.process.pid) if mosquitto and mosquitto.process else 0.0
    if mosquitto is not None:
        mosquitto.stop()
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a simulation process failed:\n{output[-3000:]}")
    summaries = []
    for index in range(1, shards + 1):
        metrics = json.loads((scratch / f"shard-{index}" / "metrics.json").read_text())
        summaries.append(
            {**metrics["summary"], "reported_per_round": [r["reported"] for r in metrics["rounds"]]}
        )
    command = " ".join(["edgefl", *commands[0][3:-2]])
    return {
        "command": command + (f"  (x{shards} shards)" if shards > 1 else ""),
        "broker": args.broker,
        "devices": args.devices,
        "rounds": args.rounds,
        "shards": shards,
        "wall_s": wall,
        "processes": summaries,
        "broker_peak_rss_mb": broker_rss,
        "peak_rss_total_mb": sum(s["peak_rss_mb"] for s in summaries) + broker_rss,
        "accuracy": summaries[0]["final_accuracy"],
    }


def main() -> None:
    """Run the scale benchmark, print its line and write benchmarks/out/scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--oversample", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--broker", default="memory", help="memory, embedded or mosquitto")
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    # Each connection is a file: let the processes (and Mosquitto) have as many as allowed.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args, Path(scratch))
    print(
        f"{result['devices']} devices x {result['rounds']} rounds over {result['broker']}, "
        f"{result['shards']} process(es), {os.cpu_count()} CPUs: wall {result['wall_s']:.1f} s, "
        f"peak RSS {result['peak_rss_total_mb']:,.0f} MiB in all "
        f"(broker {result['broker_peak_rss_mb']:,.0f}), accuracy {result['accuracy']:.3f}"
    )
    for index, process in enumerate(result["processes"], 1):
        print(
            f"  process {index}: start-up {process['startup_s']:.1f} s, federated "
            f"{process['wall_s']:.1f} s, peak RSS {process['peak_rss_mb']:,.0f} MiB, updates "
            f"per round {process['reported_per_round']}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"scale-{result['broker']}-{result['devices']}x{result['shards']}.json"
    (OUT / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
