"""The one resolver: model, dataset and optimizer specs -> live objects.

Models: a built-in name (``dlrm``, ``lenet5``, ``vgg``, ``resnet_cifar``), ``'pkg.module:factory'`` (any importable
callable returning an ``nn.Module``) or ``'torchvision:<name>'`` (when torchvision is importable). Factory arguments
that the dataset knows (``num_dense``, ``cardinalities``, ``num_classes``, ``in_channels``, ``image_size``) are filled
in from it when the recipe leaves them out.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .data import DataBundle, load_dataset
from .errors import ConfigError
from .models import MODELS
from .registry import unknown_name
from .schema import suggest


def _import_factory(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("model.name", f"cannot import module '{module_name}' ({e})") from None
    if not hasattr(module, attr):
        raise ConfigError("model.name", f"module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision.models as tvm
    except Exception as e:  # torchvision is an optional extra and may be a mismatched build
        raise ConfigError("model.name", f"'torchvision:{name}' needs an importable torchvision "
                                        f"(pip install compresskit[vision]); import failed: {e}") from None
    names = tvm.list_models()
    if name not in names:
        raise unknown_name("torchvision model", name, names, "model.name")
    return lambda **kw: tvm.get_model(name, **kw)


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory a model name refers to (ConfigError with a suggestion if unknown)."""
    if name.startswith("torchvision:"):
        return _torchvision_factory(name.split(":", 1)[1])
    if ":" in name:
        return _import_factory(name)
    return MODELS.get(name)


def resolve_model(cfg: Any, data_info: dict[str, Any] | None = None) -> nn.Module:
    """Build the model a ModelConfig describes, filling dataset-derived arguments the factory accepts."""
    factory = model_factory(cfg.name)
    args = dict(cfg.args)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (data_info or {}).items():
        if key in params and key not in args:
            args[key] = value
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in args]
    if missing:
        raise ConfigError("model.args", f"model '{cfg.name}' needs {', '.join(missing)} (give them in model.args "
                                        f"or use a dataset that provides them)")
    unknown = [k for k in args if params and k not in params
               and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise ConfigError(f"model.args.{unknown[0]}", f"unknown argument for model '{cfg.name}'"
                                                     f"{suggest(unknown[0], params)}; allowed: {', '.join(params)}")
    try:
        model = factory(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError("model.args", f"model '{cfg.name}' rejected its arguments: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"'{cfg.name}' returned {type(model).__name__}, not a torch.nn.Module")
    if getattr(cfg, "checkpoint", None):
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return model


def resolve_data(cfg: Any, seed: int = 0) -> DataBundle:
    """Load the dataset a DataConfig describes."""
    return load_dataset(cfg, seed)


def build_optimizer(cfg: Any, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer an OptimizerConfig describes."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
