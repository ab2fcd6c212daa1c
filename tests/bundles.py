"""Small real bundles and device data for federation tests (reusable by every test module).

The backbone is a real ONNX graph (x -> MatMul -> Add -> Relu -> features) built with onnx.helper,
so onnxruntime loads and runs it without a torch export; its weights are a fixed random projection,
which turns the digits into features a linear head learns well (>85 %) from a 10 % start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefl.bundle import (
    Artifact,
    HeadSpec,
    InputSpec,
    Manifest,
    ModelBundle,
    Preprocess,
    write_bundle,
)
from edgefl.core.partition import partition_iid
from edgefl.data import Dataset, fl_digits_split
from edgefl.head import init_head

INPUT_SIZE = 64
DIGIT_LABELS = [str(i) for i in range(10)]


def projection_backbone(feature_size: int, seed: int = 0) -> bytes:
    """Return an ONNX model mapping (batch, 64) to (batch, feature_size): relu(x @ W + b)."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((INPUT_SIZE, feature_size)) * 0.5).astype(np.float32)
    bias = (rng.standard_normal(feature_size) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["features"]),
        ],
        "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUT_SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_size])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_test_bundle(
    out: Path,
    version: int = 1,
    feature_size: int = 32,
    tasks: Sequence[str] = ("default",),
    num_classes: int = 10,
    name: str = "digits-test",
    seed: int = 0,
    precisions: Sequence[str] = ("fp32",),
    backbone_features: int | None = None,
    preprocess: Preprocess | None = None,
) -> ModelBundle:
    """Write a bundle: ONNX projection backbones and one linear head per task.

    Args:
        out: the bundle directory to create (replaced if it exists).
        version: the manifest version; each version gets different backbone weights.
        feature_size: what the manifest and the heads say the features are.
        tasks: task names; "default" is stored as head.safetensors, others as head-{task}.
        num_classes: head outputs.
        name: the manifest name.
        seed: backbone and head initialisation seed.
        precisions: one backbone artifact `backbone-{precision}.onnx` per label.
        backbone_features: what the backbones really output, when it should differ from
            `feature_size` (a bundle whose smoke inference fails).
        preprocess: how a board turns its images into the 64 inputs (e.g. 8x8 grayscale);
            None: the default.
    """
    heads: dict[str, HeadSpec] = {}
    weights = {}
    for index, task in enumerate(tasks):
        file = "head.safetensors" if task == "default" else f"head-{task}.safetensors"
        spec = HeadSpec(
            layers=[{"kind": "linear", "in": feature_size, "out": num_classes}],
            labels=DIGIT_LABELS[:num_classes],
            file=file,
        )
        heads[task] = spec
        weights[task] = init_head(spec.layers, seed=seed + index)
    width = feature_size if backbone_features is None else backbone_features
    files: dict[str, Path | bytes] = {}
    artifacts = []
    for index, precision in enumerate(precisions):
        file = f"backbone-{precision}.onnx"
        files[file] = projection_backbone(width, seed + 10 * (version - 1) + index)
        artifacts.append(Artifact(file=file, role="backbone", format="onnx", precision=precision))
    manifest = Manifest(
        name=name,
        version=version,
        input=InputSpec(shape=[INPUT_SIZE], preprocess=preprocess or Preprocess()),
        feature_size=feature_size,
        artifacts=artifacts,
        heads=heads,
    )
    return write_bundle(out, manifest, files, weights, force=True)


def digits_devices(num_devices: int, seed: int = 0) -> tuple[list[Dataset], Dataset]:
    """Return FL-digits device datasets (IID split of the federated pool) and the test set."""
    _, (x_pool, y_pool), (x_test, y_test) = fl_digits_split()
    parts = partition_iid(y_pool, num_devices, np.random.default_rng(seed))
    devices = [Dataset(x_pool[p], y_pool[p], DIGIT_LABELS) for p in parts]
    return devices, Dataset(x_test, y_test, DIGIT_LABELS)


def write_npz(dataset: Dataset, path: Path) -> Path:
    """Save a dataset as the `.npz` an `edgefl agent --data` reads."""
    np.savez(path, X=dataset.X, y=dataset.y, labels=np.array(dataset.labels))
    return path
