"""Recipes: the shipped ones load; unknown keys, names and bad values are errors naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.compression.recipe import available_recipes, load_recipe, recipe_toml
from edgefl.errors import RecipeError

MINIMAL = """
description = "test"
[[artifacts]]
format = "onnx"
precision = "fp32"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def test_shipped_recipes_load_with_their_artifacts() -> None:
    assert {"raspberry-pi", "jetson", "generic"} <= set(available_recipes())
    pi = load_recipe("raspberry-pi")
    assert [(a.format, a.precision) for a in pi.artifacts] == [("onnx", "int8"), ("tflite", "int8")]
    assert pi.prune is not None and pi.prune.ratio == 0.5 and pi.distill is not None
    assert pi.max_accuracy_drop == 1.0
    assert load_recipe("jetson").artifacts[0].file == "backbone-fp16.onnx"
    generic = load_recipe("generic")
    assert generic.prune is None and [a.file for a in generic.artifacts] == ["backbone-fp32.onnx"]


def test_recipe_from_a_path(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.name == "mine" and recipe.latency_threads == 1
    assert recipe.tolerance("fp32") == pytest.approx(1e-3)


def test_unknown_recipe_lists_the_available_ones() -> None:
    with pytest.raises(
        RecipeError, match=r"unknown recipe 'rasberry-pi'; available recipes: .*raspberry-pi"
    ):
        load_recipe("rasberry-pi")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nowhere/x.toml")


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("max_acuracy_drop = 1.0\n", "'max_acuracy_drop'"),
        ("[prune]\nratio = 0.5\nimportanse = 'l1'\n", "'prune.importanse'"),
        ("[distill]\nepoch = 3\n", "'distill.epoch'"),
        ("[verify]\ntolerence = 0.1\n", "'verify.tolerence'"),
    ],
)
def test_unknown_key_names_key_and_file(tmp_path: Path, extra: str, key: str) -> None:
    path = write(tmp_path, extra + MINIMAL if not extra.startswith("[") else MINIMAL + extra)
    with pytest.raises(RecipeError, match=rf"{path}: unknown key {key}"):
        load_recipe(path)


def test_unknown_key_inside_an_artifact(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "quantise = true\n")
    with pytest.raises(RecipeError, match=r"unknown key 'artifacts\[0\]\.quantise'"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "[prune]\nratio = 1.5\n", "'prune.ratio' must be in"),
        (
            MINIMAL + "[prune]\nimportance = 'magic'\n",
            "'prune.importance' must be one of l1, l2, taylor, random",
        ),
        (MINIMAL + "[distill]\nalpha = 2\n", "'distill.alpha' must be in"),
        ('[[artifacts]]\nformat = "tflite"\nprecision = "fp16"\n', "fp32, int8 for tflite"),
        (
            '[[artifacts]]\nformat = "coreml"\n',
            "'artifacts\\[0\\].format' must be one of onnx, tflite",
        ),
        ('description = "no artifacts"\n', "must list at least one artifact"),
        (MINIMAL + "[verify]\ntolerance = { int4 = 0.1 }\n", "is not a precision"),
        ("max_accuracy_drop = 'one'\n" + MINIMAL, "'max_accuracy_drop' must be a number"),
        ("this is = not toml ==", "not valid TOML"),
        # Once silently replaced by the default, or crashing with a TypeError/AttributeError.
        ("latency_threads = 0\n" + MINIMAL, "'latency_threads' must be an integer >= 1, got 0"),
        ("latency_threads = 1.5\n" + MINIMAL, "'latency_threads' must be an integer >= 1"),
        ("head_epochs = 0\n" + MINIMAL, "'head_epochs' must be an integer >= 1, got 0"),
        (MINIMAL + "[verify]\nsamples = 0\n", "'verify.samples' must be an integer >= 1"),
        (MINIMAL + "[verify]\nmin_top1_agreement = 'high'\n", "'verify.min_top1_agreement'"),
        (MINIMAL + "[verify]\ntolerance = 0.1\n", "'verify.tolerance' must be a table"),
        (MINIMAL + "[prune]\niterative_steps = true\n", "'prune.iterative_steps' must be"),
        (MINIMAL + 'activations = "int4"\n', "'artifacts\\[0\\].activations' must be one of"),
        (MINIMAL + "[backoff]\ntries = 0\n", "'backoff.tries' must be an integer >= 1"),
        (MINIMAL + "[backoff]\nresolution = 1.5\n", "'backoff.resolution' must be in"),
        (MINIMAL + "[backoff]\nseconds = -1\n", "'backoff.seconds' must be > 0"),
    ],
)
def test_bad_values_are_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_a_recipe_importance_may_name_a_users_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"edgefl_recipe_importance_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text("def make():\n    return None\n")
    (tmp_path / f"{name}_broken.py").write_text("import torch_pruning_typo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(write(tmp_path, MINIMAL + f'[prune]\nimportance = "{name}:make"\n'))
    assert recipe.prune is not None and recipe.prune.importance == f"{name}:make"
    broken = write(tmp_path, MINIMAL + f'[prune]\nimportance = "{name}_broken:make"\n')
    with pytest.raises(RecipeError, match=r"'prune\.importance' cannot import module"):
        load_recipe(broken)
    with pytest.raises(RecipeError, match=r"or package\.module:factory, got 'l3'"):
        load_recipe(write(tmp_path, MINIMAL + '[prune]\nimportance = "l3"\n'))


@pytest.mark.parametrize("name", ["raspberry-pi", "generic", "jetson"])
def test_a_recipe_written_as_toml_reads_back_the_same(tmp_path: Path, name: str) -> None:
    recipe = load_recipe(name)
    again = load_recipe(write(tmp_path, recipe_toml(recipe)))
    ignored = {"path": "", "name": ""}
    assert {**again.to_dict(), **ignored} == {**recipe.to_dict(), **ignored}
