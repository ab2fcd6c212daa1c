"""Structured pruning: plan without mutating, MACs really drop, the head and features are kept."""

from __future__ import annotations

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
