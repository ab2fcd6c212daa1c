"""Apple pfl's side of the FL-digits benchmark: the identical workload in pfl's simulator.

Run by benchmarks/fl_digits.py with an interpreter that has `pfl` and torch (the `bench` extra);
it imports nothing from edgefl. It reads the workload that fl_digits.py wrote (pool, test set,
partition, pretrained backbone, initial head) and writes a JSON result:

    python benchmarks/fl_digits_pfl.py WORKLOAD.npz RESULT.json [ROUNDS (default 10)]

As edgefl's boards do, each device runs the frozen backbone over its samples once (before the
timing) and trains only the head on the features: pfl's model is the Linear(64, 10) head. Local
training visits the samples in edgefl's minibatch order (numpy `default_rng(seed + round)`), one
epoch of SGD (lr 0.1, batch 16); FedAvg weights updates by sample count (`WeightByDatapoints`)
and the central optimizer is SGD with lr 1 (the averaged delta applied as is). Wall time runs from
pfl's first callback (backend and model up) to the last round's central evaluation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class Head(nn.Module):
    """The federated head with the `loss` and `metrics` methods pfl's PyTorchModel asks for."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight))
            self.linear.bias.copy_(torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y)

    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict[str, Any]:
        from pfl.metrics import Weighted

        self.eval()
        with torch.no_grad():
            correct = float((self(x).argmax(1) == y).sum())
        return {"accuracy": Weighted(correct, len(y))}


def run(workload: Path, num_rounds: int) -> dict[str, Any]:
    """Run pfl's simulation of the workload and return timings and accuracies."""
    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(1)  # tiny matrices: one thread is the fastest on this workload
    with np.load(workload) as loaded:
        data = {k: loaded[k] for k in loaded.files}
    backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    backbone.load_state_dict(
        {k[len("backbone.") :]: torch.from_numpy(v.copy()) for k, v in data.items()
         if k.startswith("backbone.")}
    )  # fmt: skip
    backbone.eval()
    with torch.no_grad():
        pool_features = backbone(torch.from_numpy(data["pool_X"]))
        test_features = backbone(torch.from_numpy(data["test_X"]))
    pool_y = torch.from_numpy(data["pool_y"]).long()
    test_y = torch.from_numpy(data["test_y"]).long()
    offsets, indices, seed = data["offsets"], data["indices"], int(data["seed"])
    num_devices = len(offsets) - 1
    devices = [
        (pool_features[torch.from_numpy(indices[offsets[i] : offsets[i + 1]])],
         pool_y[torch.from_numpy(indices[offsets[i] : offsets[i + 1]])])
        for i in range(num_devices)
    ]  # fmt: skip
    state = {"round": 1}

    def make_dataset(user_id: int) -> Dataset:
        x, y = devices[user_id]
        order = torch.from_numpy(np.random.default_rng(seed + state["round"]).permutation(len(y)))
        return Dataset(raw_data=[x[order], y[order]], user_id=user_id)

    timings: dict[str, Any] = {"rounds": []}

    class Clock(TrainingProcessCallback):  # type: ignore[misc]
        """Marks the start, evaluates the head after each round, and moves the round on."""

        def on_train_begin(self, *, model: Any) -> Metrics:
            timings["federated_start"] = time.perf_counter()
            return Metrics()

        def after_central_iteration(
            self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
        ) -> tuple[bool, Metrics]:
            head = model.pytorch_model
            with torch.no_grad():
                accuracy = float((head(test_features).argmax(1) == test_y).float().mean())
            timings["rounds"].append({"accuracy": accuracy, "t": time.perf_counter()})
            state["round"] += 1
            return False, Metrics()

    head = Head(data["head.weight"], data["head.bias"])
    model = PyTorchModel(
        model=head,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(head.parameters(), lr=1.0),
    )
    training = FederatedDataset(
        make_dataset, get_user_sampler("minimize_reuse", list(range(num_devices)))
    )
    backend = SimulatedBackend(
        training_data=training, val_data=None, postprocessors=[WeightByDatapoints()]
    )
    params = NNAlgorithmParams(
        central_num_iterations=num_rounds, evaluation_frequency=num_rounds + 1,
        train_cohort_size=num_devices, val_cohort_size=0,
    )  # fmt: skip
    started = time.perf_counter()
    FederatedAveraging().run(
        algorithm_params=params,
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=1, local_learning_rate=0.1, local_batch_size=16
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[Clock()],
    )
    end = time.perf_counter()
    rounds = timings["rounds"]
    return {
        "framework": f"pfl {pfl.__version__}" if hasattr(pfl, "__version__") else "pfl",
        "devices": num_devices,
        "rounds": num_rounds,
        "wall_s": rounds[-1]["t"] - timings["federated_start"],
        "total_s": end - started,
        "accuracy": rounds[-1]["accuracy"],
        "accuracy_per_round": [r["accuracy"] for r in rounds],
    }


if __name__ == "__main__":
    workload_path, result_path = Path(sys.argv[1]), Path(sys.argv[2])
    rounds_arg = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    result = run(workload_path, rounds_arg)
    result_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
