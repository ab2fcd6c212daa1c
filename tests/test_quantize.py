"""ONNX quantization: static int8 QDQ, dynamic int8, fp16, and the sensitivity ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgefl.compression.export import export_onnx
from edgefl.compression.quantize import (
    convert_onnx_fp16,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    rank_sensitive_nodes,
)
from edgefl.errors import DataError, ExportError
from edgefl.runtime import load_backbone

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
CALIBRATION = RNG.uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
HELD_OUT = RNG.uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
    ).eval()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fp32")
    return export_onnx(conv_net(), torch.zeros(1, 1, 8, 8), folder / "backbone.onnx")


def relative_error(path: Path, reference: Path) -> float:
    expected = load_backbone(reference).run(HELD_OUT)
    actual = load_backbone(path).run(HELD_OUT)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_static_int8_is_smaller_qdq_and_close(fp32_onnx: Path, tmp_path: Path) -> None:
    dst = quantize_onnx_static(fp32_onnx, tmp_path / "int8.onnx", CALIBRATION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]
    assert dst.stat().st_size < 0.35 * fp32_onnx.stat().st_size
    ops = op_types(dst)
    assert "QuantizeLinear" in ops
    assert "DequantizeLinear" in ops
    assert relative_error(dst, fp32_onnx) < 0.1
    assert relative_error(dst, fp32_onnx) > 0.0


def test_static_int8_weights_are_per_channel(fp32_onnx: Path, tmp_path: Path) -> None:
    dst = quantize_onnx_static(fp32_onnx, tmp_path / "int8.onnx", CALIBRATION, per_channel=True)
    model = onnx.load(str(dst))
    initializers = {init.name: init for init in model.graph.initializer}
    scales = [
        onnx.numpy_helper.to_array(initializers[node.input[1]])
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and initializers[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(initializers[node.input[0]].dims) > 1
    ]
    assert scales, "no int8 weight found"
    assert all(scale.size > 1 for scale in scales)


def test_excluded_nodes_stay_float(fp32_onnx: Path, tmp_path: Path) -> None:
    ranked = rank_sensitive_nodes(fp32_onnx, CALIBRATION, limit=1)
    dst = quantize_onnx_static(fp32_onnx, tmp_path / "int8.onnx", CALIBRATION, exclude_nodes=ranked)
    model = onnx.load(str(dst))
    (excluded,) = [node for node in model.graph.node if node.name == ranked[0]]
    initializers = {init.name: init for init in model.graph.initializer}
    weight = initializers.get(excluded.input[1])
    # A quantized node reads its weight through a DequantizeLinear; an excluded one directly.
    assert weight is not None
    assert weight.data_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize(
    ("calibration", "error", "message"),
    [
        (np.zeros((0, 1, 8, 8), np.float32), DataError, "calibration data is empty"),
        (np.zeros((4, 3, 8, 8), np.float32), DataError, r"shape \(4, 3, 8, 8\) does not fit"),
    ],
)
def test_bad_calibration_is_a_clear_error(
    fp32_onnx: Path, tmp_path: Path, calibration: np.ndarray, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        quantize_onnx_static(fp32_onnx, tmp_path / "int8.onnx", calibration)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"absent.onnx: no such file"):
        quantize_onnx_static(tmp_path / "absent.onnx", tmp_path / "q.onnx", CALIBRATION)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x01\x12garbage")
    with pytest.raises(ExportError, match=r"corrupt.onnx: not a readable ONNX file"):
        quantize_onnx_dynamic(corrupt, tmp_path / "q.onnx")


def test_dynamic_int8_shrinks_linear_weights(fp32_onnx: Path, tmp_path: Path) -> None:
    dst = quantize_onnx_dynamic(fp32_onnx, tmp_path / "dynamic.onnx")
    assert dst.stat().st_size < 0.4 * fp32_onnx.stat().st_size
    assert "DynamicQuantizeLinear" in op_types(dst)
    assert relative_error(dst, fp32_onnx) < 0.1


def test_fp16_keeps_float32_io_and_halves_the_file(fp32_onnx: Path, tmp_path: Path) -> None:
    dst = convert_onnx_fp16(fp32_onnx, tmp_path / "fp16.onnx")
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    assert dst.stat().st_size < 0.6 * fp32_onnx.stat().st_size
    assert relative_error(dst, fp32_onnx) < 0.01


class Outlier(nn.Module):
    """Three Linear layers; the middle one has one huge weight per row, which int8 crushes.

    The huge weights read a feature that is always 0, so they do not change the fp32 output;
    they only stretch the middle layer's int8 scale until its real weights round to zero.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(64, 64)
        self.middle = nn.Linear(64, 64)
        self.last = nn.Linear(64, 32)
        with torch.no_grad():
            self.first.weight[0] = 0.0
            self.first.bias[0] = -1.0
            self.middle.weight[:, 0] = 200.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x.flatten(1)))
        return self.last(torch.relu(self.middle(h)))


def test_sensitivity_puts_the_outlier_layer_first(tmp_path: Path) -> None:
    model = Outlier().eval()
    fp32 = export_onnx(model, torch.zeros(1, 64), tmp_path / "outlier.onnx")
    calibration = RNG.uniform(0, 1, (32, 64)).astype(np.float32)
    ranked = rank_sensitive_nodes(fp32, calibration, limit=2)
    assert len(ranked) == 2
    weighted = [n for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(weighted) == 3
    # The graph's second weighted node is `middle`; the ranking must lead with it.
    names_in_order = [
        n.name
        for n in onnx.load(str(tmp_path / "outlier.onnx")).graph.node
        if n.op_type in ("Gemm", "MatMul")
    ]
    assert ranked[0] == names_in_order[1]
    assert rank_sensitive_nodes(fp32, calibration, limit=0) == []
