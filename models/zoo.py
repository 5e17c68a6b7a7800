"""The model zoo: small image classifiers for 28x28 grayscale input, with bundled checkpoints.

Every model takes float32 ``(N, 1, 28, 28)`` pixels in [0, 1], normalises them itself (so the
exported ONNX graph needs no preprocessing beyond scaling to [0, 1]) and returns 10 logits.
Checkpoints are plain float32 state dicts written by ``compressor.models.train``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.errors import ModelLoadError, OptionError

# Fashion-MNIST training-set pixel statistics (of pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DATA_DIR = Path(__file__).parent / "data"


class Normalize(nn.Module):
    """``(x - mean) / std`` with constants, not buffers: exports as ONNX Sub and Div."""

    def __init__(self, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD):
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


class MLP(nn.Module):
    """Flatten -> 784-512-256-10 with ReLU."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 256),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv6(5x5, pad 2) pool conv16(5x5) pool fc120 fc84."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(6, 16, 5),  # 14 -> 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class VGG(nn.Module):
    """VGG-style: (conv3x3-BN-ReLU) x2 then max-pool, at widths 32, 64, 128; MLP head 256."""

    CONFIG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = []
        channels = 1
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))  # 28 -> 14 -> 7 -> 3
            else:
                layers += _conv_bn_relu(channels, int(item))
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 28x28: stem conv 16, three stages of three basic blocks (16, 32, 64)."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(*_conv_bn_relu(1, 16))
        stages: list[nn.Module] = []
        in_channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):  # 28 -> 28 -> 14 -> 7
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, width, stride if i == 0 else 1))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.fc(self.flatten(self.pool(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t == 1), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2-style for 28x28: stem 16, inverted residual stages, 1x1 conv 256, pool, fc."""

    # (expansion t, output channels c, repeats n, first stride s)
    CONFIG: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),  # 28 -> 14
        (6, 32, 3, 2),  # 14 -> 7
        (6, 64, 2, 1),
    )

    def __init__(self, num_classes: int = 10, last_channels: int = 256):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_channels = 16
        for expansion, channels, repeats, stride in self.CONFIG:
            for i in range(repeats):
                blocks.append(
                    InvertedResidual(in_channels, channels, stride if i == 0 else 1, expansion)
                )
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, last_channels, 1, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.fc(self.flatten(self.pool(x)))


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: how to build it and where its bundled checkpoint lives."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = (1, 28, 28)  # per sample, no batch
    num_classes: int = 10

    @property
    def checkpoint(self) -> Path:
        """``models/checkpoints/<name>.pt``: a float32 state dict."""
        return CHECKPOINT_DIR / f"{self.name}.pt"


_ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("mlp", "MLP 784-512-256-10, ReLU", MLP),
        ZooEntry("lenet5", "LeNet-5: two 5x5 convs, max-pool, FC 120-84-10, ReLU", LeNet5),
        ZooEntry("vgg", "VGG-style: six 3x3 conv+BN+ReLU (32-64-128), FC 256", VGG),
        ZooEntry("resnet20", "ResNet-20: 9 basic blocks (16-32-64), global avg pool", ResNet20),
        ZooEntry(
            "mobilenetv2",
            "MobileNetV2-style: 8 inverted residual blocks, ReLU6, 1x1 conv 256",
            MobileNetV2,
        ),
    )
}


def names() -> list[str]:
    """Names of the zoo models, in registry order."""
    return list(_ENTRIES)


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``; an unknown name raises ``OptionError`` listing the valid ones."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise OptionError(
            f"unknown zoo model '{name}'; valid names: {', '.join(names())}"
        ) from None


def load_pretrained(name: str) -> nn.Module:
    """Build zoo model ``name``, load its bundled checkpoint and put it in eval mode."""
    entry = get(name)
    model = entry.build()
    path = entry.checkpoint
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: no bundled checkpoint for '{name}'; "
            f"run `python -m compressor.models.train --models {name}`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # corrupt file or state dict of another architecture
        raise ModelLoadError(f"{path}: cannot load checkpoint for '{name}': {exc}") from exc
    return model.eval()
