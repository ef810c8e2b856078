"""CIFAR ResNet (He et al., 2016): 3 stages of basic blocks, 6n+2 layers (ResNet-20 for n=3)."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..schema import Range
from . import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for small images with base width ``width``."""

    def __init__(self, n: int = 3, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.input_shape = (in_channels, 32, 32)   # CIFAR-sized sample, for tracing (HyPar's plan)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if (stage > 0 and i == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register_model("resnet_cifar")
def resnet_cifar(depth: Annotated[int, Range(8, 1202)] = 20, num_classes: Annotated[int, Range(2, 100_000)] = 10,
                 in_channels: Annotated[int, Range(1, 64)] = 3, width: Annotated[int, Range(1, 1024)] = 16,
                 image_size: int | None = None) -> ResNetCifar:
    """ResNet-``depth`` (depth = 6n+2: 20, 32, 44, 56, 110)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n+2 (e.g. 20, 32, 56), got {depth}")
    return ResNetCifar((depth - 2) // 6, num_classes, in_channels, width)
