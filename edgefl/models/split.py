"""Split a model into a backbone (outputs flat features) and a head (Linear/ReLU layers).

The head is named (a module path such as `fc` or `classifier`) or found (the last `nn.Linear`).
A named `nn.Sequential` head may hold a bottleneck: Linear, ReLU, Linear; Dropout is dropped,
as it is the identity at inference, and a leading Flatten stays in the backbone. The head
becomes an `nn.Sequential` indexed exactly like `edgefl.bundle.HeadSpec`, so its state dict is
the head's safetensors file. A split must compute what the model computes: head(backbone(x))
is checked against model(x), and a forward that does more after the head is refused.
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


def split_model(
    model: nn.Module, head: str | None, example: torch.Tensor, inputs: torch.Tensor | None = None
) -> SplitModel:
    """Split a copy of `model` into backbone and head; the original is left untouched.

    Args:
        model: the full model (eval mode).
        head: the module path of the head (`fc`, `classifier`, `classifier.1`), or None to take
            the last `nn.Linear`.
        example: an input batch, used to check the backbone returns flat features.
        inputs: real samples on which head(backbone(x)) must equal model(x); default `example`.

    Returns:
        The split model, in eval mode.

    Raises:
        ModelLoadError: the head is not found, holds layers other than Linear/ReLU/Dropout (and
            a leading Flatten), the backbone does not output (batch, features) matching the
            head's input, or the split computes something else than the model (naming the
            operations the model's forward applies after the head, where they can be traced).
    """
    full = copy.deepcopy(model).eval()
    name = head if head is not None else _last_linear(full)
    try:
        module = full.get_submodule(name)
    except AttributeError:
        raise ModelLoadError(f"model has no module {name!r} to use as head") from None
    if name == "":
        raise ModelLoadError("the head cannot be the whole model")
    flatten, head_seq = _head_sequential(name, module)
    parent_name, _, attr = name.rpartition(".")
    setattr(full.get_submodule(parent_name), attr, flatten or nn.Identity())
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
    _check_faithful(model, split, name, example if inputs is None else inputs)
    return split


# head(backbone(x)) runs the very same operations as model(x); only float noise may differ.
_SPLIT_TOLERANCE = 1e-4


def _check_faithful(model: nn.Module, split: SplitModel, name: str, inputs: torch.Tensor) -> None:
    training = model.training
    try:
        with torch.no_grad():
            expected = model.eval()(inputs)
            got = split(inputs)
    finally:
        model.train(training)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        shape = list(expected.shape) if isinstance(expected, torch.Tensor) else type(expected)
        raise ModelLoadError(
            f"the model outputs {shape}, but head {name!r} outputs {list(got.shape)}; a model "
            "must return its head's logits"
        )
    error = float((expected - got).abs().max()) if expected.numel() else 0.0
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    if not error <= _SPLIT_TOLERANCE * scale:
        after = _operations_after(model, name)
        what = (
            f"its forward applies {', '.join(after)} after head {name!r}"
            if after
            else f"its forward does more than head {name!r} of the features"
        )
        raise ModelLoadError(
            f"splitting the model at head {name!r} changes its outputs (max error {error:.3g} "
            f"on {len(inputs)} samples): {what}, and a head holds only Linear and ReLU layers; "
            "make the model return the last Linear's output, or name another `head`"
        )


def _operations_after(model: nn.Module, name: str) -> list[str]:
    """Name the operations the model's forward applies to its head's output (fx-traced)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # not every model traces; the caller then names no operation
        return []
    in_head = [
        node
        for node in graph.nodes
        if node.op == "call_module" and (node.target == name or node.target.startswith(name + "."))
    ]
    if not in_head:
        return []
    names: list[str] = []
    seen = set(in_head)
    frontier = [in_head[-1]]
    while frontier:
        for user in frontier.pop(0).users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            frontier.append(user)
            if user.op == "call_module":
                names.append(type(model.get_submodule(str(user.target))).__name__)
            else:
                names.append(getattr(user.target, "__name__", str(user.target)))
    return names


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelLoadError("model has no nn.Linear layer to use as head; name one with `head`")
    return names[-1]


def _head_sequential(name: str, module: nn.Module) -> tuple[nn.Flatten | None, nn.Sequential]:
    """Return the head's leading Flatten (it stays in the backbone) and its layers."""
    children = list(module) if isinstance(module, nn.Sequential) else [module]
    flatten = None
    if children and isinstance(children[0], nn.Flatten):
        flatten, children = children[0], children[1:]
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
                "Linear, ReLU and Dropout layers (and a Flatten first)"
            )
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ModelLoadError(f"head {name!r} holds no nn.Linear layer")
    if isinstance(layers[0], nn.ReLU):
        raise ModelLoadError(f"head {name!r} must start with a Linear layer")
    return flatten, nn.Sequential(*layers)


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
