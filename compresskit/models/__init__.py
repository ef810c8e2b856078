"""Built-in model zoo: ``@register_model`` factories, one model family per file (timm style)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import Registry


def _import_builtins() -> None:
    from . import dlrm, lenet, resnet_cifar, torchrec_dlrm, vgg  # noqa: F401  (registration; torchrec: lazily)


MODELS: Registry[Callable[..., nn.Module]] = Registry("model", "model.name", _import_builtins,
                                                  more="'pkg.module:factory' or 'torchvision:<name>'")


def register_model(name: str):
    """Decorator: register a factory ``fn(**args) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def available_models() -> dict[str, Callable[..., nn.Module]]:
    """Registered model factories by name."""
    return MODELS.items()
