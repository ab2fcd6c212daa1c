"""Split a model into a backbone (outputs flat features) and a head (Linear/ReLU layers).

The head is named (a module path such as `fc` or `classifier`) or found (the last `nn.Linear`).
A named `nn.Sequential` head may hold a bottleneck: Linear, ReLU, Linear; Dropout is dropped,
as it is the identity at inference. The head becomes an `nn.Sequential` indexed exactly like
`edgefl.bundle.HeadSpec`, so its state dict is the head's safetensors file.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from edgefl.bundle import HeadSpec
from edgefl.errors import ModelLoadError, first_line


class SplitModel(nn.Module):
    """A model as `head(backbone(x))`; the backbone returns (batch, feature_size) features."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def feature_size(self) -> int:
        """The number of features the backbone outputs (the head's input size)."""
        return int(self.head_linears()[0].in_features)

    def head_linears(self) -> list[nn.Linear]:
        """Return the head's Linear layers in order."""
        return [m for m in self.head if isinstance(m, nn.Linear)]

    def head_layers(self) -> list[dict[str, Any]]:
        """Return the head's layer spec, as `HeadSpec.layers`."""
        layers: list[dict[str, Any]] = []
        for module in self.head:
            if isinstance(module, nn.Linear):
                layers.append(
                    {"kind": "linear", "in": module.in_features, "out": module.out_features}
                )
            else:
                layers.append({"kind": "relu"})
        return layers

    def head_spec(self, labels: list[str]) -> HeadSpec:
        """Return the head spec with its output labels."""
        return HeadSpec(layers=self.head_layers(), labels=list(labels))

    def head_weights(self) -> dict[str, np.ndarray]:
        """Return the head parameters as float32 arrays, named `{index}.weight` / `{index}.bias`."""
        return {
            k: v.detach().cpu().numpy().astype(np.float32)
            for k, v in self.head.state_dict().items()
        }


def split_model(model: nn.Module, head: str | None, example: torch.Tensor) -> SplitModel:
    """Split a copy of `model` into backbone and head; the original is left untouched.

    Args:
        model: the full model (eval mode).
        head: the module path of the head (`fc`, `classifier`, `classifier.1`), or None to take
            the last `nn.Linear`.
        example: an input batch, used to check the backbone returns flat features.

    Returns:
        The split model, in eval mode.

    Raises:
        ModelLoadError: the head is not found, holds layers other than Linear/ReLU/Dropout, or
            the backbone does not output (batch, features) matching the head's input.
    """
    full = copy.deepcopy(model).eval()
    name = head if head is not None else _last_linear(full)
    try:
        module = full.get_submodule(name)
    except AttributeError:
        raise ModelLoadError(f"model has no module {name!r} to use as head") from None
    if name == "":
        raise ModelLoadError("the head cannot be the whole model")
    head_seq = _head_sequential(name, module)
    parent_name, _, attr = name.rpartition(".")
    setattr(full.get_submodule(parent_name), attr, nn.Identity())
    split = SplitModel(full, head_seq).eval()
    try:
        with torch.no_grad():
            features = split.backbone(example)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"the model does not accept inputs of shape {list(example.shape[1:])}: "
            f"{first_line(exc)}"
        ) from exc
    if features.dim() != 2 or features.shape[1] != split.feature_size:
        raise ModelLoadError(
            f"without head {name!r} the model outputs shape {list(features.shape)}, not flat "
            f"features of size {split.feature_size}; name the head with `head`"
        )
    return split


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelLoadError("model has no nn.Linear layer to use as head; name one with `head`")
    return names[-1]


def _head_sequential(name: str, module: nn.Module) -> nn.Sequential:
    children = list(module) if isinstance(module, nn.Sequential) else [module]
    layers: list[nn.Module] = []
    for child in children:
        if isinstance(child, nn.Linear):
            layers.append(child)
        elif isinstance(child, nn.ReLU):
            layers.append(nn.ReLU())
        elif isinstance(child, nn.Dropout):
            continue
        else:
            raise ModelLoadError(
                f"head {name!r} holds {type(child).__name__}; a head may only hold "
                "Linear, ReLU and Dropout layers"
            )
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ModelLoadError(f"head {name!r} holds no nn.Linear layer")
    if isinstance(layers[0], nn.ReLU):
        raise ModelLoadError(f"head {name!r} must start with a Linear layer")
    return nn.Sequential(*layers)


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """Return the backbone's blocks in forward order, for `--finetune N` (the last N unfreeze).

    A block is a top-level child with parameters; an `nn.Sequential` child (a ResNet stage,
    MobileNet's `features`) counts as its own children, so N counts residual blocks.
    """
    blocks: list[nn.Module] = []
    for child in backbone.children():
        parts = list(child.children()) if isinstance(child, nn.Sequential) else [child]
        blocks.extend(p for p in parts if any(True for _ in p.parameters()))
    return blocks
