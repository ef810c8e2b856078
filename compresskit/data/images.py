"""Image datasets available offline: scikit-learn's bundled 8x8 handwritten digits, upsampled."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from ..schema import Range
from . import DataBundle, bundle_from_tensors, register_dataset


@register_dataset("digits", needs_path=False,
                  description="scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled")
def load_digits(path: str | None = None, seed: int = 0, image_size: Annotated[int, Range(8, 256)] = 32,
                channels: Annotated[int, Range(1, 4)] = 1) -> DataBundle:
    """Digits scaled to [0, 1], bilinearly upsampled to ``image_size``, normalised; a seeded 70/10/20 split.

    Argument bounds are declared with :class:`Range` and checked by ``check_data_config`` before loading.
    """
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, channels, 1, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    info = {"in_channels": channels, "image_size": image_size, "num_classes": 10, "source": "sklearn digits"}
    return bundle_from_tensors((x, y), "multiclass", info, seed, fractions=(0.7, 0.1, 0.2))
