"""A head's output operations in torch: find what a model's forward applies after its head.

The operations are those of `edgefl.head.OUTPUT_OPS` (sigmoid, tanh, softmax and log-softmax over
a sample's outputs, scaling by a positive number plus a shift). They are found by tracing the
forward with torch.fx, arguments with defaults fixed to them (so a Python `if` on an `embed=False`
switch, as torchcrepe's CREPE has, traces). When the forward applies them, the backbone becomes
the traced graph cut at the head's input: replacing the head by an identity would leave them in
the backbone, applied to the features. The split is then checked end to end
(`edgefl.models.split`).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgefl.head import check_output_ops

OutputOp = dict[str, Any]


class Affine(nn.Module):
    """x·scale + shift, with plain float attributes (no parameters, nothing in the state dict)."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def output_module(ops: list[OutputOp]) -> nn.Sequential:
    """Return the torch modules of output operations, in order.

    Raises:
        ValueError: an operation `edgefl.head.check_output_ops` refuses.
    """
    check_output_ops(ops)
    modules: list[nn.Module] = []
    for op in ops:
        kind = op["op"]
        if kind == "sigmoid":
            modules.append(nn.Sigmoid())
        elif kind == "tanh":
            modules.append(nn.Tanh())
        elif kind == "softmax":
            modules.append(nn.Softmax(dim=-1))
        elif kind == "log_softmax":
            modules.append(nn.LogSoftmax(dim=-1))
        else:
            modules.append(Affine(op.get("scale", 1.0), op.get("shift", 0.0)))
    return nn.Sequential(*modules)


def module_ops(module: nn.Module) -> list[OutputOp] | None:
    """Return the output operations of a head's trailing module, or None when it is not one."""
    if isinstance(module, nn.Sigmoid):
        return [{"op": "sigmoid"}]
    if isinstance(module, nn.Tanh):
        return [{"op": "tanh"}]
    if isinstance(module, nn.Softmax | nn.LogSoftmax) and module.dim in (-1, 1):
        return [{"op": "softmax" if isinstance(module, nn.Softmax) else "log_softmax"}]
    if isinstance(module, Affine) and module.scale > 0:
        return [{"op": "affine", "scale": module.scale, "shift": module.shift}]
    return None


class Unsupported(Exception):
    """The forward applies operations after the head that are not output operations."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


@dataclass
class TracedHead:
    """What follows a head in a traced forward: its output operations and the cut backbone.

    `backbone` is None when nothing follows (the caller replaces the head by an identity).
    """

    ops: list[OutputOp]
    backbone: torch.fx.GraphModule | None


def traced_ops(model: nn.Module, name: str) -> TracedHead | None:
    """Find the operations the model's forward applies to its head's output, fx-traced.

    Returns:
        The operations in order and, when there are any, the backbone cut at the head's input;
        None when the forward does not trace or the head is not called in it.

    Raises:
        Unsupported: the forward applies operations that are not output operations, or uses the
            head's output more than once; their names are listed.
    """
    try:
        signature = inspect.signature(model.forward)
        fixed = {
            key: parameter.default
            for key, parameter in list(signature.parameters.items())[1:]
            if parameter.default is not inspect.Parameter.empty
        }
        traced = torch.fx.symbolic_trace(model, concrete_args=fixed or None)
    except Exception:  # not every model traces; the caller then checks the outputs only
        return None
    in_head = [
        node
        for node in traced.graph.nodes
        if node.op == "call_module" and (node.target == name or node.target.startswith(name + "."))
    ]
    if not in_head:
        return None
    ops: list[OutputOp] = []
    node = in_head[-1]
    while True:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "output":
            break
        op = _node_op(model, users[0], node) if len(users) == 1 else None
        if op is None:
            raise Unsupported(_names_after(model, node))
        ops.append(op)
        node = users[0]
    if not ops:
        return TracedHead([], None)
    return TracedHead(ops, _cut_at_head(traced, in_head, model))


def _cut_at_head(
    traced: torch.fx.GraphModule, in_head: list[torch.fx.Node], model: nn.Module
) -> torch.fx.GraphModule:
    """The traced graph returning the head's input (after a leading Flatten of the head)."""
    first = next(
        (n for n in in_head if not isinstance(model.get_submodule(str(n.target)), nn.Flatten)),
        in_head[0],
    )
    output = next(n for n in traced.graph.nodes if n.op == "output")
    output.args = (first.args[0],)
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _node_op(model: nn.Module, node: torch.fx.Node, source: torch.fx.Node) -> OutputOp | None:
    if node.op == "call_module":
        found = module_ops(model.get_submodule(str(node.target)))
        return found[0] if found and len(found) == 1 else None
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if node.op not in ("call_function", "call_method"):
        return None
    if name in ("sigmoid", "tanh") and len(node.args) == 1 and not node.kwargs:
        return {"op": name}
    if name in ("softmax", "log_softmax"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return {"op": name} if dim in (-1, 1) else None
    return _arithmetic(target, node.args, source)


_ARITHMETIC: dict[Any, Callable[[float, bool], tuple[float, float] | None]] = {
    # (the constant, whether the head's output is the left operand) -> (scale, shift)
    operator.mul: lambda c, left: (c, 0.0),
    operator.add: lambda c, left: (1.0, c),
    operator.sub: lambda c, left: (1.0, -c) if left else None,
    operator.truediv: lambda c, left: (1.0 / c, 0.0) if left and c else None,
}
_ARITHMETIC.update(
    {
        torch.mul: _ARITHMETIC[operator.mul],
        torch.add: _ARITHMETIC[operator.add],
        "mul": _ARITHMETIC[operator.mul],
        "add": _ARITHMETIC[operator.add],
        "sub": _ARITHMETIC[operator.sub],
        "div": _ARITHMETIC[operator.truediv],
    }
)


def _arithmetic(target: Any, args: tuple[Any, ...], source: torch.fx.Node) -> OutputOp | None:
    rule = _ARITHMETIC.get(target)
    if rule is None or len(args) != 2 or source not in args:
        return None
    left = args[0] is source
    constant = args[1] if left else args[0]
    if isinstance(constant, bool) or not isinstance(constant, int | float):
        return None
    found = rule(float(constant), left)
    if found is None or not found[0] > 0:
        return None
    return {"op": "affine", "scale": found[0], "shift": found[1]}


def _names_after(model: nn.Module, start: torch.fx.Node) -> list[str]:
    names: list[str] = []
    seen = {start}
    frontier = [start]
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
