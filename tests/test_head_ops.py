"""A head's output operations: numpy against torch, the manifest, and a compressed bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefl.bundle import HeadSpec, Manifest, load_bundle
from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.core.settings import TrainConfig
from edgefl.core.training import train_head
from edgefl.data import load_digits
from edgefl.head import apply_output_ops, check_output_ops, head_accuracy, head_forward
from edgefl.models.head_ops import output_module
from edgefl.runtime import load_backbone

OPS = [
    [{"op": "sigmoid"}],
    [{"op": "tanh"}],
    [{"op": "softmax"}],
    [{"op": "log_softmax"}],
    [{"op": "affine", "scale": 2.5, "shift": -1.0}, {"op": "sigmoid"}],
]


@pytest.mark.parametrize("ops", OPS, ids=lambda ops: "+".join(op["op"] for op in ops))
def test_numpy_output_operations_equal_torch_and_keep_the_argmax(ops: list[dict]) -> None:
    logits = np.random.default_rng(0).normal(0, 3, (50, 7)).astype(np.float32)
    logits[0] = [-200, 200, 0, 90, -90, 1, 2]  # no overflow where exp(200) would be inf
    got = apply_output_ops(ops, logits)
    with torch.no_grad():
        expected = output_module(ops)(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()
    # Order kept; far from saturation (a float32 sigmoid of 30 and of 40 are both 1.0, which is
    # why predictions come from the logits) the argmax is the logits'.
    assert (got[1:].argmax(1) == logits[1:].argmax(1)).all()


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "gelu"}, "head output operation 0 is 'gelu'; supported: sigmoid, tanh"),
        ({"op": "affine", "scale": -1.0}, "scales by -1.0; only a finite positive scale"),
        ({"op": "affine", "scale": "2"}, r"\(affine\) needs numbers"),
    ],
)
def test_bad_output_operations_are_refused(op: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_output_ops([op])


def _manifest(heads: dict) -> dict:
    return {
        "name": "m",
        "version": 1,
        "input": {"shape": [64]},
        "feature_size": 4,
        "artifacts": [],
        "heads": heads,
        "schema_version": 1,
    }


def test_output_operations_round_trip_and_old_manifests_have_none() -> None:
    layers = [{"kind": "linear", "in": 4, "out": 3}]
    spec = HeadSpec(layers=layers, labels=["a", "b", "c"], outputs=[{"op": "sigmoid"}])
    manifest = Manifest.from_dict(_manifest({"default": spec.__dict__}))
    assert manifest.heads["default"].outputs == [{"op": "sigmoid"}]
    assert '"outputs":[{"op":"sigmoid"}]' in manifest.to_json()
    old = Manifest.from_dict(_manifest({"default": {"layers": layers, "labels": ["a", "b", "c"]}}))
    assert old.heads["default"].outputs == []
    # An old manifest is written back byte for byte: no empty `outputs` appears.
    assert "outputs" not in old.to_json()


def test_a_crepe_like_model_compresses_to_a_bundle_a_board_computes(tmp_path: Path) -> None:
    """The issue's case: a forward that applies a sigmoid after its last Linear, with an
    `embed` switch. The bundle must compute what the model computes, at the model's accuracy."""
    import tiny_models

    out = tmp_path / "pitch"
    result = compress(
        CompressRequest(model="tiny_models:pitch_like", recipe="generic", data="digits", out=out)
    )
    assert result.report is not None
    original, onnx = result.report.stages[0], result.report.stages[-1]
    assert original.accuracy > 0.9 and onnx.accuracy == pytest.approx(original.accuracy)
    bundle = load_bundle(out)
    spec = bundle.head_spec()
    assert spec.outputs == [{"op": "sigmoid"}]
    assert json.loads((out / "manifest.json").read_text())["heads"]["default"]["outputs"] == [
        {"op": "sigmoid"}
    ]
    digits = load_digits()
    x = digits.X[:200]
    features = load_backbone(bundle.file(bundle.manifest.backbones()[0])).run(x)
    got = head_forward(spec.layers, bundle.head_weights(), features, spec.outputs)
    model = tiny_models.pitch_like()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Boards train on the logits; accuracy (argmax) is the model's.
    labels = digits.y[:200]
    trained = train_head(
        spec.layers, bundle.head_weights(), features, labels, TrainConfig(epochs=1, lr=0.05)
    )
    assert trained.accuracy == pytest.approx(
        head_accuracy(spec.layers, trained.weights, features, labels)
    )
    assert trained.accuracy > 0.9
