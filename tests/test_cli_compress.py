"""`edgefl compress` and `edgefl recipes` from the command line: output, exit codes, bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import color_photos

from edgefl.bundle import load_bundle
from edgefl.cli import main

torch.set_num_threads(1)

FACTORIES = '''
import torch
from torch import nn


class Bessel(nn.Module):
    """A digits model whose backbone uses an operator LiteRT cannot lower."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.special.bessel_j0(x).flatten(1))


def bessel():
    return Bessel()


class SigmoidOut(nn.Module):
    """A model whose forward applies a sigmoid after its last Linear, as pitch trackers do."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return torch.sigmoid(self.fc(self.body(x)))


def sigmoid_out():
    return SigmoidOut()


class CumsumOut(SigmoidOut):
    """A forward that mixes the outputs after the last Linear: no head can hold that."""

    def forward(self, x):
        return self.fc(self.body(x)).cumsum(1)


def cumsum_out():
    return CumsumOut()
'''

TFLITE_ONLY = """
description = "fp32 TFLite only"
[[artifacts]]
format = "tflite"
precision = "fp32"
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"edgefl_cli_factories_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def run(*args: str):
    # A wide terminal, so rich does not wrap the table and paths the assertions read.
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "200"})


def test_recipes_lists_names_with_descriptions() -> None:
    result = run("recipes")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert {"raspberry-pi", "jetson", "generic"} <= set(lines)
    assert "int8 TFLite" in lines["raspberry-pi"] and "fp16" in lines["jetson"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    result = run(
        "compress",
        "--model",
        "digits-cnn",
        "--recipe",
        "raspberry-pi",
        "--data",
        "digits",
        "--out",
        str(out),
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "features.3" in result.output and "MACs 1,886,986 -> 501,514" in result.output
    assert "backbone-int8.onnx, backbone-int8.tflite" in result.output
    assert not out.exists()


def test_compress_writes_a_bundle_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    result = run(
        "compress",
        "--model",
        "digits-mlp",
        "--recipe",
        "jetson",
        "--data",
        "digits",
        "--out",
        str(out),
        "--version",
        "3",
    )
    assert result.exit_code == 0, result.output
    assert "onnx fp16" in result.output and f"bundle written to {out} (version 3)" in result.output
    bundle = load_bundle(out)
    assert bundle.manifest.version == 3
    assert [a.file for a in bundle.manifest.backbones()] == [
        "backbone-fp16.onnx",
        "backbone-fp32.onnx",
    ]


def _bad_inputs(tmp_path: Path, factories: str) -> list[tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a zip file at all")
    empty = tmp_path / "empty-data"
    empty.mkdir()
    bad_recipe = tmp_path / "bad.toml"
    bad_recipe.write_text('prune_ratio = 0.5\n[[artifacts]]\nformat = "onnx"\n')
    tflite = tmp_path / "tflite.toml"
    tflite.write_text(TFLITE_ONLY)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    base = ["--recipe", "generic", "--data", "digits"]
    digits_cnn = ["--model", "digits-cnn", "--data", "digits"]
    allow_chance = ["--data", "digits", "--allow-chance"]
    return [
        (
            ["--model", "digits-cnn", "--weights", str(tmp_path / "none.pt"), *base],
            "weights file .*none.pt not found",
        ),
        (
            ["--model", "digits-cnn", "--weights", str(corrupt), *base],
            "corrupt or not a state dict",
        ),
        (
            ["--model", "edgefl_nowhere.models:make", *base],
            "cannot import module 'edgefl_nowhere.models'",
        ),
        (["--model", f"{factories}:missing", *base], f"module '{factories}' has no 'missing'"),
        (
            ["--model", f"{factories}:cumsum_out", *base],
            "the model's forward applies cumsum after head 'fc'; after its last Linear a head "
            "may only apply sigmoid",
        ),
        (["--model", "resnet18", *base], r"shape \[1, 8, 8\] but the model takes \[3, 224, 224\]"),
        (
            ["--model", "digits-cnn", "--recipe", "generic", "--data", str(empty)],
            "no class subfolders",
        ),
        (
            [*digits_cnn, "--recipe", "rasberry-pi"],
            "unknown recipe 'rasberry-pi'; available recipes:",
        ),
        ([*digits_cnn, "--recipe", str(bad_recipe)], "unknown key 'prune_ratio'"),
        ([*digits_cnn, "--finetune", "some", "--recipe", "generic"], "--finetune takes 'all' or a"),
        (
            # An untrained model, at chance: allowed, so the export is what fails.
            ["--model", f"{factories}:bessel", "--recipe", str(tflite), *allow_chance],
            "cannot lower operator aten.special_bessel_j0.*ONNX path",
        ),
    ]


@pytest.mark.slow
def test_every_bad_input_is_one_line_nonzero_and_leaves_no_bundle(
    tmp_path: Path, factories: str
) -> None:
    for args, message in _bad_inputs(tmp_path, factories):
        out = tmp_path / "bundle"
        result = run("compress", *args, "--out", str(out))
        # The caller's input is wrong: 2; a model the exporter cannot lower is an export
        # that failed: 1 (README, exit codes).
        expected = 1 if "cannot lower" in message else 2
        assert result.exit_code == expected, (args, result.output)
        # torchao, imported by the TFLite path, prints its own library notes to stderr first.
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert errors == lines[-1:], (args, result.stderr)
        assert re.search(message, errors[0]), (message, errors[0])
        assert not out.exists(), args
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], args


def test_nan_in_the_data_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    X = np.random.default_rng(0).uniform(0, 1, (40, 64)).astype(np.float32)
    X[[5, 9, 30], 3] = np.nan
    data = tmp_path / "nan.npz"
    np.savez(data, X=X, y=np.arange(40) % 10)
    out = tmp_path / "b"
    result = run(
        "compress", "--model", "digits-mlp", "--recipe", "generic", "--data", str(data),
        "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: 3 of 40 samples hold NaN or Inf values (first: sample 5); "
        "clean or drop them"
    ]
    assert not out.exists()


ONNX_FP32 = """
description = "fp32 ONNX only"
[[artifacts]]
format = "onnx"
precision = "fp32"
"""


def test_a_random_builtin_says_so(tmp_path: Path) -> None:
    recipe = tmp_path / "fp32.toml"
    recipe.write_text(ONNX_FP32)
    photos = color_photos(tmp_path / "photos", per_class=2)
    args = ["compress", "--model", "mobilenet-v2", "--num-classes", "3", "--recipe", str(recipe)]
    args += ["--data", str(photos), "--resize", "32", "--out", str(tmp_path / "b"), "--dry-run"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert (
        "warning: mobilenet-v2 is randomly initialised (no --weights): its features are random, "
        "so expect chance accuracy; give --weights, or --finetune to train it here"
    ) in result.stderr.splitlines()
    assert "randomly initialised" not in run(*args, "--finetune", "all").stderr


def test_a_bundle_at_chance_accuracy_needs_allow_chance(tmp_path: Path) -> None:
    # Digits with shuffled labels: the pretrained model cannot beat guessing on them.
    digits = np.load(_digits_npz(tmp_path))
    data = tmp_path / "shuffled.npz"
    np.savez(data, X=digits["X"], y=np.random.default_rng(0).permutation(digits["y"]))
    recipe = tmp_path / "fp32.toml"
    recipe.write_text(ONNX_FP32)
    out = tmp_path / "b"
    args = ["compress", "--model", "digits-mlp", "--recipe", str(recipe), "--data", str(data)]
    refused = run(*args, "--out", str(out))
    assert refused.exit_code == 1, refused.output
    assert re.search(r"original\s+torch.*\d!", refused.stdout), refused.stdout
    assert "! at chance accuracy (<= 13.5%): no better than guessing" in refused.stdout
    assert refused.stderr.strip().splitlines() == [
        "error: original at chance accuracy (<= 13.5% on 10 classes): the model has not learnt "
        "these classes; no bundle written (--allow-chance writes it anyway)"
    ]
    assert not out.exists()

    allowed = run(*args, "--out", str(out), "--allow-chance")
    assert allowed.exit_code == 0, allowed.output
    report = json.loads((out / "report.json").read_text())
    assert report["chance_accuracy"] == pytest.approx(0.135, abs=0.001)
    assert [s["at_chance"] for s in report["stages"]] == [True, True]


def _digits_npz(tmp_path: Path) -> Path:
    from edgefl.data import load_digits

    digits = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(path, X=digits.X.reshape(len(digits), -1), y=digits.y)
    return path


TFLITE_INT8 = """
description = "int8 TFLite only"
[[artifacts]]
format = "tflite"
precision = "int8"
calibration_samples = 32
"""


def test_tflite_export_is_quiet_unless_verbose(tmp_path: Path) -> None:
    # A fresh process: TensorFlow and absl log from C++ on their first import, past CliRunner.
    recipe = tmp_path / "tflite.toml"
    recipe.write_text(TFLITE_INT8)
    command = [sys.executable, "-c", "from edgefl.cli import main; main()", "compress"]
    command += ["--model", "digits-mlp", "--recipe", str(recipe), "--data", "digits"]
    quiet = subprocess.run(
        [*command, "--out", str(tmp_path / "quiet")], capture_output=True, text=True, check=False
    )
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert "tflite int8" in quiet.stdout
    verbose = subprocess.run(
        [*command, "--out", str(tmp_path / "verbose"), "--verbose"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verbose.returncode == 0, verbose.stderr
    assert "XNNPACK" in verbose.stderr and "absl" in verbose.stderr


def test_a_model_module_that_fails_on_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"edgefl_cli_broken_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text("import os\nHOME = os.environ['EDGEFL_NO_SUCH_VAR']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run("compress", "--model", f"{name}:make", "--recipe", "generic", "--data", "digits",
                 "--out", str(tmp_path / "b"))  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: importing module '{name}' of model '{name}:make' failed: "
        "KeyError: 'EDGEFL_NO_SUCH_VAR'"
    ]
    sys.modules.pop(name, None)


def test_eval_data_that_does_not_fit_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, X=np.zeros((2, 64), np.float32), y=np.array([0, 1]), labels=["cat", "dog"])
    args = ["--model", "digits-mlp", "--recipe", "generic", "--data", "digits", "--seed", "7"]
    result = run("compress", *args, "--eval-data", str(other), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --eval-data {other} has classes the training data lacks: cat, dog "
        "(training classes: 0, 1, 2, 3, 4, ... (5 more))"
    ]


def test_existing_output_is_kept_without_force(tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--force"]):
        result = run(
            "compress",
            "--model",
            "digits-mlp",
            "--recipe",
            "generic",
            "--data",
            "digits",
            "--out",
            str(out),
            *extra,
        )
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ") and str(out) in result.stderr
        assert (out / "keep.txt").read_text() == "mine"


def test_preprocessing_flags_are_recorded_and_shown_by_a_dry_run(tmp_path: Path) -> None:
    photos = color_photos(tmp_path / "photos", per_class=3)
    out = tmp_path / "bundle"
    base = ["compress", "--model", "tiny_models:color_net", "--recipe", "generic"]
    base += ["--data", str(photos), "--num-classes", "3", "--out", str(out)]
    flags = ["--resize", "10x14", "--mean", "0.4,0.5,0.6", "--std", "0.2"]
    dry = run(*base, *flags, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "inputs [3, 10, 14] NCHW: RGB, resize 10x14" in dry.output
    assert "mean [0.4, 0.5, 0.6], / std [0.2]" in dry.output
    assert not out.exists()
    # A built-in brings its standard preprocessing; --resize changes only the size.
    resnet = run(*base[:2], "resnet18", *base[3:], "--resize", "32", "--dry-run")
    assert resnet.exit_code == 0, resnet.output
    assert (
        "inputs [3, 32, 32] NCHW: RGB, resize 32x32, x0.00392157, - mean [0.485, 0.456, 0.406], "
        "/ std [0.229, 0.224, 0.225]"
    ) in resnet.output
    assert not out.exists()
    # Nine photos train no head beyond guessing; this test is about the preprocessing.
    result = run(*base, *flags, "--allow-chance")
    assert result.exit_code == 0, result.output
    bundle = load_bundle(out)
    recorded = bundle.manifest.input.preprocess
    assert (recorded.resize, recorded.mean, recorded.std) == ([10, 14], [0.4, 0.5, 0.6], [0.2])
    assert bundle.manifest.input.shape == [3, 10, 14]
    assert bundle.head_spec().labels == ["blue", "green", "red"]


def test_photos_of_different_sizes_need_resize_and_bad_values_are_one_line_errors(
    tmp_path: Path,
) -> None:
    photos = color_photos(tmp_path / "photos", per_class=2)
    out = tmp_path / "bundle"
    base = ["compress", "--model", "tiny_models:color_net", "--recipe", "generic"]
    base += ["--data", str(photos), "--num-classes", "3", "--out", str(out)]
    cases = [
        ([], r"images have different sizes \(\d+x\d+ and \d+x\d+\).*--resize HxW"),
        (["--resize", "0x5"], "--resize takes HxW or N with positive sizes .* not '0x5'"),
        (["--resize", "big"], "--resize takes HxW or N"),
        (["--resize", "8", "--mean", "0.5,0.5"], "--mean takes 1 or 3 comma-separated numbers"),
        (["--resize", "8", "--std", "a,b,c"], "--std takes 1 or 3 comma-separated numbers"),
        (["--resize", "8", "--std", "0.2,0,0.2"], "--std values must be positive"),
        (["--resize", "8", "--grayscale", "--mean", "0.1,0.2,0.3"], "--mean has 3 values but"),
        (
            ["--resize", "8", "--grayscale"],
            r"the model does not accept inputs of shape \[1, 8, 8\]",
        ),
    ]
    for extra, message in cases:
        for dry_run in ([], ["--dry-run"]):
            result = run(*base, *extra, *dry_run)
            assert result.exit_code == 2, (extra, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and re.search("^error: " + message, lines[0]), lines
            assert not out.exists(), extra
