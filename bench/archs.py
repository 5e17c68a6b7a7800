"""ImageNet-shaped models for the speed benchmarks, with seeded random weights.

torchvision's model definitions cannot be imported beside the CPU torch 2.13 here (`import
torchvision` fails on its compiled ops), so these are compact definitions of our own with the
same layers, shapes and parameter counts as torchvision's (``resnet18``, ``resnet50``,
``mobilenet_v3_large``, ``efficientnet_b0``, ``vgg16``; tests/bench/test_archs.py checks the
counts against torchvision's published ones) and one in the shape of timm's
``tf_efficientnet_lite0``: no squeeze-excitation, ReLU6, and TensorFlow "SAME" padding computed
from the input's shape at run time (timm's ``Conv2dSame``). With the spatial size fixed, the
exporter folds that Pad into the Conv: its stride-2 convs get asymmetric pads (0, 0, 1, 1).

Every model takes ``(N, 3, 224, 224)`` float32 inputs already normalised with the ImageNet mean
and standard deviation (torchvision's contract) and returns 1000 logits. Weights are random:
``torch.manual_seed(seed)`` then torchvision's initialisation, the BatchNorm scales and shifts
drawn at random and the running statistics measured on seeded random images (one train-mode
pass), so they are far from the trivial (0, 1) and folding BatchNorm into the convolutions is
exercised, while activations stay at a sane scale through 50 layers. Random weights give no
accuracy figure: these models are for speed only.

    python bench/archs.py               # parameter counts
    python -c "import archs; archs.export('resnet18', 'resnet18.onnx')"
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (3, 224, 224)
NUM_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATISTICS_SAMPLES = 16  # random images the BatchNorm running statistics are measured on
TF_BN_EPS = 1e-3  # the EfficientNets' (TensorFlow's) BatchNorm epsilon


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never more than
    10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
            groups: int = 1, activation: Callable[[], nn.Module] | None = None,
            eps: float = 1e-5) -> nn.Sequential:
    """Conv (no bias, symmetric padding) + BatchNorm (+ activation): torchvision's
    ``Conv2dNormActivation``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out_channels, eps=eps),
    ]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride is on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, channels = [], 64
        for i, blocks in enumerate(layers):
            planes = 64 * 2**i
            for j in range(blocks):
                stages.append(block(channels, planes, 2 if i > 0 and j == 0 else 1))
                channels = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


# --------------------------------------------------------------- MobileNetV3, EfficientNet


class SqueezeExcitation(nn.Module):
    """torchvision's: global average pool, 1x1 conv, activation, 1x1 conv, gate, scale."""

    def __init__(self, channels: int, squeeze: int, activation: Callable[[], nn.Module],
                 gate: Callable[[], nn.Module]):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (k x k) -> squeeze-excitation -> project (1x1), with the
    identity added when the shape allows: MobileNetV3's block and EfficientNet's MBConv."""

    def __init__(self, in_channels: int, expanded: int, out_channels: int, kernel: int,
                 stride: int, activation: Callable[[], nn.Module],
                 se: SqueezeExcitation | None, eps: float = 1e-5):
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(conv_bn(in_channels, expanded, 1, activation=activation, eps=eps))
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded,
                              activation=activation, eps=eps))
        if se is not None:
            layers.append(se)
        layers.append(conv_bn(expanded, out_channels, 1, eps=eps))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


# torchvision's mobilenet_v3_large: input, kernel, expanded, output, SE, hard-swish, stride
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
)


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        hardswish = partial(nn.Hardswish, inplace=True)
        relu = partial(nn.ReLU, inplace=True)
        layers: list[nn.Module] = [conv_bn(3, 16, 3, 2, activation=hardswish)]
        for cin, kernel, expanded, cout, use_se, use_hs, stride in MOBILENET_V3_LARGE:
            se = (SqueezeExcitation(expanded, make_divisible(expanded // 4), relu,
                                    nn.Hardsigmoid) if use_se else None)
            layers.append(InvertedResidual(cin, expanded, cout, kernel, stride,
                                           hardswish if use_hs else relu, se))
        layers.append(conv_bn(160, 960, 1, activation=hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# EfficientNet-B0 stages: expansion, kernel, stride, input, output, repeats
EFFICIENTNET_B0 = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


class EfficientNetB0(nn.Module):
    """torchvision's efficientnet_b0 (stochastic depth is the identity at inference)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        silu = partial(nn.SiLU, inplace=True)
        layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, activation=silu, eps=TF_BN_EPS)]
        for expansion, kernel, stride, cin, cout, repeats in EFFICIENTNET_B0:
            for i in range(repeats):
                block_in = cin if i == 0 else cout
                expanded = block_in * expansion
                se = SqueezeExcitation(expanded, max(1, block_in // 4), silu, nn.Sigmoid)
                layers.append(InvertedResidual(block_in, expanded, cout, kernel,
                                               stride if i == 0 else 1, silu, se, TF_BN_EPS))
        layers.append(conv_bn(320, 1280, 1, activation=silu, eps=TF_BN_EPS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total padding TensorFlow's "SAME" adds along one axis: the output has
    ``ceil(size / stride)`` positions (timm's ``get_same_padding``)."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input's shape at run time
    (timm's ``Conv2dSame``): the extra pixel of an odd total goes after (bottom, right)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def tf_conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
               groups: int = 1, act: bool = True) -> nn.Sequential:
    """timm's "same" padding rule: a static symmetric pad where that equals TF's (stride 1,
    odd kernel), the run-time ``Conv2dSame`` elsewhere; then BatchNorm and ReLU6."""
    if stride == 1 and (kernel - 1) % 2 == 0:
        conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel, 1, (kernel - 1) // 2,
                                    groups=groups, bias=False)
    else:
        conv = Conv2dSame(in_channels, out_channels, kernel, stride, groups)
    layers = [conv, nn.BatchNorm2d(out_channels, eps=TF_BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class LiteBlock(nn.Module):
    """EfficientNet-Lite's block: MBConv without squeeze-excitation, ReLU6, "SAME" padding
    (expansion 1: timm's depthwise-separable block)."""

    def __init__(self, in_channels: int, expanded: int, out_channels: int, kernel: int,
                 stride: int):
        super().__init__()
        layers = [] if expanded == in_channels else [tf_conv_bn(in_channels, expanded, 1)]
        layers += [tf_conv_bn(expanded, expanded, kernel, stride, groups=expanded),
                   tf_conv_bn(expanded, out_channels, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """In the shape of timm's ``tf_efficientnet_lite0``: B0's stages without SE, ReLU6."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [tf_conv_bn(3, 32, 3, 2)]
        for expansion, kernel, stride, cin, cout, repeats in EFFICIENTNET_B0:
            for i in range(repeats):
                block_in = cin if i == 0 else cout
                layers.append(LiteBlock(block_in, block_in * expansion, cout, kernel,
                                        stride if i == 0 else 1))
        layers.append(tf_conv_bn(320, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------------------------- VGG


VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG16(nn.Module):
    """torchvision's vgg16 (configuration D, no BatchNorm)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------------------------------ registry


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: ResNet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": lambda: ResNet(Bottleneck, (3, 4, 6, 3)),
    "mobilenet_v3_large": MobileNetV3,
    "efficientnet_b0": EfficientNetB0,
    "efficientnet_lite0": EfficientNetLite0,
    "vgg16": VGG16,
}
# Parameter counts torchvision publishes for its definitions (its model docs' "num_params"),
# and timm's for tf_efficientnet_lite0 (4.65M).
PUBLISHED_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548,
    "vgg16": 138_357_544,
    "efficientnet_lite0": 4_652_008,
}


def names() -> list[str]:
    return list(ARCHS)


def definition(name: str) -> nn.Module:
    """The untrained module ``name`` as torch initialises it (no seed, statistics 0 and 1)."""
    if name not in ARCHS:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(ARCHS)}")
    return ARCHS[name]()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def calibration(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded random "images" for ``name``, float32 ``(n, 3, 224, 224)``, normalised as
    the model expects. Smooth colour fields (random 7x7 grids, bilinearly upsampled) plus
    pixel noise, so that neighbouring pixels correlate as in photographs; for calibration and
    timing only (no labels: random weights have no accuracy)."""
    if name not in ARCHS:
        raise KeyError(f"unknown architecture '{name}'; known: {', '.join(ARCHS)}")
    if n < 1:
        raise ValueError(f"calibration needs at least one image, got n={n}")
    rng = np.random.default_rng(seed)
    channels, height, width = INPUT_SHAPE
    coarse = torch.from_numpy(rng.random((n, channels, 7, 7), dtype=np.float32))
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noise = rng.normal(0.0, 0.08, (n, channels, height, width)).astype(np.float32)
    pixels = np.clip(smooth.numpy() + noise, 0.0, 1.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def _initialise(module: nn.Module) -> None:
    """torchvision's initialisation, with random BatchNorm scales and shifts."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _measure_batchnorm(module: nn.Module, images: np.ndarray) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (one train-mode pass,
    cumulative average), so inference normalises as training would have."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    module(torch.from_numpy(images))
    for bn in norms:
        bn.momentum = 0.1
    module.eval()


def build(name: str, seed: int = 0, statistics_samples: int = STATISTICS_SAMPLES) -> nn.Module:
    """Model ``name`` with seeded random weights and measured BatchNorm statistics, in eval
    mode. Same name and seed: the same weights, bit for bit."""
    module = definition(name)
    torch.manual_seed(seed)
    _initialise(module)
    # the statistics images are drawn from another stream than any calibration set
    _measure_batchnorm(module, calibration(name, statistics_samples, seed + 10_000))
    return module.eval()


def export(name: str, path: str | Path, batch: int | None = None, seed: int = 0,
           statistics_samples: int = STATISTICS_SAMPLES) -> Path:
    """Write ``build(name, seed, statistics_samples)`` as ONNX to ``path`` (through
    compressor.io.export_to_onnx: input ``input``, output ``logits``). The batch dimension is
    dynamic, or fixed to ``batch``."""
    import onnx

    from compressor import io

    proto = io.export_to_onnx(build(name, seed, statistics_samples), INPUT_SHAPE)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        for value in (*proto.graph.input, *proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = batch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def main() -> None:
    for name in ARCHS:
        count = parameter_count(definition(name))
        published = PUBLISHED_PARAMETERS.get(name)
        check = "" if published is None else (
            " (published: same)" if count == published else f" (published: {published:,})")
        print(f"{name}: {count:,} parameters{check}")


if __name__ == "__main__":
    sys.exit(main())
