"""Flower's side of the FL-digits benchmark: the identical workload in Flower's simulation engine.

Run by benchmarks/fl_digits.py with an interpreter that has `flwr[simulation]` and torch (it may
live in another virtual environment, so this file imports nothing from edgefl). It reads the
workload that fl_digits.py wrote (pool, test set, partition, pretrained backbone, initial head)
and writes a JSON result:

    python benchmarks/fl_digits_flower.py WORKLOAD.npz RESULT.json [ROUNDS (default 10)]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_WORKLOAD: dict[str, np.ndarray] = {}


def _workload() -> dict[str, np.ndarray]:
    """Load the workload once per process (Ray workers load it themselves from the path)."""
    if not _WORKLOAD:
        with np.load(os.environ["FL_DIGITS_WORKLOAD"]) as data:
            _WORKLOAD.update({k: data[k] for k in data.files})
    return _WORKLOAD


def _backbone() -> nn.Module:
    data = _workload()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    model.load_state_dict(
        {
            k[len("backbone.") :]: torch.from_numpy(v.copy())
            for k, v in data.items()
            if k.startswith("backbone.")
        }
    )
    return model.eval()


def _device_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = _workload()
    offsets = data["offsets"]
    indices = data["indices"][offsets[partition_id] : offsets[partition_id + 1]]
    return torch.from_numpy(data["pool_X"][indices]), torch.from_numpy(data["pool_y"][indices])


def build_apps(num_rounds: int, timings: dict[str, Any]) -> tuple[Any, Any]:
    """Build Flower's ClientApp and ServerApp for the workload."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        X, y = _device_data(int(context.node_config["partition-id"]))
        with torch.no_grad():
            features = _backbone()(X)
        head = nn.Linear(64, 10)
        head.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
        # The minibatch order edgefl's devices use (seed + round), so both runs do the same
        # arithmetic and differ only in the framework around it.
        server_round = int(msg.content["config"]["server-round"])
        order = np.random.default_rng(int(_workload()["seed"]) + server_round).permutation(len(y))
        for batch in torch.from_numpy(order).split(16):
            optimizer.zero_grad()
            nn.functional.cross_entropy(head(features[batch]), y[batch]).backward()
            optimizer.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(head.state_dict()),
                "metrics": MetricRecord({"num-examples": len(y)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        data = _workload()
        backbone = _backbone()
        with torch.no_grad():
            test_features = backbone(torch.from_numpy(data["test_X"]))
        test_y = torch.from_numpy(data["test_y"])
        num_devices = len(data["offsets"]) - 1

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            head = nn.Linear(64, 10)
            head.load_state_dict(arrays.to_torch_state_dict())
            with torch.no_grad():
                accuracy = float((head(test_features).argmax(1) == test_y).float().mean())
            now = time.perf_counter()
            if server_round == 0:
                timings["federated_start"] = now
            timings["rounds"].append({"round": server_round, "accuracy": accuracy, "t": now})
            return MetricRecord({"accuracy": accuracy})

        # Every device every round, weighted by sample count: the workload's FedAvg.
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=num_devices,
            min_available_nodes=num_devices,
        )
        initial = ArrayRecord(
            {
                "weight": torch.from_numpy(data["head.weight"]),
                "bias": torch.from_numpy(data["head.bias"]),
            }
        )
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=num_rounds, evaluate_fn=evaluate
        )

    return client, server


def run(workload: Path, num_rounds: int) -> dict[str, Any]:
    """Run Flower's simulation of the workload and return timings and accuracies."""
    import flwr
    from flwr.simulation import run_simulation

    os.environ["FL_DIGITS_WORKLOAD"] = str(workload.resolve())
    num_devices = len(_workload()["offsets"]) - 1
    timings: dict[str, Any] = {"rounds": []}
    client, server = build_apps(num_rounds, timings)
    start = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_devices,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    end = time.perf_counter()
    rounds = timings["rounds"]
    last = rounds[-1]["t"]
    return {
        "framework": f"flwr {flwr.__version__}",
        "devices": num_devices,
        "rounds": num_rounds,
        # From the first evaluation (server app and backend up) to the last round's result.
        "wall_s": last - timings["federated_start"],
        "total_s": end - start,
        "accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds[1:]],
    }


if __name__ == "__main__":
    workload_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    rounds_arg = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    result = run(workload_path, rounds_arg)
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
