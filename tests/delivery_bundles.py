"""Small real bundles for the delivery tests: ONNX backbones built with onnx.helper (no torch).

The backbone is x (batch, 64) -> MatMul -> Relu -> [MatMul ->] features, so onnxruntime really
loads and runs it; `hidden` makes it as large as a benchmark needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefl.bundle import Artifact, HeadSpec, InputSpec, Manifest, ModelBundle, write_bundle
from edgefl.head import init_head

INPUT_SIZE = 64


def onnx_backbone(features: int, hidden: int = 0, seed: int = 0) -> bytes:
    """Return a serialized ONNX model mapping (batch, 64) to (batch, features) with a ReLU."""
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    width = INPUT_SIZE
    current = "x"
    layers = [hidden, features] if hidden else [features]
    for index, out in enumerate(layers):
        weight = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"]))
        last = index == len(layers) - 1
        nodes.append(helper.make_node("Relu", [f"m{index}"], ["features" if last else f"r{index}"]))
        current, width = f"r{index}", out
    graph = helper.make_graph(
        nodes,
        "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", INPUT_SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(
    out: Path,
    version: int,
    feature_size: int = 16,
    backbone_features: int | None = None,
    hidden: int = 0,
    precisions: tuple[str, ...] = ("fp32",),
    name: str = "test-model",
) -> ModelBundle:
    """Write a bundle with one ONNX backbone per precision label and a linear head.

    Args:
        out: the bundle directory (replaced if present).
        version: the manifest version.
        feature_size: what the manifest and the head say the features are.
        backbone_features: what the backbone really outputs (differs for a broken bundle).
        hidden: a hidden layer's width (0: none); sets the artifact size.
        precisions: one backbone artifact per label, e.g. ("fp32", "int8").
        name: the bundle name.
    """
    width = feature_size if backbone_features is None else backbone_features
    files: dict[str, Path | bytes] = {}
    artifacts = []
    for index, precision in enumerate(precisions):
        file = f"backbone-{precision}.onnx"
        files[file] = onnx_backbone(width, hidden, seed=version * 10 + index)
        artifacts.append(Artifact(file=file, role="backbone", format="onnx", precision=precision))
    layers = [{"kind": "linear", "in": feature_size, "out": 10}]
    manifest = Manifest(
        name=name,
        version=version,
        input=InputSpec(shape=[INPUT_SIZE]),
        feature_size=feature_size,
        artifacts=artifacts,
        heads={"default": HeadSpec(layers=layers, labels=[str(i) for i in range(10)])},
    )
    heads = {"default": init_head(layers, seed=version)}
    return write_bundle(out, manifest, files, heads, force=True)
