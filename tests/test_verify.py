"""Verification: artifact outputs in the real runtime against PyTorch's, with clear failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgefl.compression.export import export_onnx
from edgefl.compression.quantize import quantize_onnx_static
from edgefl.compression.verify import Agreement, compare_outputs, verify_artifact
from edgefl.errors import RuntimeLoadError, VerificationError
from edgefl.head import init_head

torch.set_num_threads(1)
HEAD_LAYERS = [{"kind": "linear", "in": 16, "out": 10}]


def test_compare_outputs_on_literal_arrays() -> None:
    reference = np.array([[1.0, -4.0], [2.0, 0.0]])
    candidate = np.array([[1.5, -4.0], [2.0, 3.0]])
    agreement = compare_outputs(reference, candidate, logits=True)
    assert agreement == Agreement(
        max_abs_error=3.0,
        mean_abs_error=0.875,
        top1_agreement=0.5,
        samples=2,
        relative_max_error=0.75,
    )


def test_compare_outputs_without_logits_has_no_top1() -> None:
    agreement = compare_outputs(np.ones((3, 2)), np.ones((3, 2)), logits=False)
    assert agreement.top1_agreement is None
    assert agreement.max_abs_error == 0.0
    assert agreement.samples == 3


def test_all_zero_reference_falls_back_to_absolute_error() -> None:
    agreement = compare_outputs(np.zeros((2, 2)), np.full((2, 2), 0.25), logits=False)
    assert agreement.relative_max_error == 0.25


def test_compare_outputs_refuses_mismatched_shapes() -> None:
    with pytest.raises(VerificationError, match=r"reference \(2, 3\), artifact \(2, 4\)"):
        compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)), logits=False)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.ReLU(),
    ).eval()
    rng = np.random.default_rng(0)
    inputs = rng.uniform(0, 1, (48, 1, 8, 8)).astype(np.float32)
    folder = tmp_path_factory.mktemp("verify")
    fp32 = export_onnx(model, torch.zeros(1, 1, 8, 8), folder / "backbone.onnx")
    int8 = quantize_onnx_static(fp32, folder / "backbone-int8.onnx", inputs[:32])
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs[32:])).numpy()
    return {"fp32": fp32, "int8": int8, "inputs": inputs[32:], "reference": reference}


def test_fp32_onnx_agrees_tightly_with_top1(backbone: dict) -> None:
    head = (HEAD_LAYERS, init_head(HEAD_LAYERS, seed=1))
    agreement = verify_artifact(
        backbone["fp32"], backbone["reference"], backbone["inputs"], 1e-4, head=head, min_top1=1.0
    )
    assert agreement.samples == 16
    assert agreement.relative_max_error < 1e-5
    assert agreement.top1_agreement == 1.0


def test_int8_passes_a_feature_relative_tolerance(backbone: dict) -> None:
    agreement = verify_artifact(
        backbone["int8"], backbone["reference"], backbone["inputs"], tolerance=0.1
    )
    assert 0.0 < agreement.relative_max_error < 0.1
    assert agreement.top1_agreement is None


def test_disagreement_beyond_tolerance_is_one_line_naming_the_file(backbone: dict) -> None:
    shifted = backbone["reference"] * 1.5
    with pytest.raises(VerificationError) as info:
        verify_artifact(backbone["fp32"], shifted, backbone["inputs"], tolerance=0.1)
    message = str(info.value)
    assert message.startswith("backbone.onnx disagrees with PyTorch on 16 samples: ")
    assert "relative max error 0.333 > tolerance 0.1" in message
    assert "\n" not in message


def test_low_top1_agreement_fails_even_within_tolerance(backbone: dict) -> None:
    weights = init_head(HEAD_LAYERS, seed=1)
    weights["0.bias"][:] = 0.0
    head = (HEAD_LAYERS, weights)
    # Negated features through a bias-free head turn every argmax into an argmin.
    wrong = -backbone["reference"]
    with pytest.raises(VerificationError, match=r"top-1 agreement 0\.000 < 0\.98"):
        verify_artifact(
            backbone["fp32"], wrong, backbone["inputs"], tolerance=10.0, head=head, min_top1=0.98
        )


def test_nan_inputs_fail_verification_naming_the_samples(backbone: dict) -> None:
    # NaN inputs give NaN features on both sides: every error is NaN, and `NaN > tol` is False.
    inputs = backbone["inputs"].copy()
    inputs[[3, 7]] = np.nan
    reference = backbone["reference"].copy()
    reference[[3, 7]] = np.nan
    with pytest.raises(VerificationError) as info:
        verify_artifact(backbone["fp32"], reference, inputs, tolerance=0.1)
    message = str(info.value)
    assert "PyTorch's features hold NaN or Inf on 2 samples (first: sample 3)" in message
    assert "its features hold NaN or Inf on 2 samples (first: sample 3)" in message
    assert "relative max error nan > tolerance 0.1" in message


def test_reference_rows_must_match_inputs(backbone: dict) -> None:
    with pytest.raises(VerificationError, match=r"16 inputs but 3 reference rows"):
        verify_artifact(backbone["fp32"], backbone["reference"][:3], backbone["inputs"], 0.1)


def test_unloadable_artifact_is_a_load_error(tmp_path: Path, backbone: dict) -> None:
    broken = tmp_path / "backbone.tflite"
    broken.write_bytes(b"nope")
    with pytest.raises(RuntimeLoadError, match=r"cannot load backbone\.tflite"):
        verify_artifact(broken, backbone["reference"], backbone["inputs"], 0.1)
