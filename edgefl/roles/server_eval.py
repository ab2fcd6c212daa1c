"""The aggregator's own evaluation: a global head's accuracy on a server-side eval set."""

from __future__ import annotations

import numpy as np

from edgefl.bundle import ModelBundle
from edgefl.data import Dataset, conform
from edgefl.head import Weights, head_accuracy
from edgefl.roles.features import FeatureCache, shared_backbone


class ServerEvaluation:
    """Backbone features of an eval set, computed once; heads are scored on them."""

    def __init__(self, bundle: ModelBundle, dataset: Dataset) -> None:
        """Run the bundle's backbone (ONNX before TFLite) over `dataset` once."""
        self.bundle = bundle
        dataset = conform(dataset, bundle.manifest.input.shape)
        artifact = bundle.manifest.select_backbone([("onnx", "*"), ("tflite", "*")])
        runner, lock = shared_backbone(bundle.file(artifact), artifact.sha256)
        self.features: np.ndarray = FeatureCache().features(
            artifact.sha256, dataset.X, runner, lock
        )
        self.labels: np.ndarray = dataset.y

    def accuracy(self, task: str, weights: Weights) -> float:
        """Return the accuracy of `weights`, a head of `task`, on the eval set."""
        layers = self.bundle.head_spec(task).layers
        return head_accuracy(layers, weights, self.features, self.labels)
