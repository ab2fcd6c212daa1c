"""Structured pruning: plan without mutating, MACs really drop, the head and features are kept."""

from __future__ import annotations

import sys

import pytest
import torch

from edgefl.compression.distill import predict
from edgefl.compression.prune import apply_pruning, plan_pruning
from edgefl.compression.recipe import PruneStep
from edgefl.data import holdout_split, load_digits
from edgefl.errors import RecipeError
from edgefl.models import load_model, split_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return holdout_split(load_digits())


@pytest.fixture
def split(digits):
    train, _ = digits
    return split_model(load_model("digits-cnn"), None, torch.from_numpy(train.X[:2]))


def test_plan_does_not_touch_the_model(split, digits) -> None:
    train, _ = digits
    example = torch.from_numpy(train.X[:2])
    before = predict(split, train.X[:20])
    plan = plan_pruning(split, example, PruneStep(ratio=0.5))
    assert plan.macs_removed >= 0.4
    assert {c.name for c in plan.layers} == {"features.0", "features.3", "features.7"}
    assert all(c.after == c.before // 2 for c in plan.layers)
    assert (predict(split, train.X[:20]) == before).all()
    assert split.backbone.features[0].out_channels == 32


def test_apply_matches_the_plan_and_keeps_head_and_features(split, digits) -> None:
    train, _ = digits
    example = torch.from_numpy(train.X[:2])
    head_before = {k: v.clone() for k, v in split.head.state_dict().items()}
    plan = plan_pruning(split, example, PruneStep(ratio=0.5))
    applied = apply_pruning(split, example, PruneStep(ratio=0.5))
    assert applied.macs_after == plan.macs_after and applied.params_after == plan.params_after
    assert split.backbone.features[0].out_channels == 16
    assert split.feature_size == 64 and split.backbone(example).shape == (2, 64)
    for key, value in split.head.state_dict().items():
        assert torch.equal(value, head_before[key])


def test_ignored_layers_and_feature_pruning(split, digits) -> None:
    train, _ = digits
    example = torch.from_numpy(train.X[:2])
    plan = plan_pruning(split, example, PruneStep(ratio=0.5, ignore_layers=["features.0"]))
    assert "features.0" not in {c.name for c in plan.layers}
    with pytest.raises(RecipeError, match=r"'features\.99', which is not a backbone module"):
        plan_pruning(split, example, PruneStep(ratio=0.5, ignore_layers=["features.99"]))
    free = plan_pruning(split, example, PruneStep(ratio=0.5, keep_features=False))
    assert ("bottleneck.1", 64, 32) in {(c.name, c.before, c.after) for c in free.layers}


@pytest.mark.parametrize("importance", ["l1", "random", "taylor"])
def test_importances_prune_to_the_same_width(split, digits, importance: str) -> None:
    train, _ = digits
    example = torch.from_numpy(train.X[:2])
    plan = apply_pruning(
        split, example, PruneStep(ratio=0.25, importance=importance), (train.X, train.y)
    )
    assert [c.after for c in plan.layers] == [24, 48, 48]
    assert predict(split, train.X[:3]).shape == (3, 10)


def test_taylor_without_data_is_an_error(split, digits) -> None:
    with pytest.raises(RecipeError, match="taylor' needs data"):
        plan_pruning(split, torch.from_numpy(digits[0].X[:2]), PruneStep(importance="taylor"))


USER_IMPORTANCE = """
import torch
import torch_pruning as tp

class Last(tp.importance.Importance):
    # Ranks later channels as more important, so the first ones are cut.
    def __call__(self, group, **kwargs):
        _, idxs = group[0]
        return torch.arange(len(idxs), dtype=torch.float32)

def make():
    return Last()

instance = Last()

def not_an_importance():
    return 7
"""


@pytest.fixture
def importance_module(tmp_path, monkeypatch: pytest.MonkeyPatch):
    name = f"edgefl_test_importance_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(
        USER_IMPORTANCE.replace("tp.utils.torch", "__import__('torch')")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("attr", ["make", "instance", "Last"])
def test_a_users_importance_from_a_module_decides_what_is_cut(
    split, digits, importance_module: str, attr: str
) -> None:
    example = torch.from_numpy(digits[0].X[:2])
    first = split.backbone.features[0].weight.detach().clone()
    plan = apply_pruning(
        split, example, PruneStep(ratio=0.5, importance=f"{importance_module}:{attr}")
    )
    assert plan.importance == f"{importance_module}:{attr}"
    assert [c.after for c in plan.layers] == [16, 32, 32]
    # "Last" keeps the later half of the channels: the first kept filter was filter 16.
    assert torch.equal(split.backbone.features[0].weight[0], first[16])


def test_an_importance_object_is_used_as_given(split, digits, importance_module: str) -> None:
    import importlib

    module = importlib.import_module(importance_module)
    example = torch.from_numpy(digits[0].X[:2])
    plan = plan_pruning(split, example, PruneStep(ratio=0.5, importance=module.Last()))
    assert plan.importance == "Last" and [c.after for c in plan.layers] == [16, 32, 32]


def test_bad_importances_are_one_line_recipe_errors(split, digits, importance_module: str) -> None:
    example = torch.from_numpy(digits[0].X[:2])
    cases = [
        (f"{importance_module}:not_an_importance", "returned int, not a tp.importance.Importance"),
        (f"{importance_module}:nope", "has no 'nope'"),
        ("edgefl_no_such_module:make", "cannot import module 'edgefl_no_such_module'"),
        ("l3", "unknown pruning importance 'l3'"),
    ]
    for spec, message in cases:
        with pytest.raises(RecipeError, match=message):
            plan_pruning(split, example, PruneStep(ratio=0.5, importance=spec))
    with pytest.raises(RecipeError, match=r"int is not a tp\.importance\.Importance"):
        plan_pruning(split, example, PruneStep(ratio=0.5, importance=3))
