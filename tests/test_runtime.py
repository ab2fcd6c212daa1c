"""The board-side runtime: real onnxruntime and LiteRT, without torch where a board has none."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefl.errors import BundleError, DataError, RuntimeLoadError
from edgefl.runtime import (
    CPU_PROVIDER,
    available_runtimes,
    choose_providers,
    load_backbone,
    measure_latency,
)

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(4, 3)).astype(np.float32)
BIAS = RNG.normal(size=3).astype(np.float32)


def expected_features(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ WEIGHT + BIAS, 0.0)


def write_linear_onnx(path: Path, batch: int | str = "batch") -> Path:
    """A relu(x @ W + b) backbone built with onnx.helper: no torch needed."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["features"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture
def linear_onnx(tmp_path: Path) -> Path:
    return write_linear_onnx(tmp_path / "backbone.onnx")


def test_onnx_runs_any_batch_size_with_exact_features(linear_onnx: Path) -> None:
    runner = load_backbone(linear_onnx, threads=1)
    assert runner.format == "onnx"
    assert runner.input_shape == (4,)
    for batch in (1, 5, 33):
        x = RNG.normal(size=(batch, 4)).astype(np.float32)
        features = runner.run(x)
        assert features.shape == (batch, 3)
        assert features.dtype == np.float32
        np.testing.assert_allclose(features, expected_features(x), atol=1e-5)


def test_float64_input_is_accepted_as_float32(linear_onnx: Path) -> None:
    x = RNG.normal(size=(2, 4))
    features = load_backbone(linear_onnx).run(x)
    np.testing.assert_allclose(features, expected_features(x.astype(np.float32)), atol=1e-5)


def test_wrong_input_shape_names_both_shapes(linear_onnx: Path) -> None:
    runner = load_backbone(linear_onnx)
    with pytest.raises(DataError, match=r"\(2, 5\) does not fit backbone.onnx.*\(batch, 4\)"):
        runner.run(np.zeros((2, 5), dtype=np.float32))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.pt", b"weights", r"model.pt: unknown artifact format \(expected .onnx, .tflite\)"),
        (
            "broken.onnx",
            b"\x08\x07garbage not a protobuf",
            r"cannot load broken.onnx in onnxruntime",
        ),
        ("broken.tflite", b"not a flatbuffer at all", r"cannot load broken.tflite in LiteRT"),
    ],
)
def test_unloadable_files_give_one_line_errors(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RuntimeLoadError, match=message) as info:
        load_backbone(path)
    assert "\n" not in str(info.value)
    # Agents treat a bad artifact like any other bad bundle.
    assert isinstance(info.value, BundleError)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"absent.onnx: no such file"):
        load_backbone(tmp_path / "absent.onnx")


def test_provider_preference_falls_back_to_an_available_one_and_says_why(
    linear_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    present = onnxruntime.get_available_providers()
    absent = "NoSuchExecutionProvider"
    # The Jetson profile's order on this machine: what it lacks is skipped, in order.
    jetson = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER]
    with caplog.at_level("WARNING", logger="edgefl.runtime"):
        runner = load_backbone(linear_onnx, providers=[absent, *jetson])
    first = next(p for p in jetson if p in present)
    assert runner.provider == first and runner.runtime == "onnxruntime"
    assert runner.session.get_providers()[0] == first  # what the session really runs on
    warned = caplog.text
    assert f"{absent} is not available in this onnxruntime" in warned
    assert f"falling back to {first}" in warned
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(runner.run(x), expected_features(x), rtol=1e-6)


def test_choose_providers_keeps_the_preferred_order_of_those_present() -> None:
    available = ["CUDAExecutionProvider", CPU_PROVIDER]
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER]
    chosen, skipped = choose_providers(preferred, available)
    assert chosen == ["CUDAExecutionProvider", CPU_PROVIDER]
    assert skipped == [
        "TensorrtExecutionProvider is not available in this onnxruntime "
        "(it has CUDAExecutionProvider, CPUExecutionProvider)"
    ]
    assert choose_providers(None, available) == ([CPU_PROVIDER], [])
    assert choose_providers(["TensorrtExecutionProvider"], [CPU_PROVIDER])[0] == [CPU_PROVIDER]


def test_both_runtimes_are_reported_available() -> None:
    assert available_runtimes() == ["onnx", "tflite"]


def test_latency_is_a_positive_median_for_one_sample(linear_onnx: Path) -> None:
    runner = load_backbone(linear_onnx)
    with_batch = measure_latency(runner, np.zeros((1, 4), np.float32), repeats=5, warmup=1)
    without_batch = measure_latency(runner, np.zeros(4, np.float32), repeats=5, warmup=1)
    assert 0.0 < with_batch < 1000.0
    assert 0.0 < without_batch < 1000.0


def test_fixed_batch_onnx_is_sliced_by_the_caller_shape(tmp_path: Path) -> None:
    path = write_linear_onnx(tmp_path / "fixed.onnx", batch=2)
    runner = load_backbone(path)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(runner.run(x), expected_features(x), atol=1e-5)


def test_runtime_works_on_a_board_without_torch(linear_onnx: Path) -> None:
    # Blocking the import makes any `import torch` on the way fail loudly.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from edgefl.runtime import available_runtimes, load_backbone
        runner = load_backbone({str(linear_onnx)!r})
        out = runner.run(np.ones((3, 4), dtype=np.float32))
        print(out.shape, available_runtimes())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "(3, 3) ['onnx', 'tflite']" in result.stdout


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny CNN exported to fp32 and int8 TFLite, with its PyTorch features on test inputs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgefl.compression.export import export_tflite

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 6),
    ).eval()
    rng = np.random.default_rng(1)
    calibration = rng.uniform(0, 1, size=(32, 1, 8, 8)).astype(np.float32)
    inputs = rng.uniform(0, 1, size=(5, 1, 8, 8)).astype(np.float32)
    folder = tmp_path_factory.mktemp("tflite")
    example = torch.from_numpy(calibration[:1])
    fp32 = export_tflite(model, example, folder / "backbone.tflite")
    int8 = export_tflite(model, example, folder / "backbone-int8.tflite", calibration=calibration)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    return {"fp32": fp32, "int8": int8, "inputs": inputs, "reference": reference}


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_fp32_runs_a_batch_larger_than_its_fixed_batch(tiny_tflite: dict) -> None:
    runner = load_backbone(tiny_tflite["fp32"])
    assert runner.format == "tflite" and (runner.runtime, runner.provider) == ("litert", "")
    assert runner.input_shape == (1, 8, 8)
    features = runner.run(tiny_tflite["inputs"])
    assert features.shape == (5, 6)
    np.testing.assert_allclose(features, tiny_tflite["reference"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.tflite
def test_tflite_int8_takes_and_returns_float32(tiny_tflite: dict) -> None:
    runner = load_backbone(tiny_tflite["int8"], threads=2)
    features = runner.run(tiny_tflite["inputs"])
    reference = tiny_tflite["reference"]
    assert features.dtype == np.float32
    error = np.abs(features - reference).max() / np.abs(reference).max()
    assert error < 0.1
    # Quantized, not a float copy: int8 outputs land on a grid, so they never match exactly.
    assert np.abs(features - reference).max() > 1e-6
