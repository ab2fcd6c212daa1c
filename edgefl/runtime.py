"""Board-side backbone runtime: one loader for `.onnx` (onnxruntime) and `.tflite` (LiteRT).

This module runs on the boards, so it imports only numpy at module level; onnxruntime and
ai-edge-litert are imported when a file of their format is loaded, and torch never. tflite-runtime
is only a fallback: its last release (2.14) crashes under numpy 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefl.errors import DataError, RuntimeLoadError, first_line

FORMATS = {".onnx": "onnx", ".tflite": "tflite"}

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"


class BackboneRunner(Protocol):
    """A loaded backbone: float32 samples in, float32 features out, in its real runtime."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    runtime: str  # "onnxruntime", "litert" or "tflite-runtime"
    provider: str  # the onnxruntime execution provider running it; "" for LiteRT

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run a batch of any size.

        Args:
            x: (batch, *input_shape) float array.

        Returns:
            (batch, features) float32 features (outputs are flattened per sample).

        Raises:
            DataError: `x` does not have the backbone's input shape.
        """
        ...


def _check_batch(x: np.ndarray, input_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """Return `x` as contiguous float32, or raise a DataError when its shape does not fit."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    expected = tuple(input_shape)
    sample = tuple(x.shape[1:])
    # -1 marks a dimension the artifact leaves free (symbolic in ONNX).
    fits = len(sample) == len(expected) and all(
        want < 0 or want == got for want, got in zip(expected, sample, strict=True)
    )
    if x.ndim == 0 or not fits:
        raise DataError(
            f"input of shape {tuple(x.shape)} does not fit {path.name}: it takes "
            f"(batch, {', '.join(str(d) for d in expected)})"
        )
    return x


@dataclass
class OnnxBackbone:
    """A backbone in onnxruntime, on the first execution provider of the preference available."""

    path: Path
    session: Any
    input_name: str
    input_shape: tuple[int, ...]
    format: str = "onnx"
    runtime: str = "onnxruntime"
    provider: str = CPU_PROVIDER

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run a batch; see `BackboneRunner.run`."""
        x = _check_batch(x, self.input_shape, self.path)
        if len(x) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        (out,) = self.session.run(None, {self.input_name: x})[:1]
        return np.asarray(out, dtype=np.float32).reshape(len(x), -1)


@dataclass
class TfliteBackbone:
    """A backbone in a LiteRT interpreter.

    TFLite tensors have a fixed batch, so a batch is run in slices of the artifact's batch size.
    Int8 artifacts take and return int8 tensors: inputs are quantized with the input tensor's
    scale and zero point and outputs dequantized with the output's.
    """

    path: Path
    interpreter: Any
    input_shape: tuple[int, ...]
    batch: int
    input_detail: dict[str, Any]
    output_detail: dict[str, Any]
    format: str = "tflite"
    runtime: str = "litert"
    provider: str = ""
    quantized_input: bool = field(init=False)

    def __post_init__(self) -> None:
        self.quantized_input = np.dtype(self.input_detail["dtype"]).kind in "iu"

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.input_detail["dtype"])
        if not self.quantized_input:
            return x.astype(dtype, copy=False)
        scale, zero_point = self.input_detail["quantization"]
        info = np.iinfo(dtype)
        q = np.round(x / scale) + zero_point
        return np.clip(q, info.min, info.max).astype(dtype)

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if np.dtype(y.dtype).kind not in "iu":
            return y.astype(np.float32, copy=False)
        scale, zero_point = self.output_detail["quantization"]
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run a batch; see `BackboneRunner.run`."""
        x = _check_batch(x, self.input_shape, self.path)
        count = len(x)
        if count == 0:
            return np.zeros((0, 0), dtype=np.float32)
        # Pad the last slice to the fixed batch; the padded rows are dropped below.
        padded = -count % self.batch
        if padded:
            x = np.concatenate([x, np.zeros((padded, *x.shape[1:]), dtype=x.dtype)])
        outputs = []
        for start in range(0, len(x), self.batch):
            self.interpreter.set_tensor(
                self.input_detail["index"], self._quantize_input(x[start : start + self.batch])
            )
            self.interpreter.invoke()
            out = self.interpreter.get_tensor(self.output_detail["index"])
            outputs.append(self._dequantize_output(out).reshape(self.batch, -1))
        return np.concatenate(outputs)[:count]


def choose_providers(
    preferred: list[str] | None, available: list[str]
) -> tuple[list[str], list[str]]:
    """Return the execution providers to open a session with, and why any preferred was skipped.

    Args:
        preferred: providers in order of preference (a board profile's `providers`); None or
            empty means CPU only.
        available: what this onnxruntime build offers (`onnxruntime.get_available_providers()`).

    Returns:
        (providers, skipped): the preferred ones available, in order (the first runs the graph,
        the next take the nodes it cannot), CPU last when none is; and one line per preferred
        provider this build does not offer.
    """
    wanted = list(preferred or [CPU_PROVIDER])
    chosen = [p for p in wanted if p in available]
    skipped = [
        f"{p} is not available in this onnxruntime (it has {', '.join(available) or 'none'})"
        for p in wanted
        if p not in available
    ]
    return chosen or [CPU_PROVIDER], skipped


def _load_onnx(path: Path, threads: int, providers: list[str] | None) -> OnnxBackbone:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeLoadError(
            f"cannot load {path.name}: onnxruntime is not installed (pip install 'edgefl[agent]')"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ENABLE_ALL fuses QDQ pairs into integer kernels; without it int8 runs as slow fake-quant.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    chosen, skipped = choose_providers(providers, list(ort.get_available_providers()))
    for reason in skipped:
        log.warning("%s: %s; falling back to %s", path.name, reason, chosen[0])
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise RuntimeLoadError(
            f"cannot load {path.name} in onnxruntime: {first_line(exc)}"
        ) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise RuntimeLoadError(
            f"cannot load {path.name}: a backbone takes one input, this one takes {len(inputs)}"
        )
    dims = inputs[0].shape[1:]
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)
    # A provider can also fail to initialise (no GPU, a TensorRT library missing): onnxruntime
    # then runs on the next one, so what runs is what the session reports, not what was asked.
    running = (list(session.get_providers()) or [CPU_PROVIDER])[0]
    if running != chosen[0]:
        log.warning("%s: %s did not start; running on %s", path.name, chosen[0], running)
    log.info("%s: onnxruntime on %s", path.name, running)
    return OnnxBackbone(
        path=path,
        session=session,
        input_name=inputs[0].name,
        input_shape=shape,
        provider=running,
    )


def _litert() -> tuple[str, Any]:
    """Return the TFLite runtime's name and Interpreter class (None when neither is installed)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except Exception:  # tflite-runtime 2.14 fails in odd ways under numpy 2
            return "", None
        return "tflite-runtime", Interpreter
    return "litert", Interpreter


def _load_tflite(path: Path, threads: int) -> TfliteBackbone:
    runtime, interpreter_class = _litert()
    if interpreter_class is None:
        raise RuntimeLoadError(
            f"cannot load {path.name}: ai-edge-litert is not installed "
            "(pip install 'edgefl[agent]')"
        )
    try:
        interpreter = interpreter_class(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except Exception as exc:  # LiteRT raises ValueError or RuntimeError for bad flatbuffers
        raise RuntimeLoadError(f"cannot load {path.name} in LiteRT: {first_line(exc)}") from exc
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    if len(inputs) != 1 or not outputs:
        raise RuntimeLoadError(
            f"cannot load {path.name}: a backbone takes one input and returns one output"
        )
    shape = tuple(int(d) for d in inputs[0]["shape"])
    return TfliteBackbone(
        path=path,
        interpreter=interpreter,
        input_shape=shape[1:],
        batch=max(shape[0], 1),
        input_detail=inputs[0],
        output_detail=outputs[0],
        runtime=runtime,
    )


def load_backbone(
    path: Path, threads: int = 1, providers: list[str] | None = None
) -> BackboneRunner:
    """Load a backbone artifact in its runtime, chosen by the file suffix.

    Args:
        path: a `.onnx` or `.tflite` file.
        threads: intra-op threads (onnxruntime) or interpreter threads (LiteRT).
        providers: onnxruntime execution providers in order of preference (a board profile's);
            those this onnxruntime lacks are skipped with a warning saying so; default CPU only.

    Returns:
        A runner for the artifact.

    Raises:
        RuntimeLoadError: the file is missing, unreadable, corrupt, of an unknown format, or its
            runtime is not installed.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(FORMATS))
        raise RuntimeLoadError(
            f"cannot load {path.name}: unknown artifact format (expected {known})"
        )
    if not path.is_file():
        raise RuntimeLoadError(f"cannot load {path}: no such file")
    if threads < 1:
        raise RuntimeLoadError(
            f"cannot load {path.name}: threads must be at least 1, got {threads}"
        )
    if kind == "onnx":
        return _load_onnx(path, threads, providers)
    return _load_tflite(path, threads)


def measure_latency(
    runner: BackboneRunner, sample: np.ndarray, repeats: int = 50, warmup: int = 5
) -> float:
    """Return the median latency in milliseconds of running one sample.

    Args:
        runner: a loaded backbone.
        sample: one sample, with or without its batch dimension of 1.
        repeats: timed runs.
        warmup: untimed runs first (allocation, kernel selection).

    Returns:
        Median wall time of one `runner.run` call, in ms.

    Raises:
        DataError: the sample does not fit the backbone's input.
    """
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim == len(runner.input_shape):
        x = x[None]
    x = x[:1]
    for _ in range(warmup):
        runner.run(x)
    timings = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        runner.run(x)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000.0)


def available_runtimes() -> list[str]:
    """Return the artifact formats this machine has a runtime for: a subset of ["onnx", "tflite"].

    Found without importing them: a board runs one backbone, and importing the other runtime
    too only to say it is there would cost its memory for as long as the agent runs (about
    50 MB for onnxruntime on a board running TFLite). A runtime that is installed but broken
    fails when a backbone is loaded, with its error.
    """
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnx")
    if any(_installed(name) for name in ("ai_edge_litert", "tflite_runtime")):
        found.append("tflite")
    return found


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
