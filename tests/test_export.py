"""Export to ONNX and TFLite: one self-contained file, real runtimes, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgefl.compression.export import export_onnx, export_tflite
from edgefl.errors import ExportError
from edgefl.runtime import load_backbone

torch.set_num_threads(1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
    ).eval()


def wide_mlp() -> nn.Module:
    # ~4 MB of weights: large enough that the dynamo exporter writes a side .data file.
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()


def test_onnx_is_one_file_with_dynamic_batch(tmp_path: Path) -> None:
    model = wide_mlp()
    path = export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "backbone.onnx")
    assert path == tmp_path / "backbone.onnx"
    # Nothing beside it: no .data file, no temporary left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx"]
    assert path.stat().st_size > 4 * 1024 * 1024
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )
    x = np.random.default_rng(0).normal(size=(7, 1, 8, 8)).astype(np.float32)
    features = load_backbone(path).run(x)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    assert features.shape == (7, 1024)
    np.testing.assert_allclose(features, reference, atol=1e-4)


def test_onnx_opset_and_names_suit_onnxruntime(tmp_path: Path) -> None:
    path = export_onnx(tiny_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "b.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["features"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18


def test_onnx_input_that_does_not_fit_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"does not accept an input of shape \(1, 3, 8, 8\)"):
        export_onnx(tiny_cnn(), torch.zeros(1, 3, 8, 8), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_replaces_an_existing_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "b.onnx"
    path.write_bytes(b"old")
    export_onnx(tiny_cnn(), torch.zeros(1, 1, 8, 8), path)
    assert load_backbone(path).run(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 16)


def test_missing_litert_torch_tells_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(ExportError, match=r"pip install 'edgefl\[tflite\]'"):
        export_tflite(tiny_cnn(), torch.zeros(1, 1, 8, 8), tmp_path / "b.tflite")


class Bessel(nn.Module):
    """A backbone with an operator LiteRT has no lowering for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x).flatten(1)


class Inverse(nn.Module):
    """A backbone LiteRT fails on before it reaches a lowering."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(x).flatten(1)


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_unlowerable_operator_is_named_with_onnx_hint(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    with pytest.raises(ExportError) as info:
        export_tflite(Bessel().eval(), torch.randn(1, 4, 4), tmp_path / "b.tflite")
    message = str(info.value)
    assert "cannot lower operator aten.special_bessel_j0" in message
    assert "use the ONNX path" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_other_conversion_failures_still_point_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    with pytest.raises(ExportError, match=r"^TFLite conversion cannot lower .*ONNX path") as info:
        export_tflite(Inverse().eval(), torch.randn(1, 4, 4), tmp_path / "b.tflite")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_calibration_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    with pytest.raises(ExportError, match=r"calibration data of shape \(4, 1, 9, 9\)"):
        export_tflite(
            tiny_cnn(),
            torch.zeros(1, 1, 8, 8),
            tmp_path / "b.tflite",
            calibration=np.zeros((4, 1, 9, 9), np.float32),
        )


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_fp32_and_int8_match_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("litert_torch")
    model = tiny_cnn()
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    inputs = rng.uniform(0, 1, (6, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    example = torch.from_numpy(calibration[:1])
    fp32 = export_tflite(model, example, tmp_path / "fp32.tflite")
    int8 = export_tflite(model, example, tmp_path / "int8.tflite", calibration=calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.tflite", "int8.tflite"]
    np.testing.assert_allclose(load_backbone(fp32).run(inputs), reference, atol=1e-5)
    int8_error = np.abs(load_backbone(int8).run(inputs) - reference).max()
    assert int8_error / np.abs(reference).max() < 0.1
    # Full int8: the artifact's own input tensor is int8 (the runner quantizes for the caller).
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(int8))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
