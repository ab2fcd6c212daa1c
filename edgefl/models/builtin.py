"""Built-in models, defined here so nothing is downloaded.

digits-cnn, digits-mlp, mobilenet-v2 and resnet18.

The digits models are pretrained on first use (seconds, deterministic); digits-cnn is cached under
$EDGEFL_CACHE (default ~/.cache/edgefl). mobilenet-v2 and resnet18 are the standard ImageNet
architectures with random weights unless the user passes weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgefl.atomic import replacing
from edgefl.bundle import Preprocess
from edgefl.data import DIGITS_IMAGE_PREPROCESS, fl_digits_split, holdout_split, load_digits

IMAGENET_PREPROCESS = Preprocess(
    scale=1.0 / 255.0,
    mean=[0.485, 0.456, 0.406],
    std=[0.229, 0.224, 0.225],
    resize=[224, 224],
    layout="NCHW",
)
# Bump when the digits-cnn architecture or its training changes, so stale caches are not reused.
DIGITS_CNN_CACHE = "digits-cnn-v2.safetensors"


def cache_dir() -> Path:
    """Return the cache directory: $EDGEFL_CACHE, else ~/.cache/edgefl."""
    return Path(os.environ.get("EDGEFL_CACHE") or Path.home() / ".cache" / "edgefl")


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: three 3x3 convs, a 64-wide bottleneck, a linear head `fc`."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bottleneck(self.features(x)))


class DigitsMLP(nn.Module):
    """The FL-digits model of DESIGN.md: backbone Linear(64,128)-ReLU-Linear(128,64)-ReLU, head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x.flatten(1)))


def _make_divisible(value: float, divisor: int = 8) -> int:
    # MobileNetV2 keeps every width a multiple of 8, never dropping more than 10%.
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1; residual when shapes match."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(inp, hidden, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, torchvision's layout (`classifier.1` head)."""

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        channels = _make_divisible(32)
        layers: list[nn.Module] = [_conv_bn(3, channels, 3, 2)]
        for expand, width, repeats, stride in self.SETTINGS:
            out = _make_divisible(width)
            for i in range(repeats):
                layers.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        self.last_channel = _make_divisible(1280)
        layers.append(_conv_bn(channels, self.last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, inp: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with torchvision's module names (`layer1`..`layer4`, `fc`)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        stages: list[nn.Sequential] = []
        inp = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(BasicBlock(inp, width, stride), BasicBlock(width, width, 1))
            )
            inp = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass
class BuiltinModel:
    """A built-in model: how to build it, its input, preprocessing, labels and head."""

    name: str
    architecture: Callable[[], nn.Module]
    input_shape: list[int]
    preprocess: Preprocess
    labels: list[str]
    head: str
    description: str
    pretrain: Callable[[], nn.Module] | None = None
    aliases: list[str] = field(default_factory=list)


def pretrained_digits_cnn() -> nn.Module:
    """Return digits-cnn trained on the digits train split (80%, seed 0), cached after first use.

    Training is deterministic: seed 0, 12 epochs of Adam (lr 0.003, batch 32); it takes seconds.
    """
    path = cache_dir() / DIGITS_CNN_CACHE
    model = DigitsCNN()
    if path.is_file():
        try:
            model.load_state_dict(load_file(path))
            return model.eval()
        except (OSError, RuntimeError, SafetensorError):  # corrupt or stale: retrain
            path.unlink(missing_ok=True)
    train, _ = holdout_split(load_digits())
    with _seeded(0):
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
        X, y = torch.from_numpy(train.X), torch.from_numpy(train.y)
        generator = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(12):
            for batch in torch.randperm(len(y), generator=generator).split(32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
                optimizer.step()
    model.eval()
    # Write beside, then rename: concurrent first uses must never read half a file.
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model


def pretrained_digits_mlp() -> nn.Module:
    """Return the FL-digits model pretrained as DESIGN.md fixes: seed 0, 60 full-batch Adam steps
    (lr 0.01) on the 30% central split."""
    (X, y), _, _ = fl_digits_split()
    with _seeded(0):
        model = DigitsMLP()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        inputs, targets = torch.from_numpy(np.asarray(X)), torch.from_numpy(np.asarray(y))
        for _ in range(60):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


class _seeded:
    """Seed torch and use one thread for a block, restoring both afterwards.

    One thread makes pretraining give the same weights on every machine (float sums do not
    depend on the core count), and on these tiny batches it is no slower.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.get_rng_state()
        self.threads = torch.get_num_threads()
        torch.manual_seed(self.seed)
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.state)
        torch.set_num_threads(self.threads)


_DIGIT_LABELS = [str(i) for i in range(10)]
_IMAGENET_LABELS = [str(i) for i in range(1000)]

BUILTINS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            "digits-cnn",
            DigitsCNN,
            [1, 8, 8],
            DIGITS_IMAGE_PREPROCESS,
            _DIGIT_LABELS,
            "fc",
            "small CNN on 1x8x8 digits, trained on first use and cached",
            pretrain=pretrained_digits_cnn,
        ),
        BuiltinModel(
            "digits-mlp",
            DigitsMLP,
            [64],
            DIGITS_IMAGE_PREPROCESS,
            _DIGIT_LABELS,
            "head",
            "the FL-digits MLP of DESIGN.md (64-128-64 backbone, 64->10 head), pretrained",
            pretrain=pretrained_digits_mlp,
        ),
        BuiltinModel(
            "mobilenet-v2",
            MobileNetV2,
            [3, 224, 224],
            IMAGENET_PREPROCESS,
            _IMAGENET_LABELS,
            "classifier.1",
            "MobileNetV2, 224x224 RGB, 1000 classes, random init",
            aliases=["mobilenet_v2", "mobilenetv2"],
        ),
        BuiltinModel(
            "resnet18",
            ResNet18,
            [3, 224, 224],
            IMAGENET_PREPROCESS,
            _IMAGENET_LABELS,
            "fc",
            "ResNet-18, 224x224 RGB, 1000 classes, random init",
            aliases=["resnet-18"],
        ),
    )
}


def find_builtin(name: str) -> BuiltinModel | None:
    """Return the built-in model called `name` (or one of its aliases), else None."""
    for model in BUILTINS.values():
        if name == model.name or name in model.aliases:
            return model
    return None
