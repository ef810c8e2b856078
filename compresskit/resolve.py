"""The one resolver: model, dataset (and its collate) and optimizer specs -> live objects.

Models: a built-in name (``dlrm``, ``torchrec_dlrm``, ``lenet5``, ``vgg``, ``resnet_cifar``),
``'pkg.module:factory'`` (any importable callable returning an ``nn.Module``) or ``'torchvision:<name>'`` (when
torchvision is importable). Factory arguments that the dataset knows (``num_dense``, ``cardinalities``,
``num_classes``, ``in_channels``, ``image_size``) are filled in from it when the recipe leaves them out.
Collates (``data.collate``): a built-in name (``torchrec``) or ``'pkg.module:function'``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import integrity
from .data import DataBundle, load_dataset
from .data.collate import COLLATES, require_torchrec
from .errors import CheckpointError, ConfigError, first_line, shorten
from .models import MODELS
from .registry import unknown_name
from .schema import check_call_args


def _import_factory(target: str, path: str = "model.name", kind: str = "factory") -> Callable[..., Any]:
    """The attribute ``'pkg.module:attr'`` names, or a one-line ConfigError at ``path``."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:   # ImportError, and ValueError / TypeError for names like ':x' or '.x:y'
        raise ConfigError(path, f"cannot import module {shorten(module_name)} ({first_line(e, 120)}); "
                                f"expected 'pkg.module:{kind}'") from None
    if not attr.isidentifier() or not hasattr(module, attr):
        raise ConfigError(path, f"module {shorten(module_name)} has no attribute {shorten(attr)}")
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


DATA_PROVIDED = ("num_dense", "cardinalities", "num_classes", "in_channels", "image_size")


def check_model_config(cfg: Any, data_info: dict[str, Any] | None = None, data_known: bool = False
                       ) -> dict[str, Any]:
    """Check a ModelConfig without building anything: the name resolves, ``args`` bind to the factory's signature
    with the types and bounds it declares. Arguments the dataset provides (``data_info``; or, with ``data_known``
    and no info yet, any of :data:`DATA_PROVIDED`) are filled in. Returns the factory's arguments."""
    factory = model_factory(cfg.name)
    args = dict(cfg.args)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (data_info or {}).items():
        if key not in params:
            continue
        if key not in args:
            args[key] = value
        elif not _fits_data(key, args[key], value):
            raise ConfigError(f"model.args.{key}", f"got {shorten(args[key])}, but the dataset gives "
                                                   f"{shorten(value)}; drop it (it is filled in from the data)")
    provided = DATA_PROVIDED if data_known and data_info is None else ()
    return check_call_args(factory, args, "model.args", f"model '{cfg.name}'", provided=provided)


def _fits_data(key: str, given: Any, provided: Any) -> bool:
    """Whether a model argument the user set agrees with the dataset: equal, or for table sizes and class counts
    at least as large (more rows or logits than the data uses are allowed)."""
    if key == "cardinalities" and isinstance(given, list) and isinstance(provided, list):
        return len(given) == len(provided) and all(isinstance(g, int) and g >= p for g, p in zip(given, provided))
    if key == "num_classes" and isinstance(given, int) and isinstance(provided, int):
        return given >= provided
    return given == provided


def resolve_model(cfg: Any, data_info: dict[str, Any] | None = None) -> nn.Module:
    """Build the model a ModelConfig describes, filling dataset-derived arguments the factory accepts. Its
    ``checkpoint`` is not loaded here: see :func:`read_state_dict` and :func:`load_weights`."""
    args = check_model_config(cfg, data_info)
    try:
        model = model_factory(cfg.name)(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError("model.args", f"model '{cfg.name}' rejected its arguments: {first_line(e)}") from None
    except (RuntimeError, MemoryError) as e:   # e.g. tables too large to allocate
        raise ConfigError("model.args", f"model '{cfg.name}' could not be built: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"'{cfg.name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (a ``model.pt`` of compresskit, verified by its checksum, or any
    ``torch.save``'d state dict; a checkpoint's ``model`` entry is taken), or a one-line CheckpointError."""
    state = integrity.load(path, required=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(path, f"holds a {type(state).__name__} that is not a state dict (names -> tensors)")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """``model.load_state_dict(state)`` with a one-line error naming what does not fit (modules may adopt saved
    state they lack, e.g. a FIITED store the fused optimizer's per-slot state)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError("model.checkpoint", f"'{path}' does not fit the model: {first_line(e)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError("model.checkpoint", f"'{path}' does not fit the model (after its stages): missing "
                                              f"{_few(sorted(result.missing_keys))}; unexpected "
                                              f"{_few(sorted(result.unexpected_keys))}")


def _few(names: list[str]) -> str:
    return (", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")) if names else "none"


def collate_function(name: str) -> Callable[..., Any]:
    """The collate ``data.collate`` names: a built-in (``torchrec``: checks that TorchRec is installed) or
    ``'pkg.module:function'``; it must take ``(inputs, label)`` (and may take ``info``). One-line ConfigError
    naming ``data.collate`` otherwise."""
    if ":" in name:
        fn = _import_factory(name, "data.collate", "function")
    elif name in COLLATES:
        if name == "torchrec":
            require_torchrec("data.collate", load=False)
        fn = COLLATES[name]
    else:
        raise unknown_name("collate", name, COLLATES, "data.collate", more="'pkg.module:function'")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ConfigError("data.collate", f"{shorten(name)} cannot be called as collate(inputs, label); expected a "
                                          f"function of (inputs tuple, label tensor)") from None
    except ValueError:   # a builtin without a signature: left to the call
        pass
    return fn


def resolve_data(cfg: Any, seed: int = 0) -> DataBundle:
    """Load the dataset a DataConfig describes; its ``collate`` (if any) is attached to the bundle, with the
    dataset's ``info`` bound when the function takes an ``info`` argument."""
    bundle = load_dataset(cfg, seed)
    if cfg.collate is not None:
        fn = collate_function(cfg.collate)
        try:
            takes_info = "info" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes_info = False
        bundle.collate = functools.partial(fn, info=bundle.info) if takes_info else fn
    return bundle


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
