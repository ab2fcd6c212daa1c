"""Tiny user models and photos for tests; a model loads as `tiny_models:FACTORY`, like a user's
`package.module:factory`. Small enough that compressing one takes a second or two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def color_net() -> nn.Module:
    """Any-size RGB images -> 3 classes: a 3x3 conv, global average pooling, a linear head `fc`."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        model = nn.Sequential()
        model.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
        model.add_module("relu", nn.ReLU())
        model.add_module("pool", nn.AdaptiveAvgPool2d(1))
        model.add_module("flat", nn.Flatten())
        model.add_module("fc", nn.Linear(8, 3))
    finally:
        torch.set_rng_state(generator_state)
    return model


def color_photos(root: Path, per_class: int = 6) -> Path:
    """An ImageFolder of 3 classes of RGB photos of different sizes, told apart by colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(("blue", "green", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            height, width = (int(v) for v in rng.integers(9, 30, size=2))
            pixels = rng.integers(0, 90, size=(height, width, 3))
            pixels[..., 2 - index] += 160  # blue lights channel 2, green 1, red 0
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


class _PitchLike(nn.Module):
    """Like torchcrepe's CREPE: a forward with an `embed` switch (so torch.fx cannot trace it)
    that applies a sigmoid after its last Linear, `classifier`."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*list(mlp.children())[:-1])
        self.classifier = list(mlp.children())[-1]

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = self.body(x.flatten(1))
        if embed:
            return x
        return torch.sigmoid(self.classifier(x))


def pitch_like() -> nn.Module:
    """The pretrained FL-digits MLP with a sigmoid after its head, in an untraceable forward."""
    from edgefl.models.builtin import pretrained_digits_mlp

    return _PitchLike(pretrained_digits_mlp()).eval()
