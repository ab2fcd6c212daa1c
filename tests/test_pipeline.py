"""The pipeline end to end: a verified bundle, report, versions, back-off, no partial bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import color_photos

from edgefl.bundle import load_bundle
from edgefl.compression.pipeline import CompressRequest, compress
from edgefl.compression.preprocess import PreprocessOverrides
from edgefl.data import Dataset, holdout_split, load_digits
from edgefl.errors import BundleError, DataError
from edgefl.head import head_accuracy
from edgefl.runtime import load_backbone

torch.set_num_threads(1)

STRICT = """
description = "prunes hard without distillation, so the drop cannot be met"
max_accuracy_drop = 5.0
[prune]
ratio = 0.9
[backoff]
tries = 1
[[artifacts]]
format = "onnx"
precision = "fp32"
"""

STRICT_INT8 = """
description = "int8 held to a tight tolerance, so sensitive nodes must stay in float"
max_accuracy_drop = 1.0
[[artifacts]]
format = "onnx"
precision = "int8"
calibration_samples = 64
[verify]
tolerance = { int8 = 0.02 }
"""

LIGHT = """
description = "onnx variants"
[[artifacts]]
format = "onnx"
precision = "int8-dynamic"
[[artifacts]]
format = "onnx"
precision = "fp16"
"""


@pytest.fixture(scope="module")
def pi_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pi") / "digits"
    compress(CompressRequest(model="digits-cnn", recipe="raspberry-pi", data="digits", out=out))
    return out


@pytest.mark.slow
def test_raspberry_pi_bundle_meets_the_targets(pi_bundle: Path) -> None:
    bundle = load_bundle(pi_bundle)  # checks every artifact's size and SHA-256
    manifest = bundle.manifest
    assert (
        manifest.name == "digits-cnn"
        and manifest.version == 1
        and manifest.recipe == "raspberry-pi"
    )
    assert manifest.input.shape == [1, 8, 8] and manifest.input.preprocess.scale == 1 / 16
    assert manifest.feature_size == 64 and len(manifest.source_model_sha256) == 64
    assert {(a.format, a.precision) for a in manifest.backbones()} == {
        ("onnx", "int8"),
        ("tflite", "int8"),
    }
    assert manifest.heads["default"].labels == [str(i) for i in range(10)]

    report = bundle.report()
    stages = {s["stage"]: s for s in report["stages"]}
    assert set(stages) == {"original", "pruned", "distilled", "onnx int8", "tflite int8"}
    original = stages["original"]
    assert stages["distilled"]["macs"] <= 0.6 * original["macs"]
    for name in ("onnx int8", "tflite int8"):
        stage = stages[name]
        assert 100 * (original["accuracy"] - stage["accuracy"]) <= 1.0
        assert stage["latency_ms"] > 0 and stage["threads"] == 1
        assert stage["size_bytes"] == (pi_bundle / stage["file"]).stat().st_size
        assert stage["top1_agreement"] >= 0.95
    assert stages["onnx int8"]["size_bytes"] < original["size_bytes"] / 4
    assert all(a["kept"] for a in report["backoff"])


@pytest.mark.slow
def test_bundle_accuracy_is_what_a_board_gets(pi_bundle: Path) -> None:
    bundle = load_bundle(pi_bundle)
    _, test = holdout_split(load_digits())
    spec = bundle.head_spec()
    reported = {s["stage"]: s["accuracy"] for s in bundle.report()["stages"]}
    for artifact in bundle.manifest.backbones():
        features = load_backbone(bundle.file(artifact)).run(test.X)
        score = head_accuracy(spec.layers, bundle.head_weights(), features, test.y)
        assert score == pytest.approx(reported[f"{artifact.format} {artifact.precision}"])


def test_existing_bundle_needs_force_and_force_bumps_the_version(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    request = CompressRequest(model="digits-mlp", recipe="generic", data="digits", out=out)
    compress(request)
    assert load_bundle(out).manifest.version == 1
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists; give `force`"):
        compress(request)
    assert (out / "manifest.json").read_bytes() == before
    request.force = True
    compress(request)
    assert load_bundle(out).manifest.version == 2
    request.version = 7
    compress(request)
    assert load_bundle(out).manifest.version == 7


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dry"
    result = compress(
        CompressRequest(
            model="digits-cnn", recipe="raspberry-pi", data="digits", out=out, dry_run=True
        )
    )
    assert not out.exists() and result.bundle is None
    assert result.plan is not None and result.plan.macs_removed >= 0.4
    assert result.artifacts == ["backbone-int8.onnx", "backbone-int8.tflite"]


def test_backoff_keeps_the_layers_most_sensitive_to_pruning_whole(tmp_path: Path) -> None:
    recipe = tmp_path / "strict.toml"
    recipe.write_text(STRICT)
    out = tmp_path / "strict"
    result = compress(CompressRequest(model="digits-cnn", recipe=recipe, data="digits", out=out))
    assert result.report is not None
    sensitivity = result.report.pruning_sensitivity
    # Pruning a layer alone at 0.9 costs it these points; the first costs most.
    ranked = list(sensitivity)
    assert len(ranked) >= 3 and sensitivity[ranked[0]] >= sensitivity[ranked[-1]]
    tries = [a for a in result.report.backoff if a.step == "prune+distill"]
    assert tries[0].setting == "prune ratio 0.9, distill 0 epochs" and not tries[0].kept
    assert tries[1].setting.startswith(f"prune ratio 0.9 except {ranked[0]} (most sensitive)")
    [kept] = [a for a in tries if a.kept]
    assert kept.accuracy_drop is not None and kept.accuracy_drop <= 5.0
    assert load_bundle(out).report()["pruning_sensitivity"] == sensitivity


def test_transfer_to_new_classes_from_npz(tmp_path: Path) -> None:
    digits = load_digits()
    keep = digits.y < 3
    data = tmp_path / "three.npz"
    np.savez(
        data,
        X=digits.X[keep].reshape(-1, 64),
        y=digits.y[keep],
        labels=np.array(["zero", "one", "two"]),
    )
    recipe = tmp_path / "light.toml"
    recipe.write_text(LIGHT)
    out = tmp_path / "three"
    result = compress(
        CompressRequest(
            model="digits-mlp",
            recipe=recipe,
            data=data,
            out=out,
            num_classes=3,
            name="three-digits",
        )
    )
    bundle = load_bundle(out)
    spec = bundle.head_spec()
    assert bundle.manifest.name == "three-digits"
    assert spec.labels == ["zero", "one", "two"] and spec.num_outputs == 3
    assert {a.precision for a in bundle.manifest.backbones()} == {"int8-dynamic", "fp16"}
    assert result.report is not None
    assert all(s.accuracy is not None and s.accuracy > 0.95 for s in result.report.stages)
    assert json.loads((out / "report.json").read_text())["model"] == "digits-mlp"


def test_image_folder_uses_and_records_the_image_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    digits = load_digits()
    root = tmp_path / "photos"
    for index in range(0, 300):
        folder = root / f"digit-{digits.y[index]}"
        folder.mkdir(parents=True, exist_ok=True)
        # 8-bit photos at 16x16: the bundle's preprocessing must gray, resize and scale them.
        pixels = np.kron(np.round(digits.X[index, 0] * 255), np.ones((2, 2))).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{index}.png")
    out = tmp_path / "bundle"
    result = compress(CompressRequest(model="digits-cnn", recipe="generic", data=root, out=out))
    preprocess = load_bundle(out).manifest.input.preprocess
    assert preprocess.scale == pytest.approx(1 / 255) and preprocess.resize == [8, 8]
    assert preprocess.grayscale
    # Without --num-classes the head keeps its own classes, and so the model's labels.
    assert load_bundle(out).head_spec().labels == [str(i) for i in range(10)]
    assert result.report is not None and result.report.stages[0].accuracy > 0.9


def test_photos_of_different_sizes_are_preprocessed_as_recorded_on_both_sides(
    tmp_path: Path,
) -> None:
    from PIL import Image

    from edgefl.data import open_source

    photos = color_photos(tmp_path / "photos")
    out = tmp_path / "bundle"
    overrides = PreprocessOverrides(resize=[12, 16], mean=[0.5, 0.5, 0.5], std=[0.25])
    result = compress(
        CompressRequest(
            model="tiny_models:color_net",
            recipe="generic",
            data=photos,
            out=out,
            num_classes=3,
            preprocess=overrides,
            # A head trained on three photos a class may well guess; this test is about inputs.
            allow_chance=True,
        )
    )
    bundle = load_bundle(out)
    recorded = bundle.manifest.input.preprocess
    assert (recorded.resize, recorded.mean, recorded.std) == ([12, 16], [0.5] * 3, [0.25])
    assert recorded.scale == pytest.approx(1 / 255) and not recorded.grayscale
    assert bundle.manifest.input.shape == [3, 12, 16]
    assert bundle.head_spec().labels == ["blue", "green", "red"]

    # A board reads the same folder with edgefl.data and the manifest, as the agent does.
    source = open_source(photos)
    board = np.concatenate(list(source.batches(recorded, 5)))
    assert result.data is not None and np.array_equal(board, result.data.X)
    assert np.array_equal(source.y, result.data.y)
    # What that is, computed independently with Pillow: RGB, bilinear resize, normalised.
    with Image.open(source.files[0]) as image:
        assert image.size != (16, 12)
        rgb = np.asarray(image.convert("RGB").resize((16, 12), Image.Resampling.BILINEAR))
    expected = ((rgb.astype(np.float32) / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    assert np.allclose(board[0], expected, atol=0.05)

    # Through the exported artifact, the board scores its held-out photos as the report says.
    _, test = holdout_split(Dataset(board, source.y, source.labels))
    features = load_backbone(bundle.file(bundle.manifest.backbones()[0])).run(test.X)
    score = head_accuracy(bundle.head_spec().layers, bundle.head_weights(), features, test.y)
    assert score == pytest.approx(bundle.report()["stages"][-1]["accuracy"])


def test_head_labels_must_match_the_data_classes(tmp_path: Path) -> None:
    photos = color_photos(tmp_path / "photos", per_class=2)
    grey = PreprocessOverrides(resize=[8, 8], grayscale=True)
    out = tmp_path / "bundle"
    mismatch = r"3 classes \(blue, green, red\) but the model's head has 10 outputs; give"
    with pytest.raises(DataError, match=mismatch + " `num_classes` 3 to train a new head"):
        compress(CompressRequest("digits-cnn", "generic", photos, out, preprocess=grey))
    with pytest.raises(DataError, match="`num_classes` 4 but the data has 3 classes"):
        compress(
            CompressRequest("digits-cnn", "generic", photos, out, num_classes=4, preprocess=grey)
        )
    with pytest.raises(DataError, match="the built-in digits are model inputs already"):
        compress(CompressRequest("digits-cnn", "generic", "digits", out, preprocess=grey))
    assert not out.exists()


@pytest.mark.slow
def test_int8_backoff_keeps_sensitive_nodes_in_float(tmp_path: Path) -> None:
    recipe = tmp_path / "strict-int8.toml"
    recipe.write_text(STRICT_INT8)
    out = tmp_path / "int8"
    result = compress(CompressRequest(model="digits-cnn", recipe=recipe, data="digits", out=out))
    assert result.report is not None
    first, *rest = result.report.backoff
    assert first.reason.startswith("failed verification, ") and not first.kept
    assert rest[-1].kept and "sensitive nodes kept in float" in rest[-1].setting
    stage = result.report.stage("onnx int8")
    assert stage.relative_error is not None and stage.relative_error <= 0.02
    logged = load_bundle(out).report()["backoff"]
    assert [entry["kept"] for entry in logged] == [a.kept for a in result.report.backoff]


ONNX_FP32 = """
description = "fp32 ONNX only"
[[artifacts]]
format = "onnx"
precision = "fp32"
"""


def _digits_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """digits split into a training .npz (first 1000), an eval .npz (the rest), and a recipe."""
    digits = load_digits()
    train, evaluation = tmp_path / "train.npz", tmp_path / "eval.npz"
    np.savez(train, X=digits.X[:1000].reshape(-1, 64), y=digits.y[:1000])
    np.savez(evaluation, X=digits.X[1000:].reshape(-1, 64), y=digits.y[1000:])
    recipe = tmp_path / "fp32.toml"
    recipe.write_text(ONNX_FP32)
    return train, evaluation, recipe


def test_eval_data_scores_every_stage_on_a_set_used_for_nothing_else(tmp_path: Path) -> None:
    train, evaluation, recipe = _digits_files(tmp_path)
    out = tmp_path / "b"
    result = compress(
        CompressRequest("digits-mlp", recipe, train, out, num_classes=10, eval_data=evaluation)
    )
    report = json.loads((out / "report.json").read_text())
    assert (report["train_samples"], report["test_samples"]) == (1000, 797)
    assert report["evaluation"] == f"{evaluation} (797 samples used for nothing else)"
    # The bundle, run as a board runs it on the eval set, scores what the report says.
    bundle = load_bundle(out)
    digits = load_digits()
    features = load_backbone(bundle.file(bundle.manifest.backbones()[0])).run(
        digits.X[1000:].reshape(-1, 64)
    )
    score = head_accuracy(
        bundle.head_spec().layers, bundle.head_weights(), features, digits.y[1000:]
    )
    assert score == pytest.approx(report["stages"][-1]["accuracy"])
    assert result.report is not None and result.report.stages[0].accuracy > 0.8


def test_without_eval_data_the_report_says_it_is_a_held_out_share(tmp_path: Path) -> None:
    train, _, recipe = _digits_files(tmp_path)
    result = compress(CompressRequest("digits-mlp", recipe, train, tmp_path / "b"))
    assert result.report is not None
    assert result.report.evaluation == (
        f"a held-out 201 of 1000 samples of the training data ({train}), not an independent "
        "test set: give `eval_data` for one"
    )


def test_a_seed_makes_a_run_repeatable(tmp_path: Path) -> None:
    train, _, recipe = _digits_files(tmp_path)

    def heads(seed: int, name: str) -> dict[str, np.ndarray]:
        compress(CompressRequest("digits-mlp", recipe, train, tmp_path / name, num_classes=10,
                                 seed=seed))  # fmt: skip
        return load_bundle(tmp_path / name).head_weights()

    first, again, other = heads(3, "a"), heads(3, "b"), heads(4, "c")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_eval_data_with_classes_the_training_data_lacks_is_refused(tmp_path: Path) -> None:
    train, _, recipe = _digits_files(tmp_path)
    eleven = tmp_path / "eleven.npz"
    np.savez(eleven, X=np.zeros((2, 64), np.float32), y=np.array([0, 10]))
    with pytest.raises(DataError, match=r"`eval_data` .*eleven.npz has classes the training data"
                       r" lacks: 10 \(training classes: 0, 1"):  # fmt: skip
        compress(CompressRequest("digits-mlp", recipe, train, tmp_path / "b", eval_data=eleven))
