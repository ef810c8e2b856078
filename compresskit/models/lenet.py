"""LeNet-5 (LeCun et al., 1998) with ReLU, for 32x32 (or 28x28, padded) single- or multi-channel images."""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from ..schema import Range
from . import register_model


class LeNet5(nn.Module):
    """conv(6,5x5)-pool-conv(16,5x5)-pool-fc120-fc84-fc(num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)   # one sample's shape, for tracing (HyPar's plan)
        pad = 2 if image_size == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: Annotated[int, Range(2, 100_000)] = 10, in_channels: Annotated[int, Range(1, 64)] = 1,
           image_size: Annotated[int, Range(16, 1024)] = 32) -> LeNet5:
    """LeNet-5; shape arguments are filled from the dataset when omitted."""
    return LeNet5(num_classes, in_channels, image_size)
