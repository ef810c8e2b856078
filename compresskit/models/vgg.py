"""CIFAR-style VGG (Simonyan & Zisserman, 2015): 3x3 conv stacks with batch norm, global pooling, one classifier."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..schema import Range
from . import register_model

CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG feature stack (``cfg``: channel counts and 'M' for max-pool) scaled by ``width``."""

    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.input_shape = (in_channels, 32, 32)   # CIFAR-sized sample, for tracing (HyPar's plan)
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c_out = max(4, int(v * width))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("vgg")
def vgg(depth: str = "vgg11", num_classes: Annotated[int, Range(2, 100_000)] = 10,
        in_channels: Annotated[int, Range(1, 64)] = 3, width: Annotated[float, Range(0, 16, min_exclusive=True)] = 1.0,
        image_size: int | None = None) -> VGG:
    """CIFAR VGG (``depth`` vgg11 or vgg16); ``image_size`` is accepted for dataset filling and ignored."""
    if depth not in CONFIGS:
        raise ValueError(f"depth must be one of {', '.join(CONFIGS)}, got '{depth}'")
    return VGG(CONFIGS[depth], num_classes, in_channels, width)
