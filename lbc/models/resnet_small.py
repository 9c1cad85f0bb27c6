"""A small CIFAR-style ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, BasicBlocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from lbc.errors import ConfigError


class ResNetSmall(nn.Module):
    """Stem ``conv1`` (3x3, stride 1), one stage per width (stride 2 after the first), pool, ``fc``.

    Widths are multiples of 16, so every conv after the stem has input channels divisible by 16 and
    N:M patterns up to 1:16 apply to all of them; the stem (3 input channels) is the usual exception.
    """

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (2, 2, 2),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ConfigError(f"model.widths={list(widths)} and model.blocks={list(blocks)} must be non-empty and of equal length")
        if any(w <= 0 or w % 16 for w in widths):
            raise ConfigError(f"model.widths={list(widths)}: every width must be a positive multiple of 16")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != width):
                    downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
                layers.append(BasicBlock(inplanes, width, stride if j == 0 else 1, downsample))
                inplanes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.avgpool(self.layers(x)).flatten(1)
        return self.fc(x)
