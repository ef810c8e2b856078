"""The one place compresskit reads PyTorch's private module and tensor attributes, each with a public fallback.

These are read on hot paths (DASNet's sparse layers run them on every batch-1 call, where ``nn.Module.__getattr__``
and ``named_parameters`` cost more than the convolution) or where torch has no public accessor (a module's forward
hooks). Private attributes may change in any release, so each is used only on torch releases from ``MIN_TORCH`` on
and where it exists with the expected type; otherwise the public (slower or coarser) form answers. The private
oneDNN operators have their own gate in ``compresskit.plugins.dasnet.onednn``.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

MIN_TORCH = (2, 4)    # the oldest release the project supports; each attribute is probed as well


def _torch_at_least(version: tuple[int, int]) -> bool:
    major, minor = (int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    return (major, minor) >= version


def _probe() -> bool:
    module = nn.Module()        # no parameters drawn: importing this must not touch the global random state
    try:
        return (_torch_at_least(MIN_TORCH) and isinstance(module._parameters, dict)
                and isinstance(module._buffers, dict) and isinstance(module._forward_hooks, dict)
                and isinstance(torch.zeros(1)._version, int))
    except AttributeError:
        return False


PRIVATE = _probe()   # False: every function below takes its public path


def own_tensors(module: nn.Module, buffers: tuple[str, ...] = ()) -> list[torch.Tensor | None]:
    """``module``'s own parameters (not its children's) and the named buffers, read without ``__getattr__``."""
    if PRIVATE:
        return [*module._parameters.values(), *(module._buffers[name] for name in buffers)]
    return [p for _, p in module.named_parameters(recurse=False)] + [getattr(module, name) for name in buffers]


def tensor_versions(tensors: list[torch.Tensor | None]) -> tuple[Any, ...] | None:
    """A key that changes when any of ``tensors`` is replaced or modified in place (storage and version counter);
    None where torch gives no version counter: the caller then treats every call as a change."""
    if not PRIVATE:
        return None
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


def has_forward_hook(module: nn.Module, hook: Callable[..., Any], handle_attr: str) -> bool:
    """Whether ``hook`` is registered as a forward hook of ``module``. Without the private hook dict the answer
    comes from the handle :func:`add_forward_hook` kept in ``module.<handle_attr>``."""
    if PRIVATE:
        return any(h is hook for h in module._forward_hooks.values())
    handle = module.__dict__.get(handle_attr)
    hooks = handle.hooks_dict_ref() if handle is not None else None
    return hooks is not None and handle.id in hooks


def add_forward_hook(module: nn.Module, hook: Callable[..., Any], handle_attr: str):
    """Register ``hook`` once on ``module`` (a second call adds nothing); returns the new handle, or None."""
    if has_forward_hook(module, hook, handle_attr):
        return None
    handle = module.register_forward_hook(hook)
    if not PRIVATE:
        module.__dict__[handle_attr] = handle
    return handle
