"""Swapping a parameter for a differently sized one while an optimizer holds it (a neutral utility for plugins).

Plugins that really free memory replace a parameter by a smaller (or larger) one: a new ``nn.Parameter``, not a
``.data`` swap, because autograd caches the shape of a leaf's gradient accumulator. The optimizer must then point at
the new parameter, and its per-row state (Adagrad sums, Adam moments) must follow the rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def swap_parameter(module: nn.Module, name: str, data: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                   remap_rows: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Parameter:
    """Replace ``module.<name>`` by a new Parameter holding ``data``; point ``optimizer`` at it.

    ``remap_rows(old_state_tensor) -> new_state_tensor`` rebuilds every optimizer state tensor whose first dimension
    is the old parameter's row count (without it, such state is dropped and restarts from zero).
    """
    old = getattr(module, name)
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return new
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == old.shape[0]:
                if remap_rows is None:
                    del state[key]
                else:
                    state[key] = remap_rows(value)
        optimizer.state[new] = state
    return new
