"""Load a model from a built-in name or a `package.module:factory`, with optional weights.

Weights are `.safetensors` or a state-dict `.pt`/`.pth` read with `torch.load(weights_only=True)`,
so a weights file can never run code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from edgefl.bundle import Preprocess
from edgefl.errors import ModelLoadError, first_line
from edgefl.models.builtin import BUILTINS, find_builtin
from edgefl.plugins import build_plugin


@dataclass
class LoadedModel:
    """A loaded model with what edgefl knows about it (None where a user factory says nothing)."""

    module: nn.Module
    name: str
    input_shape: list[int] | None
    preprocess: Preprocess | None
    labels: list[str] | None
    head: str | None
    sha256: str
    # A built-in architecture with random weights: no weights file and nothing pretrained.
    random_init: bool = False


def load_model(spec: str, weights: Path | None = None) -> nn.Module:
    """Load a model in eval mode.

    Args:
        spec: a built-in name (see `edgefl.models.builtin.BUILTINS`) or `package.module:factory`,
            where `factory()` returns an `nn.Module`.
        weights: a `.safetensors` or state-dict `.pt`/`.pth` file to load into the model.

    Returns:
        The model, on CPU, in eval mode.

    Raises:
        ModelLoadError: unknown name, module or factory; weights missing, corrupt or not matching.
    """
    return resolve_model(spec, weights).module


def resolve_model(spec: str, weights: Path | None = None) -> LoadedModel:
    """Load a model like `load_model` and return it with its input, preprocessing and labels.

    Raises:
        ModelLoadError: as `load_model`.
    """
    builtin = find_builtin(spec)
    info: tuple[list[int] | None, Preprocess | None, list[str] | None, str | None]
    if builtin is not None:
        if weights is None and builtin.pretrain is not None:
            module = builtin.pretrain()
        else:
            module = builtin.architecture()
        info = (list(builtin.input_shape), builtin.preprocess, list(builtin.labels), builtin.head)
        name = builtin.name
    elif ":" in spec:
        module = _call_factory(spec)
        info = (None, None, None, None)
        name = spec.rsplit(":", 1)[1]
    else:
        known = ", ".join(BUILTINS)
        raise ModelLoadError(
            f"unknown model {spec!r}: give a built-in name ({known}) or package.module:factory"
        )
    if weights is not None:
        load_weights(module, Path(weights))
    module.eval()
    input_shape, preprocess, labels, head = info
    random_init = builtin is not None and builtin.pretrain is None and weights is None
    return LoadedModel(
        module, name, input_shape, preprocess, labels, head, state_sha256(module), random_init
    )


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a weights file into `module` (strict: every key must match in name and shape).

    Raises:
        ModelLoadError: the file is missing, unreadable, or its tensors do not fit the model.
    """
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} not found")
    state: Any
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch.load raise many types for bad files
        raise ModelLoadError(
            f"weights file {path} is corrupt or not a state dict: {first_line(exc)}"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path} does not hold a state dict of tensors")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        raise ModelLoadError(f"weights file {path} does not fit the model: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelLoadError(
                f"weights file {path} does not fit the model: {key} has shape "
                f"{list(tensor.shape)}, the model expects {list(expected[key].shape)}"
            )
    module.load_state_dict(state)


def state_sha256(module: nn.Module) -> str:
    """Return the SHA-256 of the model's state dict serialized as safetensors (sorted keys)."""
    state = {k: v.detach().contiguous() for k, v in sorted(module.state_dict().items())}
    return hashlib.sha256(save(state)).hexdigest()


def _call_factory(spec: str) -> nn.Module:
    return build_plugin(spec, nn.Module, "model", ModelLoadError, kind="torch nn.Module")


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
