"""Structured pruning with Torch-Pruning: plan on a copy (for a dry run), then apply.

Channels are really removed, so the exported backbone is smaller and faster. The head is never
pruned, and neither are the channels that feed it: the feature size stays what the head (and
every board's fine-tuned copy of it) expects.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from edgefl.compression.recipe import PruneStep
from edgefl.errors import RecipeError
from edgefl.models.split import SplitModel
from edgefl.plugins import build_plugin, is_plugin_spec

Importance = Any  # tp.importance.Importance; Torch-Pruning ships no type hints


@dataclass
class LayerChange:
    """One layer whose output channels (conv) or features (linear) shrink."""

    name: str
    kind: str
    before: int
    after: int


@dataclass
class PruningPlan:
    """What pruning removes: per layer, and params and MACs of the whole model before/after."""

    ratio: float
    importance: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[LayerChange] = field(default_factory=list)

    @property
    def macs_removed(self) -> float:
        """The fraction of MACs removed (0.0 to 1.0)."""
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_removed(self) -> float:
        """The fraction of parameters removed (0.0 to 1.0)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-able data."""
        data = asdict(self)
        data["macs_removed"] = round(self.macs_removed, 4)
        data["params_removed"] = round(self.params_removed, 4)
        return data


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Return (MACs, parameters) of one forward pass on `example` (batch of one is typical)."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


BUILTIN_IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": tp.importance.GroupTaylorImportance,
    "random": tp.importance.RandomImportance,
}


def make_importance(spec: str | Importance) -> Importance:
    """Return the Torch-Pruning importance a recipe asks for.

    Args:
        spec: a built-in name (l1, l2, taylor, random), `package.module:factory` (the attribute
            is a `tp.importance.Importance` instance, or a class or factory returning one), or
            an importance object.

    Returns:
        A `tp.importance.Importance`.

    Raises:
        RecipeError: an unknown name, a factory that cannot be loaded or returns something
            else, or an object that is not an importance.
    """
    if not isinstance(spec, str):
        if not isinstance(spec, tp.importance.Importance):
            raise RecipeError(
                f"prune importance {type(spec).__name__} is not a tp.importance.Importance"
            )
        return spec
    if is_plugin_spec(spec):
        return build_plugin(
            spec, tp.importance.Importance, "pruning importance", RecipeError,
            kind="tp.importance.Importance",
        )  # fmt: skip
    if spec not in BUILTIN_IMPORTANCES:
        raise RecipeError(
            f"unknown pruning importance {spec!r} ({', '.join(BUILTIN_IMPORTANCES)}, "
            "or package.module:factory)"
        )
    return BUILTIN_IMPORTANCES[spec]()


def importance_name(spec: str | Importance) -> str:
    """Return how a plan or manifest names an importance: its spec, or its object's class."""
    return spec if isinstance(spec, str) else type(spec).__name__


def plan_pruning(
    split: SplitModel,
    example: torch.Tensor,
    step: PruneStep,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> PruningPlan:
    """Work out what `apply_pruning` would remove, on a copy; `split` is not changed.

    Args and raises as `apply_pruning`.
    """
    return apply_pruning(copy.deepcopy(split), example, step, data)


def apply_pruning(
    split: SplitModel,
    example: torch.Tensor,
    step: PruneStep,
    data: tuple[np.ndarray, np.ndarray] | None = None,
) -> PruningPlan:
    """Prune `split` in place: remove `step.ratio` of the channels of every prunable group.

    Args:
        split: the model to prune; its head and the channels feeding the head are kept.
        example: an input batch for tracing and for counting MACs.
        step: ratio, importance, iterative steps, ignored layers (module names in the
            backbone), round_to.
        data: (X, y) samples for gradient-based importances ("taylor", or a user's subclass of
            `tp.importance.GroupTaylorImportance`; needed for those only).

    Returns:
        The plan that was applied.

    Raises:
        RecipeError: an ignored layer name is not a module of the backbone, the importance
            cannot be made (see `make_importance`), or a gradient-based one has no data.
    """
    split.eval()
    macs_before, params_before = count_macs_params(split, example[:1])
    widths_before = _widths(split.backbone)
    ignored = _ignored_modules(split, example, step.ignore_layers, step.keep_features)
    importance = make_importance(step.importance)
    # Taylor-style importances (built-in or a user's subclass) rank channels by gradients.
    needs_gradients = isinstance(importance, tp.importance.GroupTaylorImportance)
    if needs_gradients and data is None:
        name = importance_name(step.importance)
        raise RecipeError(f"prune.importance {name!r} needs data to compute gradients")
    if step.ratio > 0:
        pruner = tp.pruner.BasePruner(
            split,
            example[:1],
            importance=importance,
            pruning_ratio=step.ratio,
            iterative_steps=step.iterative_steps,
            ignored_layers=ignored,
            round_to=step.round_to,
        )
        state = torch.get_rng_state()
        torch.manual_seed(0)  # random importance and nothing else: a plan is reproducible
        try:
            for _ in range(step.iterative_steps):
                if needs_gradients and data is not None:
                    _accumulate_gradients(split, data)
                pruner.step()
        finally:
            torch.set_rng_state(state)
        split.zero_grad(set_to_none=True)
    macs_after, params_after = count_macs_params(split, example[:1])
    widths_after = _widths(split.backbone)
    changes = [
        LayerChange(name, kind, before, widths_after[name][1])
        for name, (kind, before) in widths_before.items()
        if name in widths_after and widths_after[name][1] != before
    ]
    return PruningPlan(
        step.ratio,
        importance_name(step.importance),
        params_before,
        params_after,
        macs_before,
        macs_after,
        changes,
    )


def _widths(backbone: nn.Module) -> dict[str, tuple[str, int]]:
    widths: dict[str, tuple[str, int]] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            widths[name] = ("conv", int(module.out_channels))
        elif isinstance(module, nn.Linear):
            widths[name] = ("linear", int(module.out_features))
    return widths


def _ignored_modules(
    split: SplitModel, example: torch.Tensor, names: list[str], keep_features: bool
) -> list[nn.Module]:
    ignored: list[nn.Module] = [split.head]
    if keep_features:
        ignored += _feature_layers(split, example)
    modules = dict(split.backbone.named_modules())
    for name in names:
        key = name.removeprefix("backbone.")
        if key not in modules or key == "":
            raise RecipeError(f"prune.ignore_layers names {name!r}, which is not a backbone module")
        ignored.append(modules[key])
    return ignored


def _feature_layers(split: SplitModel, example: torch.Tensor) -> list[nn.Module]:
    layers: list[nn.Module] = []
    # Every layer coupled to the head's input channels (the last conv, a residual stage, a
    # bottleneck Linear) would change the feature size if pruned; Torch-Pruning groups them.
    graph = tp.DependencyGraph().build_dependency(split, example_inputs=example[:1])
    first = split.head_linears()[0]
    group = graph.get_pruning_group(
        first, tp.prune_linear_in_channels, idxs=list(range(first.in_features))
    )
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            layers.append(module)
    return layers


def _accumulate_gradients(split: SplitModel, data: tuple[np.ndarray, np.ndarray]) -> None:
    # Taylor importance reads .grad: one backward pass over up to 256 samples is enough to rank.
    X, y = data
    split.zero_grad(set_to_none=True)
    inputs = torch.from_numpy(np.asarray(X[:256], dtype=np.float32))
    targets = torch.from_numpy(np.asarray(y[:256], dtype=np.int64))
    nn.functional.cross_entropy(split(inputs), targets).backward()
