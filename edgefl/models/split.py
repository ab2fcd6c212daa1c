"""Split a model into a backbone (outputs flat features) and a head (Linear/ReLU layers).

The head is named (a module path such as `fc` or `classifier`) or found (the last `nn.Linear`).
A named `nn.Sequential` head may hold a bottleneck: Linear, ReLU, Linear; Dropout is dropped,
as it is the identity at inference, and a leading Flatten stays in the backbone. The head
becomes an `nn.Sequential` indexed exactly like `edgefl.bundle.HeadSpec`, so its state dict is
the head's safetensors file. What the model applies after the head's last Linear (a sigmoid,
softmax, scaling: inside the named head or in the forward) becomes the head's output operations
(`edgefl.models.head_ops`). A split must compute what the model computes: the split's outputs
are checked against model(x), and a forward that does anything else after the head is refused.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from edgefl.bundle import HeadSpec
from edgefl.errors import ModelLoadError, first_line
from edgefl.models.head_ops import TracedHead, Unsupported, module_ops, output_module, traced_ops


class SplitModel(nn.Module):
    """A model as `outputs(head(backbone(x)))`; the backbone returns (batch, feature_size) features.

    `forward` returns the logits, head(backbone(x)): what training, distillation and accuracy
    use (the output operations keep the order of a row, see `edgefl.head`). `model_outputs`
    applies the output operations too: what the user's model returns.
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Sequential, outputs: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output_ops: list[dict[str, Any]] = list(outputs or [])
        self.outputs = output_module(self.output_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def model_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Return what the model returns: the logits through the output operations."""
        return self.outputs(self.forward(x))

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
        return HeadSpec(
            layers=self.head_layers(), labels=list(labels), outputs=list(self.output_ops)
        )

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
            a leading Flatten, trailing output operations), the backbone does not output (batch,
            features) matching the head's input, or the split computes something else than the
            model (naming the operations the model's forward applies after the head, where they
            can be traced).
    """
    full = copy.deepcopy(model).eval()
    name = head if head is not None else _last_linear(full)
    try:
        module = full.get_submodule(name)
    except AttributeError:
        raise ModelLoadError(f"model has no module {name!r} to use as head") from None
    if name == "":
        raise ModelLoadError("the head cannot be the whole model")
    flatten, head_seq, trailing = _head_sequential(name, module)
    after = _ops_after(model, name)
    if after.backbone is not None:
        backbone: nn.Module = after.backbone
    else:
        parent_name, _, attr = name.rpartition(".")
        setattr(full.get_submodule(parent_name), attr, flatten or nn.Identity())
        backbone = full
    split = SplitModel(backbone, head_seq, trailing + after.ops).eval()
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


# The split runs the very same operations as model(x); only float noise may differ.
_SPLIT_TOLERANCE = 1e-4
_OPS_ALLOWED = (
    "after its last Linear a head may only apply sigmoid, tanh, softmax, log_softmax and "
    "scaling by a positive number plus a shift"
)


def _ops_after(model: nn.Module, name: str) -> TracedHead:
    """The output operations the model's forward applies after its head, and the backbone cut
    before the head when there are any."""
    try:
        found = traced_ops(copy.deepcopy(model).eval(), name)
    except Unsupported as exc:
        raise ModelLoadError(
            f"the model's forward applies {', '.join(exc.names)} after head {name!r}; "
            f"{_OPS_ALLOWED}; make the model return the head's output, or name another `head`"
        ) from None
    return found or TracedHead([], None)


def _check_faithful(model: nn.Module, split: SplitModel, name: str, inputs: torch.Tensor) -> None:
    training = model.training
    try:
        with torch.no_grad():
            expected = model.eval()(inputs)
            got = split.model_outputs(inputs)
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
        what = f"its forward does more than head {name!r} of the features"
        raise ModelLoadError(
            f"splitting the model at head {name!r} changes its outputs (max error {error:.3g} "
            f"on {len(inputs)} samples): {what}, and {_OPS_ALLOWED}; make the model return the "
            "last Linear's output, or name another `head`"
        )


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelLoadError("model has no nn.Linear layer to use as head; name one with `head`")
    return names[-1]


def _head_sequential(
    name: str, module: nn.Module
) -> tuple[nn.Flatten | None, nn.Sequential, list[dict[str, Any]]]:
    """Return the head's leading Flatten (it stays in the backbone), its layers and its
    trailing output operations."""
    children = list(module) if isinstance(module, nn.Sequential) else [module]
    flatten = None
    if children and isinstance(children[0], nn.Flatten):
        flatten, children = children[0], children[1:]
    trailing: list[dict[str, Any]] = []
    while children and (found := module_ops(children[-1])) is not None:
        trailing[:0] = found
        children = children[:-1]
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
                "Linear, ReLU and Dropout layers (and a Flatten first, and output operations "
                "last: Sigmoid, Tanh, Softmax, LogSoftmax)"
            )
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ModelLoadError(f"head {name!r} holds no nn.Linear layer")
    if isinstance(layers[0], nn.ReLU):
        raise ModelLoadError(f"head {name!r} must start with a Linear layer")
    return flatten, nn.Sequential(*layers), trailing


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
