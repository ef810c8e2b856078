"""Built-in model zoo: ``@register_model`` factories, one model family per file (timm style)."""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a factory ``fn(**args) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        return fn

    return deco


def available_models() -> dict[str, Callable[..., nn.Module]]:
    """Registered model factories by name."""
    from . import dlrm, lenet, resnet_cifar, vgg  # noqa: F401  (registration)

    return dict(sorted(_MODELS.items()))
