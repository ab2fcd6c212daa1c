"""Export a PyTorch backbone to one self-contained ONNX file or to TFLite (fp32 or full int8)."""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgefl.atomic import replacing
from edgefl.compression.quiet import NOISY_LOGGERS
from edgefl.errors import ExportError, first_line

log = logging.getLogger(__name__)

# Opset 18 is what the dynamo exporter emits natively and what onnxruntime 1.31 and its
# quantizer (QDQ, per-channel) fully handle.
ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "features"
# ONNX protobufs cannot hold more than 2 GiB in one file.
_PROTOBUF_LIMIT = 2**31 - 1
# Calibration samples beyond this add conversion time but barely move the ranges.
MAX_TFLITE_CALIBRATION = 256


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' known third-party noise during one export; errors still show."""
    # Their Python loggers report, at warning level, things a user cannot act on.
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        # torch's own pytree raises this from copyreg while exporting; nothing we can change.
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _check_forward(model: nn.Module, example: torch.Tensor) -> None:
    """Run the model once so a shape mismatch is reported as such, not as an exporter trace."""
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # any forward failure means the input does not fit
        raise ExportError(
            f"the model does not accept an input of shape {tuple(example.shape)}: {first_line(exc)}"
        ) from exc


def _export_onnx_dynamo(model: nn.Module, example: torch.Tensor, target: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(target),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        verbose=False,
    )


def _export_onnx_legacy(model: nn.Module, example: torch.Tensor, target: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(target),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
    )


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int = ONNX_OPSET
) -> Path:
    """Export a model to ONE self-contained ONNX file with a dynamic batch dimension.

    Uses `torch.onnx.export(dynamo=True)`; when that fails the legacy TorchScript exporter is
    tried and the reason logged. Weights the dynamo exporter writes to a side `.data` file are
    embedded, so the artifact is a single file. The file appears atomically.

    Args:
        model: the module to export (switched to eval mode).
        example: one example input batch, e.g. (1, C, H, W).
        path: the `.onnx` file to write.
        opset: ONNX opset to target.

    Returns:
        `path`.

    Raises:
        ExportError: the model does not accept `example`, both exporters fail, or the model is
            too large for a single ONNX file.
    """
    import onnx

    path = Path(path)
    model = model.eval()
    _check_forward(model, example)
    with tempfile.TemporaryDirectory(prefix="edgefl-onnx-") as tmpdir:
        raw = Path(tmpdir) / "raw.onnx"
        with _quiet_export():
            try:
                _export_onnx_dynamo(model, example, raw, opset)
            except Exception as exc:  # the dynamo exporter raises many unrelated types
                log.warning(
                    "dynamo ONNX export failed (%s); falling back to the legacy exporter",
                    first_line(exc),
                )
                try:
                    _export_onnx_legacy(model, example, raw, opset)
                except Exception as legacy_exc:
                    raise ExportError(
                        f"cannot export the model to ONNX: {first_line(exc)} "
                        f"(legacy exporter: {first_line(legacy_exc)})"
                    ) from legacy_exc
        # onnx.load pulls in any side `.data` file written next to the graph.
        proto = onnx.load(str(raw))
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            raise ExportError(
                f"the model is too large for a single ONNX file ({proto.ByteSize()} bytes > 2 GiB)"
            )
        with replacing(path) as tmp:
            onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return path


def _failing_operator(exc: BaseException) -> str | None:
    """Name the torch operator a TFLite lowering failed on, if the error says or shows it."""
    for err in (exc, exc.__cause__, exc.__context__):
        if err is None:
            continue
        match = re.search(r"Lowering not found: (\S+)", str(err))
        if match:
            return match.group(1)
    # Some lowerings fail with a bare assertion; the fx interpreter frame knows the node.
    operator = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        node: Any = frame.f_locals.get("node", frame.f_locals.get("n"))
        if getattr(node, "op", None) == "call_function":
            operator = str(node.target)
    return operator


def _import_litert_torch() -> Any:
    try:
        import litert_torch
    except ImportError as exc:
        raise ExportError(
            "TFLite export needs litert-torch, which is not installed: pip install 'edgefl[tflite]'"
        ) from exc
    return litert_torch


def _quantize_pt2e(
    model: nn.Module, example: torch.Tensor, calibration: np.ndarray
) -> tuple[nn.Module, Any]:
    """Insert int8 observers, calibrate and convert; returns the module and its quantizer."""
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    exported = torch.export.export(model, (example,)).module()
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    # The exported program has the example's batch size baked in; feed calibration in its slices.
    batch = example.shape[0]
    samples = np.asarray(calibration, dtype=np.float32)[:MAX_TFLITE_CALIBRATION]
    usable = len(samples) - len(samples) % batch
    with torch.no_grad():
        for start in range(0, usable, batch):
            prepared(torch.from_numpy(samples[start : start + batch]))
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    # The graph was traced in eval mode already; exported modules refuse .eval(), so the flag
    # is set directly to stop litert-torch warning that the model is "in training mode".
    converted.training = False
    return converted, quantizer


def export_tflite(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    calibration: np.ndarray | None = None,
    show_progress: bool = False,
) -> Path:
    """Export a model to TFLite with litert-torch: fp32, or full int8 when calibrated.

    Full int8 uses litert-torch's PT2E quantizer (symmetric, per-channel weights) with torchao's
    prepare/convert; the artifact then takes and returns int8 tensors (see
    `edgefl.runtime.TfliteBackbone`). The TFLite batch is fixed to the example's batch size.

    Args:
        model: the module to export (switched to eval mode).
        example: one example input batch, usually (1, C, H, W).
        path: the `.tflite` file to write.
        calibration: (n, *example.shape[1:]) samples for int8; None exports fp32.
        show_progress: let litert-torch print its own step log.

    Returns:
        `path`.

    Raises:
        ExportError: litert-torch is missing, the model does not accept `example`, calibration
            data does not fit, or an operator cannot be lowered to TFLite (named, with a pointer
            to the ONNX path).
    """
    litert_torch = _import_litert_torch()
    path = Path(path)
    model = model.eval()
    _check_forward(model, example)
    if calibration is not None:
        calibration = np.asarray(calibration, dtype=np.float32)
        if calibration.shape[1:] != tuple(example.shape[1:]) or len(calibration) < len(example):
            raise ExportError(
                f"calibration data of shape {calibration.shape} does not fit the model input "
                f"(n, {', '.join(str(d) for d in example.shape[1:])}) with n >= {len(example)}"
            )
    saved_progress = litert_torch.config.show_progress
    litert_torch.config.show_progress = show_progress
    try:
        with _quiet_export():
            if calibration is None:
                edge_model = litert_torch.convert(model, (example,))
            else:
                from litert_torch.quantize.quant_config import QuantConfig

                quantized, quantizer = _quantize_pt2e(model, example, calibration)
                edge_model = litert_torch.convert(
                    quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)
                )
    except ExportError:
        raise
    except Exception as exc:  # litert-torch fails with assertion, runtime and MLIR errors alike
        operator = _failing_operator(exc)
        what = f"operator {operator}" if operator else f"the model ({first_line(exc)})"
        raise ExportError(
            f"TFLite conversion cannot lower {what}; use the ONNX path instead "
            "(a recipe with ONNX artifacts only)"
        ) from exc
    else:
        with replacing(path) as tmp:
            edge_model.export(str(tmp))
    finally:
        litert_torch.config.show_progress = saved_progress
    return path
